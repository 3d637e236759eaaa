"""README.md's metrics table and a Prometheus exposition, both as ``{name: label names}``.

Shared by tests/observability/test_metrics.py (the table against a running service's /metrics)
and tests/deploy/test_monitoring.py (the dashboard's and the alert rules' metrics against the
table).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
# Rows of the table that a single CPU process cannot show; their meaning says so.
CUDA_ONLY = "on CUDA only"
SUPERVISOR_ONLY = "with `runtime.processes` > 1 only"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def exported(text: str) -> dict[str, frozenset[str] | None]:
    """Every metric family of an exposition under the name a query uses (counters with
    ``_total``), with the label names of its samples (None for a family with no sample yet)."""
    out: dict[str, frozenset[str] | None] = {}
    families = list(text_string_to_metric_families(text))
    # prometheus_client writes a counter's or histogram's creation time as a family of its own
    # (``X_created``, text format 0.0.4): part of X, not a metric to document.
    timed = {f.name for f in families if f.type in ("counter", "histogram")}
    for fam in families:
        if fam.name.endswith("_created") and fam.name.removesuffix("_created") in timed:
            continue
        name = f"{fam.name}_total" if fam.type == "counter" else fam.name
        labels = {k for s in fam.samples for k in s.labels} - {"le", "quantile"}
        out[name] = frozenset(labels) if fam.samples else None
    return out


def exposition_types(text: str) -> dict[str, str]:
    """{name (as in :func:`exported`): type} of an exposition."""
    return {
        (f"{fam.name}_total" if fam.type == "counter" else fam.name): fam.type
        for fam in text_string_to_metric_families(text)
    }


class Row(NamedTuple):
    labels: frozenset[str]
    type: str  # counter, gauge, histogram
    meaning: str


def readme_table() -> dict[str, Row]:
    """README.md's metrics table: {name: Row}. A row may list several names (``a``, ``b``) with
    as many types (``gauge, counter``; one type for all when it gives one)."""
    text = README.read_text()
    section = text.split("### Health and metrics", 1)[1]
    table = section[section.index("| metric | type | meaning |") :].split("\n\n", 1)[0]
    rows: dict[str, Row] = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 3, f"README metrics table row with {len(cells)} cells: {line}"
        names, kinds, meaning = cells
        types = [k.strip().split(" ")[0] for k in kinds.split(",")]
        for i, token in enumerate(re.findall(r"`([^`]+)`", names)):
            m = re.fullmatch(r"([a-z_:][a-z0-9_:]*)(?:\{([a-z_,]*)\})?", token)
            assert m, f"README metrics table: cannot read {token!r}"
            labels = frozenset(filter(None, (m.group(2) or "").split(",")))
            assert m.group(1) not in rows, f"{m.group(1)} is listed twice"
            kind = types[min(i, len(types) - 1)]
            assert kind in ("counter", "gauge", "histogram"), f"{m.group(1)}: type {kind!r}"
            rows[m.group(1)] = Row(labels, kind, meaning)
    assert len(rows) > 20, rows
    return rows
