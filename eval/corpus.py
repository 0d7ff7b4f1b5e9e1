"""The fidelity corpus: non-degenerate token sequences of three kinds, versioned in the repo.

- ``sampled``: continuations sampled from the bundled model (fixed seed, temperature and
  top-p), kept only if their distinct-4-gram ratio shows no repetition loop. Greedy
  continuations of this model loop within a few hundred tokens, and on a loop every
  policy looks perfect.
- ``natural``: long text shipped with the interpreter (its LICENSE.txt and a long
  standard-library module), named by their path inside the standard library.
- ``math``: step-by-step solutions written for this project (``eval/data/math/*.txt``).

``python -m eval.corpus`` rebuilds ``eval/data/corpus.json`` (token ids, sources and
repetition measures) from the cached samples (``eval/data/sampled.json``; ``--resample``
draws them again, minutes on a CPU); the study reads only corpus.json, so it is
deterministic.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent / "data"
CORPUS_FILE = DATA / "corpus.json"
SAMPLED_FILE = DATA / "sampled.json"
MATH_DIR = DATA / "math"

CONTINUATION_TOKENS = 2048
NATURAL_PROMPT_TOKENS = 64
# Files of the interpreter's standard library, by their name inside it.
NATURAL_SOURCES = ("LICENSE.txt", "difflib.py")
SAMPLE_SEED = 1234
SAMPLE_TEMPERATURE = 1.0
SAMPLE_TOP_P = 0.95
CANDIDATES = 4
SAMPLED_WANTED = 2
# A sample is a loop if its 4-grams repeat too much overall or in its last stretch.
MIN_DISTINCT_4 = 0.6
MIN_DISTINCT_4_TAIL = 0.5
TAIL_TOKENS = 256
SAMPLE_PROMPT = (
    "Write a long, detailed essay on how lighthouses were built and kept in the 19th "
    "century: the engineering, the keepers' daily work, and how the job changed."
)
MATH_SYSTEM = "Solve each problem step by step, referring back to earlier results."


@dataclass(frozen=True)
class Sequence:
    """One teacher-forced sequence: a prompt (always kept) and a continuation."""

    name: str
    kind: str  # sampled | natural | math
    source: str
    prompt_ids: list[int]
    continuation_ids: list[int]
    distinct_4: float

    def truncated(self, prompt_tokens: int | None, continuation_tokens: int) -> Sequence:
        """A shorter copy (the smoke test's sizes)."""
        prompt = self.prompt_ids if prompt_tokens is None else self.prompt_ids[-prompt_tokens:]
        cont = self.continuation_ids[:continuation_tokens]
        return Sequence(self.name, self.kind, self.source, prompt, cont, distinct_ngrams(cont))


def distinct_ngrams(tokens: list[int], n: int = 4) -> float:
    """Distinct n-grams / all n-grams (1.0: no repeats; a loop drives it towards 0)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def is_loop(tokens: list[int]) -> bool:
    return (
        distinct_ngrams(tokens) < MIN_DISTINCT_4
        or distinct_ngrams(tokens[-TAIL_TOKENS:]) < MIN_DISTINCT_4_TAIL
    )


def load_corpus(path: Path = CORPUS_FILE) -> list[Sequence]:
    data = json.loads(path.read_text())
    return [Sequence(**item) for item in data["sequences"]]


def _chat_prompt(tokenizer, user: str, system: str | None = None) -> list[int]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def natural_sequences(tokenizer) -> list[Sequence]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for name in NATURAL_SOURCES:
        text = (stdlib / name).read_text()
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        need = NATURAL_PROMPT_TOKENS + CONTINUATION_TOKENS
        if len(ids) < need:
            raise ValueError(f"expected at least {need} tokens in {name}, got {len(ids)}")
        cont = ids[NATURAL_PROMPT_TOKENS:need]
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        source = f"Python {sys.version_info.major}.{sys.version_info.minor} stdlib {name}"
        out.append(
            Sequence(
                name=f"natural-{Path(name).stem.lower()}",
                kind="natural",
                source=f"{source} (sha256 {digest}, first {need} tokens)",
                prompt_ids=ids[:NATURAL_PROMPT_TOKENS],
                continuation_ids=cont,
                distinct_4=distinct_ngrams(cont),
            )
        )
    return out


def math_sequences(tokenizer) -> list[Sequence]:
    """Each file: the problems (the prompt), a line '---', then the worked solutions."""
    out = []
    for path in sorted(MATH_DIR.glob("*.txt")):
        problems, solution = path.read_text().split("\n---\n", 1)
        prompt = _chat_prompt(tokenizer, problems.strip(), MATH_SYSTEM)
        ids = tokenizer(solution.strip(), add_special_tokens=False)["input_ids"]
        if len(ids) < CONTINUATION_TOKENS:
            raise ValueError(
                f"expected at least {CONTINUATION_TOKENS} solution tokens in {path.name}, "
                f"got {len(ids)}"
            )
        cont = ids[:CONTINUATION_TOKENS]
        out.append(
            Sequence(
                name=f"math-{path.stem}",
                kind="math",
                source=f"eval/data/math/{path.name} (written for this project)",
                prompt_ids=prompt,
                continuation_ids=cont,
                distinct_4=distinct_ngrams(cont),
            )
        )
    return out


def _top_p_sampler(generator: torch.Generator) -> Callable[[torch.Tensor], list[int]]:
    def choose(logits: torch.Tensor) -> list[int]:
        probs = torch.softmax(logits / SAMPLE_TEMPERATURE, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top-p (always the first token).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= SAMPLE_TOP_P
        sorted_probs[outside] = 0.0
        picked = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(-1, picked).view(-1).tolist()

    return choose


def sample_sequences(model, tokenizer) -> dict:
    """Candidates sampled as one batch from a fixed seed; the first non-loops are kept.

    Returns the kept sequences and a log of every candidate (kept or rejected).
    """
    from eval.batched_runner import BatchedPolicyRunner
    from raas_backend.policies import KVPolicyConfig

    prompt = _chat_prompt(tokenizer, SAMPLE_PROMPT)
    # A budget above the length never evicts: every row is dense attention; a non-dense
    # name keeps the runner from treating rows as copies of row 0.
    rows = [KVPolicyConfig(name="streaming", budget_tokens=2 * CONTINUATION_TOKENS)] * CANDIDATES
    generator = torch.Generator().manual_seed(SAMPLE_SEED)
    res = BatchedPolicyRunner(model).run(
        prompt, rows, CONTINUATION_TOKENS, choose=_top_p_sampler(generator)
    )
    kept: list[Sequence] = []
    log: list[dict] = []
    for row, cont in enumerate(res.tokens):
        d4 = distinct_ngrams(cont)
        loop = is_loop(cont)
        log.append({"candidate": row, "distinct_4": d4, "loop": loop})
        print(f"sampled candidate {row}: distinct-4 {d4:.3f} loop={loop}")
        if not loop and len(kept) < SAMPLED_WANTED:
            kept.append(
                Sequence(
                    name=f"sampled-{len(kept)}",
                    kind="sampled",
                    source=(
                        f"candidate {row} of {CANDIDATES}: seed {SAMPLE_SEED}, temperature "
                        f"{SAMPLE_TEMPERATURE}, top-p {SAMPLE_TOP_P}"
                    ),
                    prompt_ids=prompt,
                    continuation_ids=cont,
                    distinct_4=d4,
                )
            )
    return {"log": log, "sequences": [asdict(k) for k in kept]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--resample", action="store_true", help="sample again (minutes) instead of reusing"
    )
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from service.engine.bundled_model import prepare_model

    torch.set_num_threads(2)
    model_path = prepare_model().path
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if args.resample or not SAMPLED_FILE.exists():
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        sampled = sample_sequences(model, tokenizer)
        SAMPLED_FILE.write_text(json.dumps(sampled, separators=(",", ":")) + "\n")
    sampled = json.loads(SAMPLED_FILE.read_text())
    seqs = [Sequence(**s) for s in sampled["sequences"]]
    seqs += natural_sequences(tokenizer) + math_sequences(tokenizer)
    corpus = {
        "model": "SmolLM2-135M-Instruct",
        "continuation_tokens": CONTINUATION_TOKENS,
        "sampling_log": sampled["log"],
        "sequences": [asdict(s) for s in seqs],
    }
    CORPUS_FILE.write_text(json.dumps(corpus, separators=(",", ":")) + "\n")
    for s in seqs:
        print(
            f"{s.name}: prompt {len(s.prompt_ids)} + {len(s.continuation_ids)} tokens, "
            f"distinct-4 {s.distinct_4:.3f}"
        )


if __name__ == "__main__":
    main()
