"""KV policies: one file each behind the `KVPolicy` interface."""

from __future__ import annotations

from raas_backend.paging import PageTable
from raas_backend.policies.base import KVPolicy
from raas_backend.policies.config import (
    POLICY_NAMES,
    KVPolicyConfig,
    PolicyConfigError,
)
from raas_backend.policies.dense import DensePolicy
from raas_backend.policies.h2o import H2OPolicy
from raas_backend.policies.quest import QuestPolicy
from raas_backend.policies.raas import RaaSPolicy
from raas_backend.policies.streaming import StreamingPolicy

POLICIES: dict[str, type[KVPolicy]] = {
    cls.name: cls for cls in (RaaSPolicy, DensePolicy, StreamingPolicy, H2OPolicy, QuestPolicy)
}
assert set(POLICIES) == set(POLICY_NAMES)


def make_policy(config: KVPolicyConfig, prompt_len: int) -> KVPolicy:
    """A fresh policy with its page table for a request whose prompt has prompt_len tokens."""
    return POLICIES[config.name](
        config, PageTable(prompt_len=prompt_len, page_size=config.page_size)
    )


__all__ = [
    "POLICIES",
    "POLICY_NAMES",
    "KVPolicy",
    "KVPolicyConfig",
    "PolicyConfigError",
    "make_policy",
]
