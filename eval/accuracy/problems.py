"""Problem sets from local JSONL files in the common benchmark layouts.

- GSM8K: `question`, `answer` (worked solution ending in `#### <number>`).
- MATH / MATH500: `problem`, `answer` and/or `solution` (the answer in its last `\\boxed{}`).
- AIME-style: `problem` or `question` (also capitalised), and an integer `answer` (also
  `Answer`).

An optional `id` (or `unique_id`, MATH500's) names a problem; otherwise its line number
does. A line that cannot be used (not JSON, no question, no reference answer) becomes a
`LoadIssue` and the rest of the file still loads: one bad line never stops a run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from eval.accuracy.answers import after_hashes, last_boxed

Layout = Literal["auto", "gsm8k", "math", "aime"]
LAYOUTS: tuple[Layout, ...] = ("auto", "gsm8k", "math", "aime")


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str  # the reference final answer, as written in the data
    layout: str


@dataclass(frozen=True)
class LoadIssue:
    line: int
    id: str | None
    reason: str


@dataclass
class ProblemSet:
    path: str
    sha256: str
    problems: list[Problem] = field(default_factory=list)
    issues: list[LoadIssue] = field(default_factory=list)


class _Unusable(ValueError):
    """A line that is JSON but not a usable problem; its message is the report."""


def _text(row: dict[str, Any], *names: str) -> str | None:
    for name in names:
        value = row.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    return None


def _gsm8k(row: dict[str, Any]) -> tuple[str, str]:
    question = _text(row, "question")
    solution = _text(row, "answer")
    if question is None:
        raise _Unusable("missing field 'question'")
    if solution is None:
        raise _Unusable("missing field 'answer'")
    final = after_hashes(solution) if "####" in solution else solution
    if not final:
        raise _Unusable("'answer' has nothing after '####'")
    return question, final


def _math(row: dict[str, Any]) -> tuple[str, str]:
    question = _text(row, "problem")
    if question is None:
        raise _Unusable("missing field 'problem'")
    answer = _text(row, "answer")
    if answer is None:
        solution = _text(row, "solution")
        if solution is None:
            raise _Unusable("missing fields 'answer' and 'solution'")
        answer = last_boxed(solution)
        if answer is None:
            raise _Unusable("'solution' has no closed \\boxed{} answer")
    return question, answer


def _aime(row: dict[str, Any]) -> tuple[str, str]:
    question = _text(row, "problem", "question", "Problem", "Question")
    if question is None:
        raise _Unusable("missing field 'problem' (or 'question')")
    answer = _text(row, "answer", "Answer")
    if answer is None:
        raise _Unusable("missing field 'answer'")
    try:
        value = int(answer.strip().lstrip("0") or "0")
    except ValueError:
        raise _Unusable(f"AIME answer is not an integer: {answer[:40]!r}") from None
    return question, str(value)


def _detect(row: dict[str, Any]) -> Layout:
    if "question" in row and isinstance(row.get("answer"), str) and "####" in row["answer"]:
        return "gsm8k"
    if "problem" in row and ("solution" in row or isinstance(row.get("answer"), str)):
        return "math"
    if "answer" in row or "Answer" in row:
        return "aime"
    raise _Unusable("no known layout: expected GSM8K, MATH or AIME fields")


_PARSERS = {"gsm8k": _gsm8k, "math": _math, "aime": _aime}


def parse_line(raw: str, line: int, layout: Layout = "auto") -> Problem | LoadIssue:
    try:
        row = json.loads(raw)
    except json.JSONDecodeError as exc:
        return LoadIssue(line, None, f"not JSON: {exc.msg} at column {exc.colno}")
    if not isinstance(row, dict):
        return LoadIssue(line, None, f"expected a JSON object, got {type(row).__name__}")
    pid = _text(row, "id", "unique_id", "ID") or f"line-{line}"
    try:
        kind = _detect(row) if layout == "auto" else layout
        question, answer = _PARSERS[kind](row)
    except _Unusable as exc:
        return LoadIssue(line, pid, str(exc))
    return Problem(pid, question, answer, kind)


def load_problems(path: Path, layout: Layout = "auto") -> ProblemSet:
    data = path.read_bytes()
    out = ProblemSet(str(path), hashlib.sha256(data).hexdigest())
    seen: set[str] = set()
    for n, raw in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not raw.strip():
            continue
        got = parse_line(raw, n, layout)
        if isinstance(got, Problem) and got.id in seen:
            got = LoadIssue(n, got.id, "duplicate id (results are keyed by id)")
        if isinstance(got, LoadIssue):
            out.issues.append(got)
        else:
            seen.add(got.id)
            out.problems.append(got)
    return out
