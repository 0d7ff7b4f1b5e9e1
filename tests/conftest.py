from __future__ import annotations

from pathlib import Path

import pytest
import structlog


@pytest.fixture(scope="session")
def bundled_model_path() -> Path:
    """The converted bundled model (converted once per machine, then cached)."""
    from service.engine.bundled_model import prepare_model

    return prepare_model().path


@pytest.fixture(scope="session", autouse=True)
def _gateway_logs_through_stdlib_logging() -> None:
    """In-process gateways (uvicorn threads of module-scoped fixtures) log through the
    standard library here: pytest captures each test's records and shows them with its
    failure, and a line logged between tests is dropped instead of reaching the terminal
    (structlog's default prints to whatever sys.stdout is at that moment)."""
    structlog.configure(
        processors=[
            structlog.stdlib.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.KeyValueRenderer(key_order=["event"], sort_keys=True),
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
