"""Evaluate every PromQL expression of the Grafana dashboard through Prometheus' HTTP API.

Grafana fills ``$__rate_interval`` itself (max(4 x scrape interval, panel interval)); outside Grafana we substitute a
fixed window chosen to fit the run (the ops test uses ``15s`` with a 1 s scrape interval). Any other ``$`` variable
is an error, so a panel added with a variable this module does not know about fails loudly instead of silently.
"""

from __future__ import annotations

import json
import math
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from loadtest.stack import REPO

DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "h2o-serve.json"


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref_id: str
    expr: str


@dataclass(frozen=True)
class QueryResult:
    query: PanelQuery
    promql: str
    n_series: int
    n_finite_points: int
    last_values: dict[str, float]

    @property
    def has_data(self) -> bool:
        return self.n_series > 0 and self.n_finite_points > 0


def panel_queries(path: Path = DASHBOARD) -> list[PanelQuery]:
    """Every target expression of every panel, rows' nested panels included."""
    dashboard = json.loads(path.read_text())
    panels = list(dashboard.get("panels", []))
    queries = []
    while panels:
        panel = panels.pop(0)
        panels.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            queries.append(PanelQuery(panel["title"], target["refId"], target["expr"]))
    return queries


def substitute(expr: str, rate_interval: str) -> str:
    promql = expr.replace("$__rate_interval", rate_interval)
    if "$" in promql:
        raise ValueError(f"unsupported Grafana variable in {expr!r}; only $__rate_interval is substituted")
    return promql


def query_range(prometheus_url: str, promql: str, start: float, end: float, step_s: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": promql, "start": start, "end": end, "step": step_s})
    with urllib.request.urlopen(f"{prometheus_url}/api/v1/query_range?{params}", timeout=30) as response:
        body = json.load(response)
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus rejected {promql!r}: {body}")
    return body["data"]["result"]


def evaluate(
    prometheus_url: str,
    start: float,
    end: float,
    rate_interval: str = "15s",
    step_s: float = 1.0,
    path: Path = DASHBOARD,
) -> list[QueryResult]:
    """Run every dashboard query over [start, end]; count series and finite points (histogram quantiles over an
    empty window are NaN, which Grafana draws as nothing)."""
    results = []
    for query in panel_queries(path):
        promql = substitute(query.expr, rate_interval)
        series = query_range(prometheus_url, promql, start, end, step_s)
        n_finite, last = 0, {}
        for one in series:
            values = [float(v) for _, v in one["values"]]
            n_finite += sum(math.isfinite(v) for v in values)
            last[json.dumps(one["metric"], sort_keys=True)] = values[-1]
        results.append(QueryResult(query, promql, len(series), n_finite, last))
    return results


def instant(prometheus_url: str, promql: str, at: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": promql, "time": at})
    with urllib.request.urlopen(f"{prometheus_url}/api/v1/query?{params}", timeout=30) as response:
        body = json.load(response)
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus rejected {promql!r}: {body}")
    return body["data"]["result"]
