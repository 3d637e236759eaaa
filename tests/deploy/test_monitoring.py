"""Alerts and dashboard: checked by promtool, unit-tested, held against what streamer exports.

* ``monitoring/prometheus/streamer-rules.yaml`` passes ``promtool check rules``, and
  ``promtool test rules`` runs its unit tests (input series, expected alerts with their labels and
  annotations); every alert has a test where it fires.
* The PrometheusRule in ``k8s/components/monitoring`` carries exactly those groups.
* Every query of the Grafana dashboard (``monitoring/grafana/streamer.json``) is valid PromQL
  (promtool checks them as recording rules), and the dashboard has the panels an operator needs.
* Every metric the rules and the dashboard read is one the service exports: a name (or a
  histogram's ``_bucket``/``_sum``/``_count``) of README.md's metrics table, which
  tests/observability/test_metrics.py compares with a running service's ``/metrics``; or a
  recording rule of the rule file; or one of the few kube-state-metrics series named below.

promtool comes from the Debian package ``prometheus`` (``.ci/system-deps`` installs it).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from observability.readme_metrics import HISTOGRAM_SUFFIXES, readme_table

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
RULES = MONITORING / "prometheus" / "streamer-rules.yaml"
RULE_TESTS = MONITORING / "prometheus" / "streamer-rules.test.yaml"
DASHBOARD = MONITORING / "grafana" / "streamer.json"
PROMETHEUS_RULE = ROOT / "k8s" / "components" / "monitoring" / "prometheusrule.yaml"

# Series the rules read that streamer does not export: kube-state-metrics' view of the pods.
EXTERNAL = {
    "kube_pod_container_status_restarts_total": "container restarts (crash loops, OOM kills)",
    "kube_pod_container_status_ready": "readiness (/readyz) as Kubernetes sees it",
}
# Labels Prometheus adds to every scraped series (ServiceMonitor / kubernetes_sd), plus the
# supervisor's `worker` and the container label of kube-state-metrics' series.
TARGET_LABELS = {"namespace", "job", "pod", "instance", "service", "endpoint", "container"}
TARGET_LABELS |= {"worker"}
# Grafana's variables, as promtool should see the queries.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$namespace": "streamer",
    "$job": "streamer",
}
PROMQL_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan", "sum", "min", "max", "avg", "count", "stddev", "stdvar",
    "topk", "bottomk", "quantile", "count_values", "group", "limitk", "limit_ratio",
}  # fmt: skip
# What the dashboard must show (the list): one metric for each.
DASHBOARD_MUST_READ = {
    "throughput in": "streamer_records_consumed_total",
    "throughput out": "streamer_records_published_total",
    "DLQ rate by reason": "streamer_records_dead_lettered_total",
    "lag per partition": "streamer_consumer_lag",
    "held": "streamer_held_records",
    "in flight": "streamer_in_flight_records",
    "oldest uncommitted age": "streamer_oldest_uncommitted_age_seconds",
    "batch size": "streamer_batch_size_records_sum",
    "padding": "streamer_batch_padding_ratio_sum",
    "inference latency": "streamer_inference_duration_seconds_bucket",
    "end-to-end p50/p99": "streamer_end_to_end_latency_seconds_bucket",
    "OOM splits": "streamer_out_of_memory_total",
    "send retries": "streamer_send_retries_total",
    "send failures": "streamer_send_failures_total",
    "commit age": "streamer_last_commit_timestamp_seconds",
    "RSS": "process_resident_memory_bytes",
    "CPU": "process_cpu_seconds_total",
    "restarts": "kube_pod_container_status_restarts_total",
    "worker restarts": "streamer_worker_restarts_total",
}


# --- promtool ----------------------------------------------------------------------------------


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool is not installed: install the Debian package `prometheus` "
            "(`apt-get install prometheus`, which .ci/system-deps does) so the alert rules can be "
            "checked and unit-tested"
        )
    return found


def run_promtool(*args: str, cwd: Path) -> str:
    result = subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def test_rules_pass_promtool_check() -> None:
    out = run_promtool("check", "rules", RULES.name, cwd=RULES.parent)
    assert "SUCCESS" in out, out


def test_rules_pass_their_promtool_unit_tests() -> None:
    out = run_promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert "SUCCESS" in out, out


def test_promtool_unit_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    """The unit tests are not vacuous: a rule with a wrong threshold fails them."""
    broken = RULES.read_text().replace("> 600", "> 6000")
    assert broken != RULES.read_text()
    (tmp_path / RULES.name).write_text(broken)
    (tmp_path / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
    result = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode != 0
    assert "StreamerNoCommits" in result.stdout + result.stderr


def rule_groups() -> list[dict[str, Any]]:
    return yaml.safe_load(RULES.read_text())["groups"]


def rules() -> list[dict[str, Any]]:
    return [r for g in rule_groups() for r in g["rules"]]


def test_every_alert_has_a_unit_test_where_it_fires() -> None:
    alerts = {r["alert"] for r in rules() if "alert" in r}
    assert len(alerts) >= 10, alerts
    tests = yaml.safe_load(RULE_TESTS.read_text())
    assert tests["rule_files"] == [RULES.name]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert not alerts - firing, f"alerts without a test where they fire: {alerts - firing}"
    assert not (firing | quiet) - alerts, f"tests of unknown alerts: {(firing | quiet) - alerts}"
    assert len(quiet) >= len(alerts) // 2, "most alerts also need a case where they stay quiet"


def test_alerts_are_labelled_and_explained() -> None:
    for rule in rules():
        if "alert" not in rule:
            assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", rule["record"]), rule["record"]
            continue
        name = rule["alert"]
        assert name.startswith("Streamer"), name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert {"summary", "description"} <= set(rule["annotations"]), name


# --- the PrometheusRule ---------------------------------------------------------------------


def _sync_rules() -> Any:
    spec = importlib.util.spec_from_file_location("sync_rules", MONITORING / "sync_rules.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prometheusrule_carries_the_rule_file() -> None:
    sync = _sync_rules()
    assert PROMETHEUS_RULE.read_text() == sync.render(), (
        f"{PROMETHEUS_RULE.relative_to(ROOT)} differs from {RULES.relative_to(ROOT)}: run "
        "`python monitoring/sync_rules.py`"
    )
    rule = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == rule_groups()


# --- the dashboard ---------------------------------------------------------------------------


@cache
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dash["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows
    return out


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query, Grafana's variables filled in."""
    out = []
    for panel in panels(dashboard()):
        for target in panel.get("targets", []):
            out.append((panel["title"], grafana_to_promql(target["expr"])))
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert m, f"variable {var['name']}: {query}"
            out.append((f"${var['name']}", grafana_to_promql(m.group(1))))
    return out


def grafana_to_promql(expr: str) -> str:
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def test_dashboard_is_a_grafana_dashboard_with_its_variables() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "job"} <= set(variables)
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dash):
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel["targets"]:
            # one install at a time: every streamer series is narrowed to the chosen job
            for name in promql_metric_names(target["expr"])[0]:
                if name.startswith(("streamer_", "process_")):
                    assert re.search(rf'{name}\{{[^}}]*job="\$job"', target["expr"]), (
                        f'{panel["title"]}: {name} without job="$job"'
                    )


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every dashboard query (as recording rules of a scratch rule file)."""
    queries = dashboard_queries()
    scratch = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}:check", "expr": expr}
                    for i, (_, expr) in enumerate(queries)
                ],
            }
        ]
    }
    (tmp_path / "dashboard-rules.yaml").write_text(yaml.safe_dump(scratch))
    out = run_promtool("check", "rules", "dashboard-rules.yaml", cwd=tmp_path)
    assert f"{len(queries)} rules found" in out, out


def test_dashboard_shows_what_an_operator_needs() -> None:
    read = set().union(*(promql_metric_names(expr)[0] for _, expr in dashboard_queries()))
    missing = {what: name for what, name in DASHBOARD_MUST_READ.items() if name not in read}
    assert not missing, f"the dashboard has no panel for {missing}"
    text = json.dumps(dashboard())
    assert "histogram_quantile(0.99" in text and "histogram_quantile(0.5" in text


# --- the metrics they read ---------------------------------------------------------------------


def promql_metric_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) a PromQL expression mentions.

    Not a parser, but enough for these expressions (promtool checks their syntax): strings,
    label matchers, grouping clauses, ranges, offsets and numbers are taken out, then every
    identifier not followed by ``(`` (a function or an aggregation) and not a keyword is a name.
    """
    labels: set[str] = set()
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)

    def matchers(m: re.Match[str]) -> str:
        labels.update(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", m.group(1)))
        return " "

    def grouping(m: re.Match[str]) -> str:
        labels.update(x.strip() for x in m.group(2).split(",") if x.strip())
        return " "

    e = re.sub(r"\{([^}]*)\}", matchers, e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", grouping, e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\boffset\s+-?\w+", " ", e)
    e = re.sub(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?", " ", e)
    names = set()
    for m in re.finditer(r"([a-zA-Z_:][\w:]*)(\s*\()?", e):
        if m.group(2) is None and m.group(1) not in PROMQL_KEYWORDS:
            names.add(m.group(1))
    return names, labels


def test_promql_metric_names_reads_these_expressions() -> None:
    names, labels = promql_metric_names(
        'sum by (namespace, job) (rate(a_total{kind="x y", job=~"s.*"}[5m] offset 1h)) / '
        "on (pod) group_left (worker) b_bucket > 1e3 and max_over_time(c[15m:1m]) "
        "unless d offset 15m or histogram_quantile(0.99, sum by (le) (e)) > bool 0.5"
    )
    assert names == {"a_total", "b_bucket", "c", "d", "e"}
    assert labels == {"namespace", "job", "kind", "pod", "worker", "le"}
    assert promql_metric_names("time() - x:y:sum")[0] == {"x:y:sum"}


def used_metrics() -> dict[str, set[str]]:
    """{metric name: where it is read} over the alert rules and the dashboard."""
    out: dict[str, set[str]] = {}
    for rule in rules():
        for name in promql_metric_names(rule["expr"])[0]:
            out.setdefault(name, set()).add(f"rule {rule.get('alert') or rule.get('record')}")
    for title, expr in dashboard_queries():
        for name in promql_metric_names(expr)[0]:
            out.setdefault(name, set()).add(f"panel {title}")
    return out


def exported_name(name: str, table: dict[str, Any]) -> bool:
    if name in table:
        return True
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and base in table and table[base].type == "histogram":
            return True
    return False


def test_rules_and_dashboard_read_only_metrics_the_service_exports() -> None:
    table = readme_table()
    recorded = {r["record"] for r in rules() if "record" in r}
    unknown = {
        name: sorted(where)
        for name, where in used_metrics().items()
        if not exported_name(name, table) and name not in recorded and name not in EXTERNAL
    }
    assert not unknown, f"not exported by streamer (README.md's metrics table): {unknown}"
    # and the external ones are read by the rules, not only shown
    external_in_rules = {
        n for r in rules() for n in promql_metric_names(r["expr"])[0] if n in EXTERNAL
    }
    assert external_in_rules == set(EXTERNAL)


def test_rules_and_dashboard_use_labels_the_metrics_have() -> None:
    table = readme_table()
    known = set().union(*(row.labels for row in table.values())) | TARGET_LABELS | {"le"}
    exprs = [r["expr"] for r in rules()] + [expr for _, expr in dashboard_queries()]
    for expr in exprs:
        labels = promql_metric_names(expr)[1]
        assert labels <= known, (expr, labels - known)
    # the label values the rules select on are ones the service writes
    for rule in rules():
        for label, value in re.findall(r'(\w+)="([^"]*)"', rule["expr"]):
            if label == "kind":
                assert value in {"rejected", "fatal"}, rule["alert"]
            elif label == "client":
                assert value in {"consumer", "producer"}, rule["alert"]
            elif label == "container":
                assert value == "streamer", rule["alert"]  # the Deployment's container name
