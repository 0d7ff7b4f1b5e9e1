"""Per-position fidelity of each batch row against the dense row, and its summaries."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Fidelity:
    """One row's teacher-forced fidelity against dense over a sequence's positions."""

    mean_kl: float  # mean over positions of KL(dense || policy), nats
    p99_kl: float
    top1_agreement: float  # fraction of positions whose argmax equals dense's
    ppl: float  # perplexity of the forced tokens under the policy
    ppl_increase: float  # ppl / dense ppl - 1

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


class FidelityObserver:
    """Collects, at each position, every row's KL against `dense_row`, argmax agreement
    and the negative log-likelihood of the forced token (a `BatchedPolicyRunner` observer).
    """

    def __init__(self, targets: list[int] | None, dense_row: int = 0) -> None:
        self.targets = targets
        self.dense_row = dense_row
        self.kl: list[torch.Tensor] = []
        self.agree: list[torch.Tensor] = []
        self.nll: list[torch.Tensor] = []

    def __call__(self, i: int, logits: torch.Tensor) -> None:
        logp = torch.log_softmax(logits.double(), dim=-1)
        ref = logp[self.dense_row]
        # KL(dense || row) = sum_v p_dense (log p_dense - log p_row)
        self.kl.append((ref.exp() * (ref - logp)).sum(-1).clamp_min(0.0).float())
        self.agree.append(logits.argmax(-1) == logits[self.dense_row].argmax())
        if self.targets is not None:
            self.nll.append(-logp[:, self.targets[i]].float())

    def per_position_kl(self) -> torch.Tensor:
        """shape [positions, rows], float32."""
        return torch.stack(self.kl)

    def summary(self, row: int) -> Fidelity:
        kl = self.per_position_kl()[:, row]
        nll = torch.stack(self.nll)
        ppl = math.exp(float(nll[:, row].double().mean()))
        dense_ppl = math.exp(float(nll[:, self.dense_row].double().mean()))
        return Fidelity(
            mean_kl=float(kl.double().mean()),
            p99_kl=float(torch.quantile(kl.double(), 0.99)),
            top1_agreement=float(torch.stack(self.agree)[:, row].float().mean()),
            ppl=ppl,
            ppl_increase=ppl / dense_ppl - 1.0,
        )


def first_divergence(tokens: list[int], dense_tokens: list[int]) -> int | None:
    """The first position where a greedy run's token differs from dense's (None: never)."""
    for i, (a, b) in enumerate(zip(tokens, dense_tokens, strict=True)):
        if a != b:
            return i
    return None
