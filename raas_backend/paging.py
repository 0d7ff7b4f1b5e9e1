"""Per-request page tables over engine slots.

A request's KV row holds positions 0..seq_len-1. The prompt (everything present at the
first decode step) is kept for the whole request. Decode positions are grouped into
logical pages of `page_size` tokens, page k covering positions
`[prompt_len + k*P, prompt_len + (k+1)*P)`. Pages are evicted whole; the tail page (the
one being written) never is. The table knows positions only: the engine maps positions
to slots through its own row (SGLang's `req_to_token`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PageTable:
    prompt_len: int
    page_size: int
    seq_len: int = 0
    # Logical page ids of retained decode pages, ascending (oldest first).
    retained: list[int] = field(default_factory=list)
    evicted_pages: int = 0
    evicted_tokens: int = 0
    peak_retained_tokens: int = 0

    def __post_init__(self) -> None:
        if self.seq_len < self.prompt_len:
            self.seq_len = self.prompt_len
        self.peak_retained_tokens = max(self.peak_retained_tokens, self.retained_tokens)

    @property
    def decode_len(self) -> int:
        return self.seq_len - self.prompt_len

    @property
    def num_pages(self) -> int:
        """Decode pages created so far (retained or not)."""
        return -(-self.decode_len // self.page_size)

    @property
    def tail_page(self) -> int | None:
        return self.num_pages - 1 if self.decode_len > 0 else None

    def page_tokens(self, page: int) -> int:
        if page == self.tail_page:
            return self.decode_len - page * self.page_size
        return self.page_size

    def page_positions(self, page: int) -> range:
        start = self.prompt_len + page * self.page_size
        return range(start, start + self.page_tokens(page))

    @property
    def retained_decode_tokens(self) -> int:
        return sum(self.page_tokens(p) for p in self.retained)

    @property
    def retained_tokens(self) -> int:
        """Tokens whose KV is held: prompt + retained decode pages."""
        return self.prompt_len + self.retained_decode_tokens

    def append_token(self) -> bool:
        """Account one new decode token; returns True if it opened a new page."""
        opens_page = self.decode_len % self.page_size == 0
        self.seq_len += 1
        if opens_page:
            self.retained.append(self.num_pages - 1)
        return opens_page

    def record_peak(self) -> None:
        """Fold what is held now into the peak: call once a step's eviction is done.

        The engine frees the victims before it allocates the new token's slot, so the
        count between `append_token` and `evict` (budget + 1) is never held at once.
        """
        self.peak_retained_tokens = max(self.peak_retained_tokens, self.retained_tokens)

    def evict(self, pages: list[int]) -> list[int]:
        """Drop pages from the table; returns the positions whose slots must be freed."""
        tail = self.tail_page
        positions: list[int] = []
        drop = set(pages)
        if tail in drop:
            raise ValueError(f"the tail page {tail} cannot be evicted")
        missing = drop.difference(self.retained)
        if missing:
            raise ValueError(f"pages {sorted(missing)} are not retained")
        for page in sorted(drop):
            positions.extend(self.page_positions(page))
        self.retained = [p for p in self.retained if p not in drop]
        self.evicted_pages += len(drop)
        self.evicted_tokens += len(positions)
        return positions

    def retained_positions(self, pages: list[int] | None = None) -> torch.Tensor:
        """Positions to attend: the prompt, then the given (default: retained) pages in order.

        shape: [n], dtype: torch.int64
        """
        parts = [torch.arange(self.prompt_len, dtype=torch.int64)]
        for page in self.retained if pages is None else pages:
            r = self.page_positions(page)
            parts.append(torch.arange(r.start, r.stop, dtype=torch.int64))
        return torch.cat(parts)

    def token_pages(self, pages: list[int] | None = None) -> torch.Tensor:
        """For each position of `retained_positions(pages)`, the index of its page in
        `pages` (or -1 for prompt tokens). shape: [n], dtype: torch.int64"""
        pages = self.retained if pages is None else pages
        parts = [torch.full((self.prompt_len,), -1, dtype=torch.int64)]
        for i, page in enumerate(pages):
            parts.append(torch.full((self.page_tokens(page),), i, dtype=torch.int64))
        return torch.cat(parts)

    def dense_equivalent_tokens(self) -> int:
        return self.seq_len
