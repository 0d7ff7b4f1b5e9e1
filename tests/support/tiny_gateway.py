"""The tiny random-weight engine (raas backend) behind an in-process gateway in remote mode,
for engine tests where speed matters and the gateway's own settings are under test."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.app import create_app
from service.server.settings import Settings
from tests.support.gateway_server import serve_app, wait_ready
from tests.support.tiny_model import tiny_engine


@contextlib.contextmanager
def tiny_engine_gateway(
    bundled_model_path: Path,
    workdir: Path,
    *,
    model_name: str = "tiny",
    max_total_tokens: int = 4096,
    **settings: Any,
) -> Iterator[str]:
    """Yield the gateway's URL; `settings` override the gateway's Settings."""
    with tiny_engine(
        Path(bundled_model_path),
        workdir,
        max_total_tokens=max_total_tokens,
        extra_args=("--served-model-name", model_name),
    ) as engine:
        config = Settings(
            engine_mode="remote",
            engine_url=engine.url,
            model_name=model_name,
            # Read for config.json only: bytes per KV token feed the *_bytes metrics.
            model_path=str(workdir),
            engine_health_interval_s=0.5,
            api_keys=None,
            api_keys_file=None,
            **settings,
        )
        with serve_app(create_app(config)) as url:
            wait_ready(url, timeout_s=60)
            yield url
