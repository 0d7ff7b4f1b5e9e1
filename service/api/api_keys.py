"""API keys: where they come from (a file, a secret env var) and what each one may do.

Two file formats, chosen by the first character:

JSON (`{` or `[`): `{"keys": [{"key": "sk-...", "name": "team-a", "max_concurrency": 4,
"max_budget_tokens": 1024, ...}]}` or the bare list. `key_sha256` (hex) may replace
`key` so the file holds no secret.

Text: one key per line, then optional `field=value` pairs; `#` starts a comment;
list fields are comma-separated:
`sk-team-a name=team-a max_concurrency=4 max_budget_tokens=1024 allowed_policies=raas,dense`

`RAAS_API_KEYS` adds comma-separated keys with no limits of their own.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from raas_backend import policy_spec as spec
from raas_backend.policy_spec import PolicyName

LIST_FIELDS = frozenset({"allowed_policies"})


class ApiKeyError(ValueError):
    """The keys file or secret cannot be read or is invalid."""


class ApiKey(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: SecretStr | None = None
    key_sha256: str | None = None
    name: str | None = None
    max_concurrency: int | None = Field(default=None, ge=1)
    max_budget_tokens: int | None = Field(default=None, ge=1)
    default_budget_tokens: int | None = Field(default=None, ge=1)
    default_policy: PolicyName | None = None
    default_alpha: float | None = None
    allowed_policies: tuple[PolicyName, ...] | None = None
    # The output cap of this key's requests that set no max_tokens (the server's if None).
    default_max_tokens: int | None = Field(default=None, ge=1)

    @field_validator("key_sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.lower()
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError("expected key_sha256 to be 64 hex digits")
        return value

    @field_validator("default_alpha")
    @classmethod
    def _alpha_range(cls, value: float | None) -> float | None:
        if value is not None and (problem := spec.alpha_problem(value)):
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _one_secret(self) -> Self:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("expected exactly one of key or key_sha256")
        if self.key is not None and not self.key.get_secret_value().strip():
            raise ValueError("expected a non-empty key")
        if (
            self.max_budget_tokens is not None
            and self.default_budget_tokens is not None
            and self.default_budget_tokens > self.max_budget_tokens
        ):
            raise ValueError("expected default_budget_tokens <= max_budget_tokens")
        if (
            self.allowed_policies is not None
            and self.default_policy is not None
            and self.default_policy not in self.allowed_policies
        ):
            raise ValueError("expected default_policy among allowed_policies")
        return self

    @property
    def digest(self) -> str:
        if self.key is not None:
            return sha256_hex(self.key.get_secret_value())
        return self.key_sha256 or ""

    @property
    def label(self) -> str:
        """A name safe to log: never the key itself."""
        return self.name or f"key-{self.digest[:8]}"


def sha256_hex(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class KeyStore:
    """Looks keys up by their SHA-256 digest, so the secret is never compared directly."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._by_digest: dict[str, ApiKey] = {}
        for key in keys:
            if key.digest in self._by_digest:
                raise ApiKeyError(f"duplicate API key {key.label!r}")
            self._by_digest[key.digest] = key

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def __len__(self) -> int:
        return len(self._by_digest)

    def lookup(self, token: str) -> ApiKey | None:
        digest = sha256_hex(token)
        key = self._by_digest.get(digest)
        # The dict lookup already matched; compare_digest keeps the final check constant-time.
        if key is not None and hmac.compare_digest(key.digest, digest):
            return key
        return None


def parse_keys_text(text: str, source: str = "keys file") -> list[ApiKey]:
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        return _parse_json(stripped, source)
    return _parse_lines(text, source)


def _parse_json(text: str, source: str) -> list[ApiKey]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiKeyError(f"{source}: invalid JSON: {exc.msg} (line {exc.lineno})") from exc
    entries = data.get("keys") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ApiKeyError(f'{source}: expected a list of keys or {{"keys": [...]}}')
    return [_model(entry, f"{source}: entry {i}") for i, entry in enumerate(entries)]


def _parse_lines(text: str, source: str) -> list[ApiKey]:
    keys = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        token, *pairs = content.split()
        fields: dict[str, Any] = {"key": token}
        for pair in pairs:
            name, sep, value = pair.partition("=")
            if not sep:
                raise ApiKeyError(f"{source}: line {lineno}: expected field=value, got {pair!r}")
            fields[name] = value.split(",") if name in LIST_FIELDS else value
        keys.append(_model(fields, f"{source}: line {lineno}"))
    return keys


def _model(data: Any, where: str) -> ApiKey:
    try:
        return ApiKey.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "entry"
        raise ApiKeyError(f"{where}: {loc}: {first['msg']}") from exc


def check_budget_range(keys: Iterable[ApiKey], lo: int, hi: int) -> None:
    """Every key's budgets must lie in the server's [lo, hi]: a cap under the server's
    minimum would be widened to it silently, and a default outside the range would turn
    every request that sets no budget into an error."""
    for key in keys:
        for field, value in (
            ("max_budget_tokens", key.max_budget_tokens),
            ("default_budget_tokens", key.default_budget_tokens),
        ):
            if value is not None and not lo <= value <= hi:
                raise ApiKeyError(
                    f"API key {key.label!r}: {field}={value} is outside the server's "
                    f"budget range [{lo}, {hi}] (RAAS_KV_MIN_BUDGET_TOKENS, "
                    f"RAAS_KV_MAX_BUDGET_TOKENS)"
                )


def check_max_tokens(keys: Iterable[ApiKey], limit: int) -> None:
    """A key's default output cap above the server's max_tokens limit would turn each of
    its requests that sets no max_tokens into an error."""
    for key in keys:
        if key.default_max_tokens is not None and key.default_max_tokens > limit:
            raise ApiKeyError(
                f"API key {key.label!r}: default_max_tokens={key.default_max_tokens} is "
                f"above the server's max_tokens limit {limit} (RAAS_MAX_TOKENS_LIMIT)"
            )


def load_key_store(
    path: Path | None,
    env_keys: SecretStr | None,
    budget_range: tuple[int, int] | None = None,
    max_tokens_limit: int | None = None,
) -> KeyStore:
    """The keys from the file and the secret; checked against `budget_range` and
    `max_tokens_limit` when given."""
    keys: list[ApiKey] = []
    if path is not None:
        try:
            text = path.read_text()
        except OSError as exc:
            raise ApiKeyError(f"cannot read API keys file {path}: {exc.strerror}") from exc
        keys.extend(parse_keys_text(text, source=str(path)))
    if env_keys is not None:
        tokens = [t.strip() for t in env_keys.get_secret_value().split(",") if t.strip()]
        keys.extend(
            ApiKey(key=SecretStr(t), name=f"env-{i}") for i, t in enumerate(tokens, start=1)
        )
    if budget_range is not None:
        check_budget_range(keys, *budget_range)
    if max_tokens_limit is not None:
        check_max_tokens(keys, max_tokens_limit)
    return KeyStore(keys)
