from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bundled_model_path() -> Path:
    """The converted bundled model (converted once per machine, then cached)."""
    from service.bundled_model import prepare_model

    return prepare_model().path
