"""Static checks of the scale-out deployment files (no Docker, no cluster here): the compose `scaleout` profile and
the nginx template agree on names, ports and paths; the Kubernetes manifests validate against the API schemas
(kubernetes-validate, offline) and reference each other correctly; ingress-nginx gets the template's map."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig

from app.settings import Settings
from h2o_cache import CachePolicy
from h2o_cache.budget import session_nbytes, slot_nbytes
from tests.scaleout.conftest import NGINX, REPO, TEMPLATE, free_port, render

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
K8S = REPO / "deploy/k8s"
TEMPLATE_TEXT = TEMPLATE.read_text()


def upstream_servers(path: Path) -> list[tuple[str, int]]:
    return [(m.group(1), int(m.group(2))) for m in re.finditer(r"^server\s+([\w.-]+):(\d+)\b", path.read_text(), re.M)]


def bind_mounts(service: str) -> dict[str, str]:
    """Repo path -> container path."""
    specs = [v.split(":") for v in SERVICES[service].get("volumes", [])]
    return {source[2:]: target for source, target, *_ in specs if source.startswith("./")}


def map_block(text: str) -> str:
    return re.search(r"^\s*map .*?^\s*\}\s*$", text, re.S | re.M).group(0)


def normalized(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


# --- compose and nginx ---


def test_template_placeholders_are_the_ones_compose_sets():
    placeholders = set(re.findall(r"\$\{(\w+)\}", TEMPLATE_TEXT))
    router = SERVICES["router"]
    assert placeholders == {"H2O_ROUTER_LISTEN", "H2O_UPSTREAMS"}
    assert placeholders <= set(router["environment"])
    assert re.match(router["environment"]["NGINX_ENVSUBST_FILTER"], "H2O_UPSTREAMS")
    assert not re.match(router["environment"]["NGINX_ENVSUBST_FILTER"], "uri"), "nginx's $variables must survive"
    # The image renders /etc/nginx/templates/<name>.template; the upstream file is where the template includes it.
    target = bind_mounts("router")["deploy/nginx/h2o-router.conf.template"]
    assert re.fullmatch(r"/etc/nginx/templates/[\w.-]+\.conf\.template", target)
    assert bind_mounts("router")["deploy/nginx/upstreams.compose.conf"] == router["environment"]["H2O_UPSTREAMS"]
    listen = router["environment"]["H2O_ROUTER_LISTEN"]
    assert f"{listen}:{listen}" in router["ports"]


def test_every_upstream_is_a_replica_sharing_the_snapshot_volume():
    servers = upstream_servers(REPO / "deploy/nginx/upstreams.compose.conf")
    assert len(servers) >= 2
    names = set()
    for host, port in servers:
        service = SERVICES[host]
        env = service["environment"]
        assert int(env["H2O_PORT"]) == port
        assert f"snapshots:{env['H2O_SNAPSHOT_DIR']}" in service["volumes"], f"{host} does not share the snapshots"
        names.add(env["H2O_REPLICA_NAME"])
        assert service.get("image", "h2o-serve:latest") == SERVICES["server"]["image"]
        assert host == "server" or service["profiles"] == ["scaleout"]
        assert host in SERVICES["router"]["depends_on"]
    assert len(names) == len(servers), "replica names (X-H2O-Replica) must differ"
    assert SERVICES["router"]["profiles"] == ["scaleout"]


def test_prometheus_sees_every_replica():
    """The default Prometheus scrapes `server`; the profile's agent scrapes the others and remote-writes to it."""
    default = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    agent_service = SERVICES["prometheus-replicas"]
    agent_config_path = next(
        p for p, t in bind_mounts("prometheus-replicas").items() if t in " ".join(agent_service["command"])
    )
    agent = yaml.safe_load((REPO / agent_config_path).read_text())
    assert "--enable-feature=agent" in agent_service["command"]
    default_targets = {t for job in default["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    agent_targets = {t for job in agent["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    upstreams = {f"{h}:{p}" for h, p in upstream_servers(REPO / "deploy/nginx/upstreams.compose.conf")}
    assert default_targets | agent_targets == upstreams and not default_targets & agent_targets
    assert {j["job_name"] for j in agent["scrape_configs"]} == {j["job_name"] for j in default["scrape_configs"]}
    (remote,) = agent["remote_write"]
    assert re.fullmatch(r"http://prometheus:9090/api/v1/write", remote["url"])
    assert "--web.enable-remote-write-receiver" in SERVICES["prometheus"]["command"]
    if shutil.which("promtool"):
        result = subprocess.run(
            ["promtool", "check", "config", "--agent", str(REPO / agent_config_path)], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(NGINX is None, reason="nginx not installed")
def test_nginx_accepts_the_compose_rendering(tmp_path):
    """`nginx -t` on the template as compose renders it (replica names pointed at loopback: nginx resolves them)."""
    upstreams = (REPO / "deploy/nginx/upstreams.compose.conf").read_text()
    for host, _ in upstream_servers(REPO / "deploy/nginx/upstreams.compose.conf"):
        upstreams = re.sub(rf"^server {re.escape(host)}:\d+", f"server 127.0.0.1:{free_port()}", upstreams, flags=re.M)
    (tmp_path / "upstreams.conf").write_text(upstreams)
    (tmp_path / "router.conf").write_text(
        render(
            TEMPLATE_TEXT,
            {"H2O_ROUTER_LISTEN": f"127.0.0.1:{free_port()}", "H2O_UPSTREAMS": str(tmp_path / "upstreams.conf")},
        )
    )
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path / 'nginx.pid'};\nevents {{}}\nhttp {{ include {tmp_path / 'router.conf'}; }}\n"
    )
    result = subprocess.run(
        [NGINX, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", str(tmp_path / "error.log")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


# --- Kubernetes ---


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def base_resources() -> dict[tuple[str, str], dict]:
    kustomization = load(K8S / "base/kustomization.yaml")
    docs = [load(K8S / "base" / name) for name in kustomization["resources"]]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def merge(base: dict, patch: dict) -> dict:
    """Strategic merge as kustomize does it for what the overlays patch: maps merge, lists of named items
    (containers, env) merge by name, other lists are replaced."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        elif (
            isinstance(value, list)
            and value
            and all(isinstance(v, dict) and "name" in v for v in value)
            and isinstance(out.get(key), list)
        ):
            by_name = {item["name"]: item for item in out[key]}
            for item in value:
                by_name[item["name"]] = merge(by_name.get(item["name"], {}), item)
            out[key] = list(by_name.values())
        else:
            out[key] = copy.deepcopy(value)
    return out


def overlays() -> dict[str, dict[tuple[str, str], dict]]:
    """Each overlay's resources: the base with its patches merged and its image tags set."""
    result = {}
    for overlay in sorted((K8S / "overlays").iterdir()):
        kustomization = load(overlay / "kustomization.yaml")
        assert kustomization["resources"] == ["../../base"]
        resources = base_resources()
        for patch_ref in kustomization.get("patches", []):
            patch = load(overlay / patch_ref["path"])
            key = (patch["kind"], patch["metadata"]["name"])
            assert key in resources, f"{overlay.name} patches {key}, which the base does not define"
            resources[key] = merge(resources[key], patch)
        for image in kustomization.get("images", []):
            for resource in resources.values():
                for c in resource.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                    if c["image"].split(":")[0] == image["name"]:
                        c["image"] = f"{image['name']}:{image['newTag']}"
        result[overlay.name] = resources
    return result


def test_kubernetes_manifests_validate_against_the_api_schemas():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    version = kubernetes_validate.latest_version()
    documents = [
        *base_resources().values(),
        *[r for o in overlays().values() for r in o.values()],
        load(K8S / "ingress-nginx/controller-configmap.yaml"),
    ]
    for document in documents:
        kubernetes_validate.validate(document, version, strict=True)


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_kubernetes_resources_reference_each_other(overlay):
    resources = overlays()[overlay]
    deployment = resources[("Deployment", "h2o-serve")]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == int(env["H2O_PORT"]) and env["H2O_HOST"] == "0.0.0.0"
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert any(
        e["name"] == "H2O_REPLICA_NAME" and e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        for e in container["env"]
    )
    # Snapshots: the RWX claim, mounted where H2O_SNAPSHOT_DIR points.
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == env["H2O_SNAPSHOT_DIR"]
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    claim = resources[("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    # Service -> pods, Ingress -> Service.
    service = resources[("Service", "h2o-serve")]
    assert service["spec"]["selector"].items() <= labels.items()
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in ports
    ingress = resources[("Ingress", "h2o-serve")]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert (backend["name"], backend["port"]["name"]) == (service["metadata"]["name"], service_port["name"])
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$session_key"
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert "non_idempotent" in annotations["nginx.ingress.kubernetes.io/proxy-next-upstream"]
    # CPU and GPU variants.
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert {"cpu", "memory"} <= set(requests) and "memory" in limits
    if overlay == "gpu":
        assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"] == "1"
        assert env["H2O_DEVICE"] == "cuda" and container["image"].endswith(":cuda")
    else:
        assert "nvidia.com/gpu" not in requests and env["H2O_DEVICE"] == "cpu"


def test_ingress_nginx_gets_the_template_map():
    """ingress-nginx cannot include the template: its http-snippet carries the same map, line for line."""
    snippet = load(K8S / "ingress-nginx/controller-configmap.yaml")["data"]["http-snippet"]
    assert normalized(map_block(snippet)) == normalized(map_block(TEMPLATE_TEXT))
    assert "$session_key" in map_block(snippet).splitlines()[0]


def quantity(text: str) -> int:
    """A Kubernetes memory/storage quantity (``6Gi``, ``512Mi``) in bytes."""
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", text).groups()
    return int(number) * 1024 ** (1 + ("Ki", "Mi", "Gi", "Ti").index(unit) if unit else 0)


SMOLLM2 = LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576, head_dim=64)
"""SmolLM2-135M's cache shape (what the capacity formula needs of a model)."""


def readme_slot_bytes() -> list[tuple[str, str, int]]:
    """deploy/README.md's table of bytes per slot and KV head: (kv_dtype, model dtype, bytes)."""
    text = (REPO / "deploy/README.md").read_text()
    return [(m[1], m[2], int(m[3])) for m in re.finditer(r"^\| `(\w+)` \| (fp32|fp16|any) \| (\d+) \|", text, re.M)]


def test_the_capacity_table_is_the_formula_in_code():
    """Each row of the README's table times layers x KV heads is h2o_cache.budget's bytes per slot."""
    table = readme_slot_bytes()
    assert {"auto", "fp16", "int8", "k8v4", "int4"} <= {kv_dtype for kv_dtype, _, _ in table}
    policy = CachePolicy.parse(Settings().policy, slack=Settings().policy_slack)
    for kv_dtype, model_dtype, per_head in table:
        for dtype in (
            [torch.float32, torch.float16]
            if model_dtype == "any"
            else [{"fp32": torch.float32, "fp16": torch.float16}[model_dtype]]
        ):
            assert slot_nbytes(SMOLLM2, policy.replace(kv_dtype=kv_dtype), dtype) == 30 * 3 * per_head, kv_dtype


def test_capacity_formula_matches_a_real_cache():
    from transformers import LlamaForCausalLM

    from h2o_cache import make_cache

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    model = LlamaForCausalLM(config).eval()
    for kv_dtype in ("auto", "k8v4"):
        cache = make_cache(model, f"h2o_2_8_24_{kv_dtype}", slack=8)
        with torch.inference_mode():
            model(input_ids=torch.randint(0, 64, (1, 40)), past_key_values=cache, use_cache=True)
        assert cache.nbytes() == session_nbytes(config, cache.policy, model.dtype)


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_kubernetes_sizes_hold_what_the_settings_allow(overlay):
    """Memory limits, GPU memory and the snapshot volume fit the resident and stored sessions each overlay allows,
    by the capacity formula, for SmolLM2 under the server's default policy and KV storage. The batching pool holds
    up to H2O_MAX_BATCH rows of capacity + 2 x slack slots, each with its decoded working copy (bounded here by a
    model-dtype slot)."""
    resources = overlays()[overlay]
    deployment = resources[("Deployment", "h2o-serve")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    settings = Settings()
    policy = CachePolicy.parse(settings.policy, slack=settings.policy_slack, kv_dtype=settings.kv_dtype)
    dtype = torch.float16 if env["H2O_DEVICE"] == "cuda" else torch.float32
    per_session = session_nbytes(SMOLLM2, policy, dtype)
    resident = int(env["H2O_MAX_RESIDENT_SESSIONS"]) * per_session
    row_slots = policy.capacity + 2 * policy.slack
    row = row_slots * (
        slot_nbytes(SMOLLM2, policy, dtype) + slot_nbytes(SMOLLM2, policy.replace(kv_dtype="auto"), dtype)
    )
    pool = settings.max_batch * row
    weights = 135_000_000 * dtype.itemsize
    if overlay == "gpu":
        assert resident + pool + weights <= 20 * 1024**3  # a 24 GB card, with room for activations
    else:
        assert resident + pool + weights + 1024**3 <= quantity(container["resources"]["limits"]["memory"])
    claim = resources[("PersistentVolumeClaim", "h2o-snapshots")]
    stored = deployment["spec"]["replicas"] * int(env["H2O_MAX_SESSIONS"]) * per_session
    assert stored <= quantity(claim["spec"]["resources"]["requests"]["storage"])
