"""Insights: why a route misses the prefix cache (prompt shape), how prefix-version rollouts
warm up, and what the cache saves (tokens, GPU time, money). See docs/insights.md.

The core modules (`shape`, `versions`, `savings`, `redact`) are pure: no I/O, no clock, no
metrics library. `recorder` glues them to the request path; the handlers turn its outcomes
into metrics and serve its snapshot at ``GET /admin/insights``.
"""

from router.insights.recorder import InsightsRecorder, InsightTicket, Outcome, disabled_snapshot
from router.insights.redact import redact_shape
from router.insights.savings import Pricing, SavingsBook, reads_to_repay
from router.insights.shape import FingerprintTable, ShapeAdvisor, ShapeSample, content_chunks
from router.insights.versions import VersionTracker

__all__ = [
    "FingerprintTable",
    "InsightTicket",
    "InsightsRecorder",
    "Outcome",
    "Pricing",
    "SavingsBook",
    "ShapeAdvisor",
    "ShapeSample",
    "VersionTracker",
    "content_chunks",
    "disabled_snapshot",
    "reads_to_repay",
    "redact_shape",
]
