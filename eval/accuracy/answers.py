"""Final-answer extraction from model output and checking against a reference answer.

Extraction order follows how the common benchmarks mark answers: the last `\\boxed{}`
(MATH, AIME, most reasoning models), then GSM8K's `#### x`, then the last number in the
text (what a small instruction model that ignores the format instruction leaves).
Checking: exact after normalisation, then numeric within a tolerance, then symbolic
equivalence through sympy when it is installed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

ExtractionMethod = Literal["boxed", "hashes", "last_number"]
CheckMethod = Literal["exact", "numeric", "symbolic"]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
# Sympy simplification is exponential in bad cases; longer answers are compared exactly only.
_MAX_SYMBOLIC_CHARS = 200


@dataclass(frozen=True)
class Extracted:
    text: str
    method: ExtractionMethod


@dataclass(frozen=True)
class Verdict:
    correct: bool
    method: CheckMethod | None  # which test decided a match; None when nothing matched


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if none
    or if the last one is never closed (a truncated answer is not an answer)."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def after_hashes(text: str) -> str | None:
    """GSM8K's marker: what follows the last `####` on its line."""
    if "####" not in text:
        return None
    tail = text.rsplit("####", 1)[1].strip().splitlines()
    return tail[0].strip() if tail and tail[0].strip() else None


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1].rstrip(".") if found else None


def extract_answer(text: str) -> Extracted | None:
    for method, fn in (("boxed", last_boxed), ("hashes", after_hashes)):
        got = fn(text)
        if got:
            return Extracted(got, method)  # type: ignore[arg-type]
    got = last_number(text)
    return Extracted(got, "last_number") if got else None


def normalize(answer: str) -> str:
    """Drop what differs between equal answers as written: math-mode markers, spacing,
    `\\left`/`\\right`, `\\dfrac`, units written with `\\text{}`, a trailing period,
    thousands separators in plain numbers."""
    s = answer.strip().rstrip(".").strip().strip("$").strip()
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right|displaystyle|,|!|;)", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("^\\circ", "")
    s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"\s+", "", s).rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s


def as_number(answer: str) -> float | None:
    """A plain number, a fraction a/b or \\frac{a}{b}; None for anything else."""
    s = normalize(answer)
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s) or re.fullmatch(
        r"(-?)\\frac(\d)(\d)", s
    )
    if m:
        sign, num, den = m.groups()
        s = f"{sign}{num}/{den}"
    try:
        value = float(Fraction(s))
    except (ValueError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) else None


def _latex_to_sympy_text(s: str) -> str:
    """The LaTeX that MATH answers use, as sympy's parser reads it (sympy's own LaTeX parser
    needs antlr4, which is not a dependency here)."""
    for _ in range(4):  # nested fractions and roots, innermost first
        s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        s = re.sub(r"\\sqrt\[([^{}]*)\]\{([^{}]*)\}", r"((\2)**(1/(\1)))", s)
        s = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s)
    s = re.sub(r"\\sqrt(\d)", r"sqrt(\1)", s)
    s = s.replace("\\pi", "pi").replace("\\cdot", "*").replace("\\times", "*")
    s = s.replace("^", "**").replace("{", "(").replace("}", ")")
    return s


def symbolically_equal(a: str, b: str) -> bool:
    if len(a) > _MAX_SYMBOLIC_CHARS or len(b) > _MAX_SYMBOLIC_CHARS:
        return False
    try:
        import sympy
        from sympy.parsing.sympy_parser import (
            implicit_multiplication_application,
            parse_expr,
            standard_transformations,
        )
    except ImportError:
        return False
    transformations = (*standard_transformations, implicit_multiplication_application)
    try:
        left = parse_expr(_latex_to_sympy_text(a), transformations=transformations)
        right = parse_expr(_latex_to_sympy_text(b), transformations=transformations)
        return bool(sympy.simplify(left - right) == 0)
    except Exception:  # noqa: BLE001 - sympy raises many types on text it cannot read
        return False


def check_answer(predicted: str, reference: str, *, rel_tol: float = 1e-6) -> Verdict:
    p, r = normalize(predicted), normalize(reference)
    if p == r:
        return Verdict(True, "exact")
    pn, rn = as_number(p), as_number(r)
    if pn is not None and rn is not None:
        ok = math.isclose(pn, rn, rel_tol=rel_tol, abs_tol=rel_tol)
        return Verdict(ok, "numeric" if ok else None)
    if symbolically_equal(p, r):
        return Verdict(True, "symbolic")
    return Verdict(False, None)
