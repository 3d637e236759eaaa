"""Write the PrometheusRule of k8s/components/monitoring from the plain rule file.

    python monitoring/sync_rules.py          # writes k8s/components/monitoring/prometheusrule.yaml
    python monitoring/sync_rules.py --check  # exit 1 if it differs from what would be written

monitoring/prometheus/streamer-rules.yaml is the one place the rules are edited (promtool checks
and unit-tests it); the PrometheusRule carries the same groups for the Prometheus Operator.
tests/deploy/test_monitoring.py fails when the two differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "monitoring" / "prometheus" / "streamer-rules.yaml"
TARGET = ROOT / "k8s" / "components" / "monitoring" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from monitoring/prometheus/streamer-rules.yaml by `python monitoring/sync_rules.py`:
# edit that file (promtool checks and unit-tests it), then run the script. Comments there explain
# each rule and the thresholds to adjust.
"""


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> Any:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render() -> str:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "streamer",
            "labels": {
                "app.kubernetes.io/name": "streamer",
                "app.kubernetes.io/component": "inference",
            },
        },
        "spec": {"groups": groups},
    }
    body = yaml.dump(rule, Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not TARGET.is_file() or TARGET.read_text() != text:
            print(f"{TARGET} is out of date: run python monitoring/sync_rules.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
