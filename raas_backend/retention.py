"""How much of a request's decode KV is held, from host-known numbers alone.

Every freeing policy (raas, streaming, h2o) evicts whole non-tail pages, as few as
bring the retained decode tokens back within the budget; they differ only in *which*
pages go. So how many tokens are held, how many pages each step evicts and how long each
request's attention list is follow from (decode length, budget, page size): the
host can size and plan a decode step without reading the device's policy state, and
the device state can be checked against it.

With ``d`` decode tokens, ``n = ceil(d / P)`` pages and a tail of ``t = d - P (n - 1)``
tokens, the retained full pages are ``min(n - 1, floor((budget - t) / P))``: within a
page the tail grows and the bound only falls (an eviction fits it again); when a page
opens the tail restarts at 1 and at most one more full page fits.
"""

from __future__ import annotations


def retained_full_pages(decode_len: int, budget_tokens: int, page_size: int) -> int:
    """Full (non-tail) decode pages a freeing policy holds after `decode_len` tokens."""
    if decode_len <= 0:
        return 0
    pages = -(-decode_len // page_size)
    tail = decode_len - page_size * (pages - 1)
    return max(0, min(pages - 1, (budget_tokens - tail) // page_size))


def retained_decode_tokens(
    decode_len: int, budget_tokens: int, page_size: int, *, frees_memory: bool = True
) -> int:
    """Decode tokens held after the step that wrote token `decode_len` (and its eviction)."""
    if not frees_memory or decode_len <= 0:
        return max(0, decode_len)
    pages = -(-decode_len // page_size)
    tail = decode_len - page_size * (pages - 1)
    return tail + page_size * retained_full_pages(decode_len, budget_tokens, page_size)


def victims_at(
    decode_len: int, budget_tokens: int, page_size: int, *, frees_memory: bool = True
) -> int:
    """Pages evicted by the step that writes decode token `decode_len` (1-based)."""
    if not frees_memory or decode_len <= 1:
        return 0
    before = retained_full_pages(decode_len - 1, budget_tokens, page_size)
    opened = (decode_len - 1) % page_size == 0  # the old tail became a full page
    return before + int(opened) - retained_full_pages(decode_len, budget_tokens, page_size)


def attended_tokens(
    prompt_len: int,
    decode_len: int,
    budget_tokens: int,
    page_size: int,
    *,
    frees_memory: bool = True,
) -> int:
    """Length of the request's attention list at that step: the prompt, the retained
    pages and the tail (policies that attend every page they hold)."""
    return prompt_len + retained_decode_tokens(
        decode_len, budget_tokens, page_size, frees_memory=frees_memory
    )
