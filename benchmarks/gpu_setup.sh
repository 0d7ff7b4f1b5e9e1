# Source from the project's root on an offline GPU host (docs/gpu.md):
#   . benchmarks/gpu_setup.sh [BUNDLE_DIR] [MODEL_DIR]
# Unpacks the SGLang bundle (xz tar parts) into $RAAS_GPU_SITE once, copies the
# Llama-8B-shaped config, writes a variant with $RAAS_GPU_LAYERS layers (speed runs that
# must reach long contexts in minutes), and exports what SGLang needs there.
bundle="${1:-.gpu/sglang-1}"
models="${2:-.gpu/models}"
site="${RAAS_GPU_SITE:-/tmp/site}"
model_root="${RAAS_GPU_MODELS:-/tmp/models}"
layers="${RAAS_GPU_LAYERS:-4}"
if [ ! -d "$site/sglang" ]; then
  mkdir -p "$site" && cat "$bundle"/sglang.tar.xz.* | tar -C "$site" -xJf - || return 1
fi
# SGLang 0.5.23's Llama MLP imports a Blackwell-only CuTe-DSL kernel module at build time
# (srt/layers/dual_gemm.py), which needs nvidia-cutlass-dsl, left out of the bundle. On
# Hopper the module only answers "not usable", so a stand-in that says so replaces it.
dual="$site/sglang/kernels/ops/gemm/cutedsl_dual_gemm.py"
if [ -f "$dual" ] && ! python3 -c "import cutlass" 2>/dev/null && ! grep -q raas-stand-in "$dual"; then
  cat > "$dual" <<'PY'
"""raas-stand-in: the Blackwell (sm100) dual GEMM is unavailable without nvidia-cutlass-dsl."""
from enum import IntEnum

MAX_DUAL_GEMM_DECODE_TOKENS = 16


class DualGemmQuantMode(IntEnum):
    STATIC_PER_TENSOR = 0
    STATIC_PER_TOKEN = 1
    DYNAMIC_PER_TENSOR = 2
    DYNAMIC_PER_TOKEN = 3
    UNQUANT = 4


def can_use_dual_gemm(num_tokens, hidden_size, intermediate_size, quant_mode):
    return False


def dual_gemm_swiglu(*args, **kwargs):
    raise RuntimeError("the sm100 dual GEMM needs nvidia-cutlass-dsl")


dual_gemm_swiglu_fp8 = dual_gemm_swiglu
PY
fi
mkdir -p "$model_root"
cp -r "$models/llama8b-shape" "$model_root/" || return 1
python3 - "$model_root" "$layers" <<'EOF'
import json, shutil, sys
from pathlib import Path
root, layers = Path(sys.argv[1]), int(sys.argv[2])
src, dst = root / "llama8b-shape", root / f"llama8b-shape-{layers}l"
shutil.copytree(src, dst, dirs_exist_ok=True)
cfg = json.loads((src / "config.json").read_text())
cfg["num_hidden_layers"] = layers
(dst / "config.json").write_text(json.dumps(cfg, indent=1))
print(f"models: {src} (32 layers), {dst} ({layers} layers)")
EOF
export PYTHONPATH="$site:$PWD" FLASHINFER_CUDA_ARCH_LIST=9.0a TORCH_CUDA_ARCH_LIST=9.0a \
  MAX_JOBS=16 SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK=1 \
  SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python PYTHONUNBUFFERED=1
python3 -c "import torch, sgl_kernel, flashinfer, sglang; print('torch', torch.__version__, 'sglang', sglang.__version__, 'flashinfer', flashinfer.__version__, torch.cuda.get_device_name(0))"
