"""Prometheus text parsing and the few derivations the dashboards need: sums, rates between two
scrapes, and histogram quantiles over the buckets observed between two scrapes."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Metrics", "histogram_quantile", "parse_metrics", "rate"]

Labels = tuple[tuple[str, str], ...]


@dataclass
class Metrics:
    """One scrape: sample name -> {sorted label pairs -> value}."""

    samples: dict[str, dict[Labels, float]] = field(default_factory=dict)

    def has(self, name: str) -> bool:
        return name in self.samples

    def series(self, name: str, **match: str) -> list[tuple[dict[str, str], float]]:
        out = []
        for labels, v in self.samples.get(name, {}).items():
            d = dict(labels)
            if all(d.get(k) == want for k, want in match.items()):
                out.append((d, v))
        return out

    def get(self, name: str, **match: str) -> float | None:
        """Sum of the matching series; None when the metric does not exist (shown as a dash)."""
        if name not in self.samples:
            return None
        s = self.series(name, **match)
        if not s:
            return 0.0 if not self.samples[name] and not match else None
        return sum(v for _, v in s)

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for d, v in self.series(name):
            key = d.get(label, "")
            out[key] = out.get(key, 0.0) + v
        return out

    def buckets(self, name: str, **match: str) -> dict[float, float]:
        """Cumulative bucket counts of a histogram summed over its other labels: le -> count."""
        out: dict[float, float] = {}
        for d, v in self.series(name + "_bucket", **match):
            le = float(d.get("le", "inf"))
            out[le] = out.get(le, 0.0) + v
        return out


def parse_metrics(text: str) -> Metrics:
    m = Metrics()
    for fam in text_string_to_metric_families(text):
        # A declared family without samples yet (a labelled counter nobody incremented) is a real 0,
        # not a missing value: record its names so sums give 0 instead of a dash.
        for suffix in ("", "_total") if fam.type == "counter" else ("",):
            m.samples.setdefault(fam.name + suffix, {})
        for s in fam.samples:
            labels: Labels = tuple(sorted(s.labels.items()))
            m.samples.setdefault(s.name, {})[labels] = float(s.value)
    return m


def rate(cur: float | None, prev: float | None, dt: float) -> float | None:
    if cur is None or prev is None or dt <= 0:
        return None
    d = cur - prev
    return max(d, 0.0) / dt if d >= 0 else None  # a counter reset: no rate this round


def histogram_quantile(q: float, cur: Mapping[float, float], prev: Mapping[float, float] | None = None
                       ) -> float | None:
    """Quantile of the observations between two scrapes (all observations when no previous scrape, or
    none in between), interpolated inside the bucket as Prometheus does. None without data."""
    if not cur:
        return None
    window = {le: cur[le] - (prev or {}).get(le, 0.0) for le in cur}
    if prev is None or max(window.values(), default=0.0) <= 0 or min(window.values(), default=0.0) < 0:
        window = dict(cur)
    return _quantile(q, sorted(window.items()))


def _quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    bs = list(buckets)
    if not bs:
        return None
    total = bs[-1][1]
    if total <= 0:
        return None
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in bs:
        if count >= rank:
            if math.isinf(le):
                return prev_le  # the top finite bound, as Prometheus
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le
