"""Run a Hugging Face causal LM with a KV policy and budget, in plain torch.

The oracle for the engine (SGLang's greedy output under a policy must equal this
module's, token for token, in fp32) and the tool for fidelity studies. The model keeps
its full cache; at every decode step each layer attends only to the positions the
policy retains, through an attention function registered with transformers, and the
per-page attention mass is computed from the same probabilities the output uses.

    from raas_backend.reference import PolicyRunner
    runner = PolicyRunner(model)
    result = runner.generate(prompt_ids, KVPolicyConfig(name="raas", budget_tokens=64), 200)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from raas_backend.kernels.torch_ref import attend_one, page_key_bounds, page_mass, quest_bounds
from raas_backend.policies import KVPolicyConfig
from raas_backend.request_kv import RequestKV

ATTN_NAME = "raas_reference"


@dataclass
class GenerationResult:
    tokens: list[int]
    retained_tokens: list[int] = field(default_factory=list)  # per step, after eviction
    stats: dict[str, int | str | float] = field(default_factory=dict)
    logits: list[torch.Tensor] = field(default_factory=list)  # per step, if kept


class _Active:
    """The request the attention function is serving (None outside decode steps)."""

    state: RequestKV | None = None


def _policy_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    state = _Active.state
    if state is None or query.shape[2] != 1:
        # Prefill (and anything outside a policy run) is ordinary causal attention.
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[0] != 1:
        raise ValueError(f"expected batch size 1 in the reference, got {query.shape[0]}")
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    q = query[0, :, 0, :]  # [Hq, D]
    keys = key[0].transpose(0, 1)  # [T, Hkv, D]
    values = value[0].transpose(0, 1)
    if state.selects_per_layer:
        table = state.table
        all_pos = table.retained_positions(table.retained)
        pages = table.token_pages(table.retained)
        decode = pages >= 0
        kmin, kmax = page_key_bounds(keys[all_pos[decode]], pages[decode], len(table.retained))
        state.select_for_layer(quest_bounds(q, kmin, kmax, scale), keys.shape[1])
    positions, token_page = state.positions()
    out, probs = attend_one(
        q,
        keys.index_select(0, positions),
        values.index_select(0, positions),
        scale,
        state.kv_head_mask(),
    )
    if state.needs_scores:
        state.add_layer_mass(page_mass(probs, token_page, len(state.pages)))
    return out.view(1, 1, *out.shape), None


AttentionInterface.register(ATTN_NAME, _policy_attention)


@contextmanager
def _serving(state: RequestKV) -> Iterator[None]:
    _Active.state = state
    try:
        yield
    finally:
        _Active.state = None


class PolicyRunner:
    """Greedy decoding and teacher forcing of an HF causal LM under a KV policy."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        model.set_attn_implementation(ATTN_NAME)
        model.eval()

    @torch.no_grad()
    def _step(self, token: int, position: int, past, state: RequestKV):
        with _serving(state):
            out = self.model(
                input_ids=torch.tensor([[token]]),
                position_ids=torch.tensor([[position]]),
                past_key_values=past,
                use_cache=True,
            )
        return out.logits[0, -1], out.past_key_values

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[int],
        config: KVPolicyConfig,
        max_new_tokens: int,
        *,
        keep_logits: bool = False,
    ) -> GenerationResult:
        """Greedy continuation under the policy; EOS is an ordinary token."""
        return self._run(prompt_ids, config, max_new_tokens, forced=None, keep_logits=keep_logits)

    @torch.no_grad()
    def teacher_force(
        self, prompt_ids: list[int], continuation: list[int], config: KVPolicyConfig
    ) -> GenerationResult:
        """Replay a fixed continuation under the policy, keeping each step's logits.

        logits[i] predicts continuation[i]; the first comes from the prefill.
        """
        return self._run(
            prompt_ids, config, len(continuation), forced=continuation, keep_logits=True
        )

    def _run(
        self,
        prompt_ids: list[int],
        config: KVPolicyConfig,
        n: int,
        *,
        forced: list[int] | None,
        keep_logits: bool,
    ) -> GenerationResult:
        out = self.model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1]
        state = RequestKV(config, prompt_len=len(prompt_ids))
        result = GenerationResult(tokens=[])
        position = len(prompt_ids)
        for i in range(n):
            if keep_logits:
                result.logits.append(logits.float().clone())
            token = forced[i] if forced is not None else int(logits.argmax())
            result.tokens.append(token)
            if i == n - 1:
                break
            state.begin_step()
            result.retained_tokens.append(state.table.retained_tokens)
            logits, past = self._step(token, position, past, state)
            position += 1
        result.stats = state.stats()
        return result
