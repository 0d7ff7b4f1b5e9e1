"""What the gateway reads from a model directory: the KV bytes one token costs.

bytes/token = layers * kv_heads * head_dim * 2 (K and V) * bytes per element. The gateway
multiplies KV token counts by it to report memory, without loading the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

DTYPE_BYTES = {
    "float32": 4,
    "float": 4,
    "float16": 2,
    "half": 2,
    "bfloat16": 2,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
}


def kv_bytes_per_token(config: dict[str, Any], dtype: str = "auto") -> int | None:
    """From a Hugging Face config dict; None when a field is missing."""
    text = config.get("text_config", config)  # multimodal configs nest the LM
    layers = text.get("num_hidden_layers")
    heads = text.get("num_attention_heads")
    kv_heads = text.get("num_key_value_heads", heads)
    head_dim = text.get("head_dim")
    if head_dim is None and heads and text.get("hidden_size"):
        head_dim = text["hidden_size"] // heads
    if dtype == "auto":
        dtype = str(text.get("dtype") or text.get("torch_dtype") or config.get("dtype") or "")
    element = DTYPE_BYTES.get(dtype.removeprefix("torch."))
    if not all(isinstance(v, int) and v > 0 for v in (layers, kv_heads, head_dim)) or not element:
        return None
    return int(layers * kv_heads * head_dim * 2 * element)


def kv_bytes_per_token_from_dir(model_dir: Path, dtype: str = "auto") -> int | None:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("model_config.unreadable", path=str(model_dir), error=str(exc))
        return None
    return kv_bytes_per_token(config, dtype)
