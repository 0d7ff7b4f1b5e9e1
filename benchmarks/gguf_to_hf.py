"""Dequantize the bundled model's GGUF into a Hugging Face directory on a host without
the project's own dependencies (a GPU host set up by benchmarks/gpu_setup.sh).

    python3 benchmarks/gguf_to_hf.py MODEL.gguf META_DIR OUT_DIR

META_DIR holds the config and tokenizer files `raas-serve prepare-model` wrote (small,
copied from a prepared model); only the weights come from the GGUF, so the GPU host
serves exactly the model the CPU engine tests use.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM


def main() -> None:
    gguf, meta, out = (Path(a) for a in sys.argv[1:4])
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for f in meta.iterdir():
        shutil.copy(f, out / f.name)
    print(f"converted {gguf.name} -> {out}")


if __name__ == "__main__":
    main()
