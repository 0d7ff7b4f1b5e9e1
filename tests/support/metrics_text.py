"""Reading a Prometheus text endpoint in tests."""

from __future__ import annotations

import httpx


def gateway_metric(url: str, name: str, **labels: str) -> float:
    """Sum of a metric over its series that carry `labels` (0 when labels match none)."""
    total, found = 0.0, False
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] == name and all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
            found = True
    assert found or labels, f"{name} not exported"
    return total
