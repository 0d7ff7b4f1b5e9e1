"""The fidelity study: every policy against dense attention on the bundled model.

    python -m eval.study                 # the full study: docs/fidelity.md + docs/fidelity/
    python -m eval.study --report-only   # rewrite docs/fidelity.md from results.json
    python -m eval.study --smoke --out D # the test suite's miniature, into D
    python -m eval.study --rerun quest   # rerun one baseline everywhere, merge it in

Stages, each a few batched runs (`eval.batched_runner`; row 0 is always dense):

1. Selection: on the first sequence of each kind, every raas variant (aggregation x
   alpha, adaptive) and the baselines at the selection budget. The raas variant with
   the lowest mean KL over these sequences is the study's choice of server default.
2. Free running: greedy decoding from a prompt under each policy vs dense, first
   divergence position (before the budgets stage: it is short, and a time limit then
   cuts budget batches rather than it).
3. Budgets: on every sequence, streaming, h2o, both quests (per KV group, the paper's,
   and head-aggregated) and the chosen raas at every budget. The sequences not used for
   the choice are held out: the targets are checked on all of them.

A budget at or above the continuation length never evicts (and quest then attends
everything), so it equals dense exactly and is reported without a run.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch

from eval import milestones, report
from eval.batched_runner import BatchedPolicyRunner, BatchResult
from eval.corpus import CORPUS_FILE, Sequence, distinct_ngrams, load_corpus
from eval.fidelity_metrics import FidelityObserver, first_divergence
from eval.grid import (
    DENSE,
    FULL,
    QUEST_LAYER,
    SMOKE,
    Grid,
    at_budget,
    baseline,
    label,
    raas_variants,
)
from eval.grid import variant_key as variant_of
from raas_backend.policies import KVPolicyConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BASELINES = ("streaming", "h2o", "quest", QUEST_LAYER)
CURVE_STRIDE = 8
PROGRESS_EVERY = 256


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_model(model_path: Path, layers: int | None = None) -> torch.nn.Module:
    """The bundled model in float32; `layers` keeps only the first few (tests)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if layers is not None:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    return model.eval()


def _row_record(
    seq: Sequence, stage: str, config: KVPolicyConfig, obs: FidelityObserver, res, row: int
) -> dict:
    stats = res.stats[row]
    return {
        "sequence": seq.name,
        "kind": seq.kind,
        "stage": stage,
        "label": label(config),
        "policy": config.name,
        "budget": config.budget_tokens,
        "config": config.to_dict(),
        **obs.summary(row).to_dict(),
        "peak_retained_tokens": int(stats["peak_retained_tokens"]),
        "dense_equivalent_tokens": int(stats["dense_equivalent_tokens"]),
    }


def _kept(res: BatchResult, configs: list[KVPolicyConfig], page_size: int) -> list[dict]:
    """What each raas row keeps compared with a recent window of the same budget: the
    fraction of its retained pages older than that window, averaged over snapshots taken
    once the budget is full, and whether it ever differed from the window at all."""
    out = []
    for row, config in enumerate(configs):
        if config.name != "raas":
            continue
        window_pages = config.budget_pages
        old, differs, n = 0.0, False, 0
        for step, pages_per_row in res.snapshots:
            pages = pages_per_row[row]
            newest = (step - 1) // page_size
            if step <= config.budget_tokens or not pages:
                continue
            outside = [p for p in pages if p <= newest - window_pages]
            old += len(outside) / len(pages)
            differs = differs or bool(outside)
            n += 1
        out.append(
            {
                "label": label(config),
                "old_page_fraction": old / n if n else 0.0,
                "differs_from_window": differs,
            }
        )
    return out


def teacher_force(
    runner: BatchedPolicyRunner,
    seq: Sequence,
    configs: list[KVPolicyConfig],
    **kwargs,
) -> tuple[BatchResult, FidelityObserver]:
    obs = FidelityObserver(seq.continuation_ids)
    start = time.perf_counter()

    def observe(i: int, logits: torch.Tensor) -> None:
        obs(i, logits)
        if i and i % PROGRESS_EVERY == 0:
            _log(f"  position {i}: {time.perf_counter() - start:.0f} s")

    res = runner.run(
        seq.prompt_ids,
        configs,
        len(seq.continuation_ids),
        forced=seq.continuation_ids,
        observe=observe,
        **kwargs,
    )
    return res, obs


def _choose(records: list[dict], selection: list[str]) -> dict:
    """The raas variant with the lowest mean KL, averaged over the selection sequences."""
    by_label: dict[str, list[float]] = {}
    configs: dict[str, dict] = {}
    for r in records:
        if r["stage"] == "select" and r["policy"] == "raas":
            by_label.setdefault(r["label"], []).append(r["mean_kl"])
            configs[r["label"]] = r["config"]
    ranking = sorted(
        ((sum(v) / len(v), name) for name, v in by_label.items() if len(v) == len(selection)),
    )
    best = ranking[0][1]
    cfg = KVPolicyConfig(**configs[best])
    return {
        "label": best,
        "variant": variant_of(cfg),
        "ranking": [{"label": n, "mean_kl": k} for k, n in ranking],
    }


def _study_sequences(corpus: list[Sequence], grid: Grid) -> list[Sequence]:
    """The first `grid.sequences_per_kind` sequences of each kind, at the grid's sizes."""
    names = {k: [s.name for s in corpus if s.kind == k] for k in {s.kind for s in corpus}}
    return [
        s.truncated(grid.prompt_tokens, grid.continuation_tokens)
        for s in corpus
        if names[s.kind].index(s.name) < grid.sequences_per_kind
    ]


def _budgets_stage(
    runner: BatchedPolicyRunner,
    seqs: list[Sequence],
    grid: Grid,
    chosen: KVPolicyConfig,
    results: dict,
    out_of_time: Callable[[str], bool],
) -> None:
    """Every baseline and the chosen raas at every budget, one batch per sequence; a
    sequence that already has its budget rows in `results` (a resumed run) is skipped."""
    records = results["teacher_forced"]
    sel_names = results["meta"]["selection_sequences"]
    sb = grid.select_budget
    done = {r["sequence"] for r in records if r["stage"] == "budgets"}
    curve_seq = next((s for s in seqs if s.name not in sel_names), seqs[0])
    t0 = time.perf_counter()
    for seq in seqs:
        if seq.name in done:
            continue
        budgets = [b for b in grid.budgets if seq.name not in sel_names or b != sb]
        what = f"budgets {budgets} on {seq.name}"
        if out_of_time(what):
            continue
        configs = [DENSE] + [baseline(n, b) for b in budgets for n in BASELINES]
        configs += [at_budget(chosen, b) for b in budgets]
        _log(f"budgets {seq.name}: {len(configs)} rows")
        res, obs = teacher_force(runner, seq, configs)
        records += [_row_record(seq, "budgets", c, obs, res, b) for b, c in enumerate(configs)]
        if what in results["skipped"]:
            results["skipped"].remove(what)
        if seq is curve_seq:
            results["curves"] = {
                "sequence": seq.name,
                "step_stride": CURVE_STRIDE,
                "rows": [
                    {
                        "label": label(c),
                        "budget": c.budget_tokens,
                        "retained": res.retained_tokens[b][::CURVE_STRIDE],
                        "attended": res.attended_tokens[b][::CURVE_STRIDE],
                    }
                    for b, c in enumerate(configs)
                ],
            }
    timing = results["timing_s"]
    timing["budgets"] = timing.get("budgets", 0.0) + time.perf_counter() - t0


def _deadline_check(results: dict, time_limit_s: float | None) -> Callable[[str], bool]:
    deadline = None if time_limit_s is None else time.perf_counter() + time_limit_s

    def out_of_time(what: str) -> bool:
        if deadline is None or time.perf_counter() < deadline:
            return False
        if what not in results["skipped"]:
            results["skipped"].append(what)
        _log(f"time limit reached: skipped {what}")
        return True

    return out_of_time


def resume_study(
    model, corpus: list[Sequence], grid: Grid, out_dir: Path, time_limit_s: float | None = None
) -> dict:
    """Run the budget batches that an earlier run's time limit skipped (its
    results.json in `out_dir`), with that run's chosen default, and merge them in.
    The milestone plot, drawn from the selection stage, is left as it is."""
    results = json.loads((out_dir / "results.json").read_text())
    if json.loads(json.dumps(asdict(grid))) != results["meta"]["grid"]:
        raise ValueError(f"{out_dir / 'results.json'} was run on another grid; cannot resume it")
    chosen = KVPolicyConfig(
        name="raas", budget_tokens=grid.select_budget, **results["choice"]["variant"]
    )
    seqs = _study_sequences(corpus, grid)
    out_of_time = _deadline_check(results, time_limit_s)
    _budgets_stage(BatchedPolicyRunner(model), seqs, grid, chosen, results, out_of_time)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    report.plot_all(results, None, grid, out_dir)
    return results


def _label_old_quest(results: dict) -> None:
    """Results written before quest had two variants hold the head-aggregated one under
    the label "quest" (its config has no quest_selection): name it as it now is."""
    for r in results["teacher_forced"]:
        if r["policy"] == "quest" and "quest_selection" not in r["config"]:
            r["config"]["quest_selection"] = "layer"
            r["label"] = QUEST_LAYER
            for rows in (results["free_running"], (results.get("curves") or {}).get("rows", [])):
                for row in rows:
                    if row["label"] == "quest":
                        row["label"] = QUEST_LAYER


def rerun_baselines(
    model,
    corpus: list[Sequence],
    grid: Grid,
    out_dir: Path,
    names: tuple[str, ...],
    time_limit_s: float | None = None,
    sequences: tuple[str, ...] | None = None,
) -> dict:
    """Rerun the baselines `names` (labels: a policy name or QUEST_LAYER) on every
    sequence, budget and free-running prompt of an earlier run (its results.json in
    `out_dir`), or only on the named `sequences` (and free-running prompts), and put
    their rows in place of that run's. Each sequence is one batch of
    dense and these rows; a row's figures depend only on its own policy and dense (rows
    of a batch never interact), so they are what a whole new run would give them. The
    milestone plot, drawn from the selection stage, is left as it is."""
    results = json.loads((out_dir / "results.json").read_text())
    if json.loads(json.dumps(asdict(grid))) != results["meta"]["grid"]:
        raise ValueError(f"{out_dir / 'results.json'} was run on another grid; cannot rerun it")
    _label_old_quest(results)
    runner = BatchedPolicyRunner(model)
    seqs = _study_sequences(corpus, grid)
    if sequences is not None:
        unknown = sorted(set(sequences) - {s.name for s in seqs})
        if unknown:
            raise ValueError(f"expected sequences of the study, got {unknown}")
    sel_names = results["meta"]["selection_sequences"]
    sb = grid.select_budget
    out_of_time = _deadline_check(results, time_limit_s)
    t0 = time.perf_counter()
    for seq in seqs:
        what = f"rerun of {', '.join(names)} on {seq.name}"
        if sequences is not None and seq.name not in sequences:
            continue
        if out_of_time(what):
            continue
        if what in results["skipped"]:
            results["skipped"].remove(what)
        configs = [DENSE] + [baseline(n, b) for b in grid.budgets for n in names]
        _log(f"{what}: {len(configs)} rows")
        res, obs = teacher_force(runner, seq, configs)
        results["teacher_forced"] = [
            r
            for r in results["teacher_forced"]
            if not (r["sequence"] == seq.name and r["label"] in names)
        ]
        for b, c in enumerate(configs[1:], start=1):
            stage = "select" if seq.name in sel_names and c.budget_tokens == sb else "budgets"
            results["teacher_forced"].append(_row_record(seq, stage, c, obs, res, b))
        curves = results.get("curves") or {}
        if curves.get("sequence") == seq.name:
            curves["rows"] = [r for r in curves["rows"] if r["label"] not in names] + [
                {
                    "label": label(c),
                    "budget": c.budget_tokens,
                    "retained": res.retained_tokens[b][::CURVE_STRIDE],
                    "attended": res.attended_tokens[b][::CURVE_STRIDE],
                }
                for b, c in enumerate(configs)
                if b
            ]
    by_name = {s.name: s for s in seqs}
    for name in grid.free_run_prompts:
        seq = by_name.get(name)
        what = f"free running of {', '.join(names)} from {name}"
        if seq is None or (sequences is not None and name not in sequences):
            continue
        if out_of_time(what):
            continue
        if what in results["skipped"]:
            results["skipped"].remove(what)
        configs = [DENSE] + [baseline(n, b) for b in grid.free_run_budgets for n in names]
        _log(f"free running from {name}: {len(configs)} rows x {grid.free_run_tokens}")
        res = runner.run(seq.prompt_ids, configs, grid.free_run_tokens)
        results["free_running"] = [
            r for r in results["free_running"] if not (r["prompt"] == name and r["label"] in names)
        ]
        for b, c in enumerate(configs[1:], start=1):
            results["free_running"].append(
                {
                    "prompt": name,
                    "label": label(c),
                    "budget": c.budget_tokens,
                    "first_divergence": first_divergence(res.tokens[b], res.tokens[0]),
                    "distinct_4": distinct_ngrams(res.tokens[b]),
                }
            )
    key = f"rerun {', '.join(names)}"
    results["timing_s"][key] = results["timing_s"].get(key, 0.0) + time.perf_counter() - t0
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    report.plot_all(results, None, grid, out_dir)
    return results


def run_study(
    model, corpus: list[Sequence], grid: Grid, out_dir: Path, time_limit_s: float | None = None
) -> dict:
    """Run the stages; past `time_limit_s` the remaining budget and free-running batches
    are skipped (and listed in results["skipped"]), so one command has a bounded time."""
    runner = BatchedPolicyRunner(model)
    seqs = _study_sequences(corpus, grid)
    kinds = sorted({s.kind for s in seqs}, key=[s.kind for s in seqs].index)
    selection = [next(s for s in seqs if s.kind == k) for k in kinds]
    sel_names = [s.name for s in selection]
    results: dict = {
        "meta": {
            "grid": asdict(grid),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "selection_sequences": sel_names,
        },
        "corpus": [
            {
                "name": s.name,
                "kind": s.kind,
                "source": s.source,
                "prompt_tokens": len(s.prompt_ids),
                "continuation_tokens": len(s.continuation_ids),
                "distinct_4": s.distinct_4,
            }
            for s in seqs
        ],
        "teacher_forced": [],
        "kept": {},
        "milestones": {},
        "curves": {},
        "free_running": [],
        "timing_s": {},
        "skipped": [],
    }
    out_of_time = _deadline_check(results, time_limit_s)
    records = results["teacher_forced"]
    sb = grid.select_budget

    t0 = time.perf_counter()
    milestone_scores: dict[str, list[torch.Tensor]] = {}
    for k, seq in enumerate(selection):
        if k and out_of_time(f"selection on {seq.name}"):
            continue
        configs = [DENSE, *(baseline(n, sb) for n in BASELINES), *raas_variants(grid, sb)]
        _log(f"select {seq.name}: {len(configs)} rows x {len(seq.continuation_ids)} tokens")
        res, obs = teacher_force(runner, seq, configs, record_row=0, snapshot_every=grid.page_size)
        records += [_row_record(seq, "select", c, obs, res, b) for b, c in enumerate(configs)]
        results["kept"][seq.name] = _kept(res, configs, grid.page_size)
        results["milestones"][seq.name] = milestones.analyse(
            res.recorded_scores, grid.page_size, window=sb
        )
        milestone_scores[seq.name] = res.recorded_scores
    results["timing_s"]["select"] = time.perf_counter() - t0
    sel_names = [n for n in sel_names if n in milestone_scores]
    results["meta"]["selection_sequences"] = sel_names
    choice = _choose(records, sel_names)
    results["choice"] = choice
    chosen = KVPolicyConfig(name="raas", budget_tokens=sb, **choice["variant"])
    _log(f"chosen: {choice['label']}")

    t0 = time.perf_counter()
    by_name = {s.name: s for s in seqs}
    for name in grid.free_run_prompts:
        seq = by_name.get(name)
        if seq is None:
            _log(f"free running: no sequence {name} in the corpus, skipped")
            continue
        if out_of_time(f"free running from {name}"):
            continue
        configs = [DENSE]
        for b in grid.free_run_budgets:
            configs += [baseline(n, b) for n in BASELINES] + [at_budget(chosen, b)]
        _log(f"free running from {name}: {len(configs)} rows x {grid.free_run_tokens}")
        res = runner.run(seq.prompt_ids, configs, grid.free_run_tokens)
        dense_tokens = res.tokens[0]
        for b, c in enumerate(configs[1:], start=1):
            results["free_running"].append(
                {
                    "prompt": name,
                    "label": label(c),
                    "budget": c.budget_tokens,
                    "first_divergence": first_divergence(res.tokens[b], dense_tokens),
                    "distinct_4": distinct_ngrams(res.tokens[b]),
                }
            )
        results["free_running"].append(
            {
                "prompt": name,
                "label": "dense",
                "budget": None,
                "first_divergence": None,
                "distinct_4": distinct_ngrams(dense_tokens),
            }
        )
    results["timing_s"]["free_running"] = time.perf_counter() - t0

    _budgets_stage(runner, seqs, grid, chosen, results, out_of_time)

    out_dir.mkdir(parents=True, exist_ok=True)
    # Saved before plotting, so a plotting error never costs the run.
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    report.plot_all(results, milestone_scores, grid, out_dir)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the test suite's)")
    parser.add_argument("--out", type=Path, default=DOCS / "fidelity", help="plots + JSON")
    parser.add_argument("--doc", type=Path, default=None, help="markdown (default: docs/)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the markdown")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="run only the budget batches an earlier run's time limit skipped, and merge them",
    )
    parser.add_argument(
        "--rerun",
        nargs="+",
        default=None,
        metavar="BASELINE",
        help=f"rerun these baselines (of {', '.join(BASELINES)}) on an earlier run's "
        "sequences, budgets and free-running prompts, and merge them in",
    )
    parser.add_argument(
        "--sequences",
        nargs="+",
        default=None,
        help="with --rerun: only these sequences (and free-running prompts)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--corpus", type=Path, default=CORPUS_FILE)
    parser.add_argument(
        "--time-limit-min",
        type=float,
        default=None,
        help="skip the remaining budget/free-running batches past this many minutes",
    )
    parser.add_argument(
        "--per-kind", type=int, default=None, help="sequences per kind (default: the grid's)"
    )
    args = parser.parse_args(argv)
    doc = args.doc or (args.out / "fidelity.md" if args.smoke else DOCS / "fidelity.md")
    results_file = args.out / "results.json"
    if not args.report_only:
        from service.engine.bundled_model import prepare_model

        torch.set_num_threads(args.threads)
        grid = SMOKE if args.smoke else FULL
        start = time.perf_counter()
        model = load_model(prepare_model().path)
        if args.per_kind is not None:
            grid = replace(grid, sequences_per_kind=args.per_kind)
        limit = None if args.time_limit_min is None else 60 * args.time_limit_min
        corpus = load_corpus(args.corpus)
        if args.rerun:
            unknown = sorted(set(args.rerun) - set(BASELINES))
            if unknown:
                parser.error(f"--rerun: expected baselines of {BASELINES}, got {unknown}")
            only = tuple(args.sequences) if args.sequences else None
            results = rerun_baselines(
                model, corpus, grid, args.out, tuple(args.rerun), limit, sequences=only
            )
        else:
            study = resume_study if args.resume else run_study
            results = study(model, corpus, grid, args.out, limit)
        timing = results["timing_s"]
        timing["total"] = timing.get("total", 0.0) if args.resume or args.rerun else 0.0
        timing["total"] += time.perf_counter() - start
        results_file.write_text(json.dumps(results, indent=1) + "\n")
    results = json.loads(results_file.read_text())
    doc.write_text(report.markdown(results, plots=args.out, doc=doc))
    _log(f"wrote {doc} and {args.out}")


if __name__ == "__main__":
    main()
