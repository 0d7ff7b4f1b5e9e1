"""The bundled problem set (eval/data/accuracy/arithmetic.jsonl): arithmetic and short
multi-step word problems with exact integer answers, in GSM8K's layout (a worked solution
ending in `#### <answer>`).

Sized for the bundled 135M model: one-operation sums it mostly gets right, two- and
three-step word problems it mostly does not, so accuracy sits between 0 and 1 and a KV
budget has room to cost answers. A step-by-step answer runs past the smallest budget
(32 decode tokens), so the policies do evict while the model works.

    python -m eval.accuracy.problem_generator            # rewrites the bundled file
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

DEFAULT_SEED = 27
DEFAULT_COUNT = 120
BUNDLED = Path(__file__).resolve().parents[1] / "data" / "accuracy" / "arithmetic.jsonl"

NAMES = ("Sam", "Mia", "Leo", "Ana", "Tom", "Zoe", "Raj", "Eva", "Ben", "Ivy")
ITEMS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "cards", "shells")

Problem = tuple[str, str, int]  # question, worked solution, answer


def add(rng: random.Random) -> Problem:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", a + b


def subtract(rng: random.Random) -> Problem:
    a = rng.randint(30, 99)
    b = rng.randint(10, a - 1)
    return f"What is {a} - {b}?", f"{a} - {b} = {a - b}.", a - b


def multiply(rng: random.Random) -> Problem:
    a, b = rng.randint(2, 12), rng.randint(2, 9)
    return f"What is {a} times {b}?", f"{a} * {b} = {a * b}.", a * b


def three_terms(rng: random.Random) -> Problem:
    a, b = rng.randint(10, 60), rng.randint(10, 60)
    c = rng.randint(1, a + b - 1)
    s = a + b
    return (
        f"What is {a} + {b} - {c}?",
        f"{a} + {b} = {s}. {s} - {c} = {s - c}.",
        s - c,
    )


def buy_and_give(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    have, more = rng.randint(5, 30), rng.randint(2, 20)
    give = rng.randint(1, have + more - 1)
    total = have + more
    question = (
        f"{name} has {have} {item}. {name} gets {more} more {item} and then gives {give} "
        f"{item} to a friend. How many {item} does {name} have now?"
    )
    solution = f"{have} + {more} = {total}. {total} - {give} = {total - give}."
    return question, solution, total - give


def price_total(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    price, count, extra = rng.randint(2, 9), rng.randint(2, 6), rng.randint(1, 15)
    cost = price * count
    question = (
        f"{item.capitalize()} cost {price} dollars each. {name} buys {count} {item} and a bag "
        f"that costs {extra} dollars. How many dollars does {name} spend in total?"
    )
    solution = f"{count} * {price} = {cost}. {cost} + {extra} = {cost + extra}."
    return question, solution, cost + extra


def share_equally(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    friends, each, kept = rng.randint(2, 6), rng.randint(2, 9), rng.randint(1, 9)
    total = friends * each + kept
    question = (
        f"{name} has {total} {item}. {name} keeps {kept} and shares the rest equally among "
        f"{friends} friends. How many {item} does each friend get?"
    )
    solution = f"{total} - {kept} = {total - kept}. {total - kept} / {friends} = {each}."
    return question, solution, each


def weekly_savings(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    start, per_week, weeks, spent = (
        rng.randint(5, 40),
        rng.randint(3, 12),
        rng.randint(2, 5),
        rng.randint(1, 20),
    )
    saved = per_week * weeks
    end = start + saved - spent
    question = (
        f"{name} has {start} dollars and saves {per_week} dollars every week for {weeks} weeks. "
        f"Then {name} spends {spent} dollars on a game. How many dollars does {name} have left?"
    )
    solution = (
        f"{per_week} * {weeks} = {saved}. {start} + {saved} = {start + saved}. "
        f"{start + saved} - {spent} = {end}."
    )
    return question, solution, end


# Weighted towards the easy kinds: the bundled model must solve some for accuracy to move.
KINDS: tuple[tuple[str, Callable[[random.Random], Problem], int], ...] = (
    ("add", add, 3),
    ("subtract", subtract, 2),
    ("multiply", multiply, 2),
    ("three_terms", three_terms, 2),
    ("buy_and_give", buy_and_give, 2),
    ("price_total", price_total, 1),
    ("share_equally", share_equally, 1),
    ("weekly_savings", weekly_savings, 1),
)


def generate(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    names = [k for k, _, _ in KINDS]
    weights = [w for _, _, w in KINDS]
    makers = {k: fn for k, fn, _ in KINDS}
    rows = []
    for i in range(count):
        kind = rng.choices(names, weights)[0]
        question, solution, answer = makers[kind](rng)
        rows.append(
            {
                "id": f"{kind}-{i:03d}",
                "question": question,
                "answer": f"{solution}\n#### {answer}",
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--count", type=int, default=DEFAULT_COUNT)
    p.add_argument("--out", type=Path, default=BUNDLED)
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(row) for row in generate(args.count, args.seed)]
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
