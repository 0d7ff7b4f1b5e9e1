"""A tiny random-weight Llama (SGLang `--load-format dummy`) for tests where speed matters.

It shares the bundled model's tokenizer; its outputs are meaningless, its KV accounting
is real.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support.sglang_server import RunningServer, sglang_server

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "vocab_size": 49152,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def make_tiny_model(bundled: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(TINY_CONFIG, indent=2))
    for name in TOKENIZER_FILES:
        if (bundled / name).exists():
            shutil.copy(bundled / name, out / name)
    return out


@contextlib.contextmanager
def tiny_engine(
    bundled: Path, workdir: Path, extra_args: tuple[str, ...] = (), **options: Any
) -> Iterator[RunningServer]:
    """A real SGLang server (raas backend, fp32) on the tiny model in `workdir`."""
    model = make_tiny_model(bundled, workdir)
    with sglang_server(
        str(model),
        dtype="float32",
        attention_backend="raas",
        extra_args=("--load-format", "dummy", *extra_args),
        **options,
    ) as srv:
        yield srv
