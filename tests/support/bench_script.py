"""Load a benchmark script (benchmarks/*.py, not a package) as a module, so a smoke test
can call its `main(argv)` in-process and read what it wrote."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py as the module `<name>_bench`."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def run_benchmark(name: str, out: Path, argv: list[str]) -> tuple[dict[str, Any], str]:
    """Run benchmarks/<name>.py's main with `--out out` + argv; returns the JSON it wrote
    and the table it printed. A non-zero exit status fails the caller's test."""
    bench = load_benchmark(name)
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        assert bench.main(["--out", str(out), *argv]) == 0
    return json.loads(out.read_text()), table.getvalue()


def finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def positive(value: object) -> bool:
    return finite(value) and value > 0  # type: ignore[operator]
