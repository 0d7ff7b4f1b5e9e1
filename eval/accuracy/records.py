"""The run's JSONL file: one line per (problem, policy point), appended as each finishes.

Resuming reads it back and skips what already succeeded; failed requests are tried again.
Every line carries the run's signature (model, sampling, prompt, problem file hash), and a
file written under another signature is refused instead of mixed into the results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO


@dataclass(frozen=True)
class Signature:
    model: str
    max_tokens: int
    temperature: float
    top_p: float
    prompt_template: str
    problems_sha256: str
    seed: int | None  # sent to the endpoint only when it honours seeds (see cli)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class SignatureMismatch(ValueError):
    pass


def record_key(problem_id: str, label: str) -> str:
    return f"{label}\t{problem_id}"


def read_records(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """Latest record per key, and the number of lines that could not be read (a line cut
    short by a killed run, for instance); those are reported and their requests redone."""
    latest: dict[str, dict[str, Any]] = {}
    unreadable = 0
    if not path.exists():
        return latest, 0
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            key = record_key(rec["problem_id"], rec["label"])
        except (json.JSONDecodeError, KeyError, TypeError):
            unreadable += 1
            continue
        latest[key] = rec
    return latest, unreadable


def check_signature(records: dict[str, dict[str, Any]], signature: Signature) -> None:
    want = signature.as_dict()
    for rec in records.values():
        got = rec.get("signature")
        if got != want:
            diff = sorted(k for k in want if not isinstance(got, dict) or got.get(k) != want[k])
            raise SignatureMismatch(
                f"the output file holds results of a different run (differs in {diff}); "
                "use another --out directory or --overwrite"
            )


class RecordWriter:
    """Appends and flushes each record at once, so a killed run loses at most one line."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: TextIO = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, sort_keys=True) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()
