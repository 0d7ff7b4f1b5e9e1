"""What the fidelity study runs: policy configurations, budgets, and their labels."""

from __future__ import annotations

from dataclasses import dataclass, replace

from raas_backend.policies import KVPolicyConfig

DENSE = KVPolicyConfig(name="dense")
LITERAL_ALPHA = 1e-4  # the paper's rule: mass > 1e-4 in any head of any layer
# Quest with one page set per layer for all heads (quest_selection="layer"): the
# engine's first quest, kept beside the paper's per-KV-group selection ("quest").
QUEST_LAYER = "quest head-agg"


@dataclass(frozen=True)
class Grid:
    """Sizes of one study run (the full study or the smoke test's miniature)."""

    budgets: tuple[int, ...]
    select_budget: int  # the budget at which raas variants are compared
    # raas variants compared: (head_agg, layer_agg, alpha, refresh_top_fraction).
    variants: tuple[tuple[str, str, float, float], ...]
    continuation_tokens: int
    prompt_tokens: int | None  # None: the corpus's prompts as they are
    free_run_tokens: int
    free_run_budgets: tuple[int, ...]
    free_run_prompts: tuple[str, ...]  # corpus sequence names whose prompts are used
    # The first N sequences of each kind in the corpus: the 2-core CPU's time budget.
    sequences_per_kind: int = 2
    page_size: int = 16


FULL = Grid(
    budgets=(128, 256, 512, 1024),
    select_budget=512,
    # Alpha ranges differ by aggregation: a mean over heads or layers is smaller than a max.
    variants=(
        ("max", "max", LITERAL_ALPHA, 0.0),
        ("max", "max", 1e-2, 0.0),
        ("max", "max", 0.1, 0.0),
        ("max", "mean", 1e-2, 0.0),
        ("mean", "max", 1e-2, 0.0),
        ("mean", "mean", 1e-3, 0.0),
        ("mean", "mean", 1e-2, 0.0),
        ("max", "max", 0.99, 0.25),
    ),
    continuation_tokens=2048,
    prompt_tokens=None,
    free_run_tokens=512,
    free_run_budgets=(128,),
    free_run_prompts=("math-problem-set-1",),
    sequences_per_kind=1,
)

SMOKE = Grid(
    budgets=(32, 48),
    select_budget=32,
    variants=(
        ("max", "max", LITERAL_ALPHA, 0.0),
        ("mean", "mean", 1e-2, 0.0),
        ("max", "max", 0.99, 0.25),
    ),
    continuation_tokens=80,
    prompt_tokens=24,
    free_run_tokens=64,
    free_run_budgets=(32,),
    free_run_prompts=("math-problem-set-1",),
)


def baseline(name: str, budget: int) -> KVPolicyConfig:
    """A baseline by its label (a policy name, or QUEST_LAYER) at a budget."""
    if name == QUEST_LAYER:
        return KVPolicyConfig(name="quest", budget_tokens=budget, quest_selection="layer")
    # H2O's paper splits its budget evenly between heavy hitters and the recent window.
    recent = budget // 2 if name == "h2o" else KVPolicyConfig.recent_tokens
    return KVPolicyConfig(name=name, budget_tokens=budget, recent_tokens=recent)


def raas_variants(grid: Grid, budget: int) -> list[KVPolicyConfig]:
    return [
        KVPolicyConfig(
            name="raas",
            budget_tokens=budget,
            alpha=alpha,
            head_agg=head,
            layer_agg=layer,
            refresh_top_fraction=frac,
        )
        for head, layer, alpha, frac in grid.variants
    ]


def at_budget(config: KVPolicyConfig, budget: int) -> KVPolicyConfig:
    if config.name == "h2o":
        return baseline("h2o", budget)
    return replace(config, budget_tokens=budget)


def label(config: KVPolicyConfig) -> str:
    """A short name for a configuration, without its budget."""
    if config.name == "quest" and config.quest_selection == "layer":
        return QUEST_LAYER
    if config.name != "raas":
        return config.name
    text = f"raas {config.head_agg}/{config.layer_agg} a={config.alpha:g}"
    if config.refresh_top_fraction:
        text += f" top={config.refresh_top_fraction:g}"
    return text


def variant_key(config: KVPolicyConfig) -> dict[str, float | str]:
    """The raas parameters a server default is made of."""
    return {
        "alpha": config.alpha,
        "head_agg": config.head_agg,
        "layer_agg": config.layer_agg,
        "refresh_top_fraction": config.refresh_top_fraction,
    }
