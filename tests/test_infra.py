"""The operations material in ``infra/``: every file parses, and everything it names is real.

Fast and offline. Alert rules and the dashboard may only use metrics that walink (shared/metrics.py)
or prometheus_client's default collectors export, or ``up``; the Kubernetes manifests may only set
``WALINK_*`` variables that are fields of :class:`Settings` (which refuses any other), and the
environment each container gets must load into a valid :class:`Settings`. When ``promtool`` is on
the PATH (or named by ``PROMTOOL``), the rules are also checked and unit-tested with it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client import REGISTRY

from shared import metrics
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
PROMETHEUS = INFRA / "prometheus"
K8S = INFRA / "k8s"
DASHBOARD = INFRA / "grafana" / "walink.json"
MIB = 1024 * 1024
DS_UID = "${DS_PROMETHEUS}"
JOBS = {"walink-worker", "walink-gateway"}

# (alert, severity, comparison, seed value, the metric it is computed from)
SEED_THRESHOLDS = [
    ("WalinkQrGenerationSlow", "warning", ">", "12", "walink_qr_generation_seconds_bucket"),
    ("WalinkQrGenerationSlow", "critical", ">", "20", "walink_qr_generation_seconds_bucket"),
    ("WalinkPhoneExtractionSlow", "warning", ">", "8", "walink_phone_extraction_seconds_bucket"),
    ("WalinkPhoneExtractionSlow", "critical", ">", "15", "walink_phone_extraction_seconds_bucket"),
    ("WalinkLinkSuccessRateLow", "warning", "<", "95", "walink_links_total"),
    ("WalinkLinkSuccessRateLow", "critical", "<", "90", "walink_links_total"),
    ("WalinkProcessMemoryHigh", "warning", ">", "400", "process_resident_memory_bytes"),
    ("WalinkProcessMemoryHigh", "critical", ">", "600", "process_resident_memory_bytes"),
    ("WalinkActiveSessionsHigh", "warning", ">", "30", "walink_sessions"),
    ("WalinkActiveSessionsHigh", "critical", ">", "50", "walink_sessions"),
    ("WalinkProcessCpuHigh", "warning", ">", "70", "process_cpu_seconds_total"),
    ("WalinkProcessCpuHigh", "critical", ">", "90", "process_cpu_seconds_total"),
]
REQUIRED_PANELS = [
    "QR generation time p50 / p95",
    "Phone extraction time p50 / p95",
    "Links by outcome",
    "Sessions by status per worker",
    "QR queue: active / waiting",
    "Warm pool ready",
    "Browsers",
    "Browser memory (PSS) per worker",
    "Process memory (RSS)",
    "Gateway requests by outcome",
]


# ------------------------------------------------------------------------------------------ helpers
def _yaml(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def _one_yaml(path: Path) -> dict[str, Any]:
    docs = _yaml(path)
    assert len(docs) == 1 and isinstance(docs[0], dict), path
    doc: dict[str, Any] = docs[0]
    return doc


def _alert_rules() -> list[dict[str, Any]]:
    groups = _one_yaml(PROMETHEUS / "alerts.yml")["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _k8s_objects() -> dict[str, dict[str, Any]]:
    """Every object in infra/k8s by ``Kind/name``."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _yaml(path):
            key = f"{doc['kind']}/{doc.get('metadata', {}).get('name', path.name)}"
            assert key not in objects, f"{key} defined twice"
            objects[key] = doc
    return objects


def _dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return board


def _panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _dashboard_exprs(board: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in _panels(board) for t in p.get("targets", [])]


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}


def _exported_metrics() -> set[str]:
    """Sample names walink's processes expose: its own metrics (labelled ones too, before their
    first sample), prometheus_client's default collectors, and Prometheus's own ``up``."""
    assert metrics.QR_SECONDS is not None  # imported for its registrations
    names = {"up"}
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


_PROMQL_WORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}
)


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (function names, label names and keywords left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", text):
        if match.group(1).lower() not in _PROMQL_WORDS:
            names.add(match.group(1))
    return names


def _jobs_selected(expr: str) -> set[str]:
    jobs: set[str] = set()
    for op, value in re.findall(r'\bjob\s*(=~|=)\s*"([^"]*)"', expr):
        jobs.update(value.split("|") if op == "=~" else [value])
    return jobs


def _settings_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(Settings)}


def _quantity_bytes(value: str) -> int:
    units = {"Ki": 1024, "Mi": MIB, "Gi": 1024 * MIB, "K": 1000, "M": 1000**2, "G": 1000**3}
    for unit, factor in units.items():
        if value.endswith(unit):
            return int(float(value[: -len(unit)]) * factor)
    return int(value)


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


def _container_env(
    container: dict[str, Any], objects: dict[str, dict[str, Any]], pod_name: str
) -> dict[str, str]:
    """The environment Kubernetes gives the container: envFrom first, env over it, ``$(VAR)``
    expanded from earlier entries, secrets taken from the template's placeholders."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(
            {k: str(v) for k, v in objects[f"ConfigMap/{source['configMapRef']['name']}"]["data"].items()}
        )
    for item in container.get("env", []):
        if "value" in item:
            value = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], str(item["value"]))
        elif "fieldRef" in item["valueFrom"]:
            assert item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
            value = pod_name
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            value = str(objects[f"Secret/{ref['name']}"]["stringData"][ref["key"]])
        env[item["name"]] = value
    return env


def _promtool() -> str:
    found = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not found:
        pytest.skip("promtool is not installed (Debian: the prometheus package carries it)")
    return found


def _run(*args: str, cwd: Path) -> str:
    done = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


# ------------------------------------------------------------------------------------------ parsing
def test_every_infra_file_parses() -> None:
    files = sorted(p for p in INFRA.rglob("*") if p.suffix in {".yml", ".yaml", ".json"})
    assert len(files) >= 12
    for path in files:
        if path.suffix == ".json":
            assert isinstance(json.loads(path.read_text(encoding="utf-8")), dict), path
        else:
            assert _yaml(path), path


def test_promql_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, source) (rate(a_bucket{job="x",worker=~"$worker"}'
        '[$__rate_interval]))) / on (instance) group_left b > 12 and absent(up{job="y"} == 1)'
    )
    assert promql_metric_names(expr) == {"a_bucket", "b", "up"}


# ------------------------------------------------------------------------------------------ alerts
def test_alert_rules_are_complete() -> None:
    rules = _alert_rules()
    assert len(rules) >= 20
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"Walink[A-Z]\w+", name), name
        assert re.fullmatch(r"\d+[smh]", str(rule["for"])), name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"].strip(), name
        assert rule["annotations"]["description"].strip(), name


def test_alerts_use_only_exported_metrics_and_scraped_jobs() -> None:
    exported = _exported_metrics()
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total"} <= exported  # Linux collector
    for rule in _alert_rules():
        used = promql_metric_names(rule["expr"])
        assert used, rule["alert"]
        assert used <= exported, f"{rule['alert']}: unknown metric(s) {sorted(used - exported)}"
        jobs = _jobs_selected(rule["expr"])
        assert jobs and jobs <= JOBS, f"{rule['alert']} selects jobs {jobs}"


@pytest.mark.parametrize(("alert", "severity", "op", "value", "metric"), SEED_THRESHOLDS)
def test_seed_thresholds(alert: str, severity: str, op: str, value: str, metric: str) -> None:
    matching = [r for r in _alert_rules() if r["alert"] == alert and r["labels"]["severity"] == severity]
    assert len(matching) == 1, (alert, severity)
    expr = matching[0]["expr"]
    assert re.search(rf"{re.escape(op)}\s*{value}(?![\d.])", expr), expr
    assert metric in promql_metric_names(expr)


def test_memory_thresholds_are_in_mib() -> None:
    for rule in _alert_rules():
        if "memory" in rule["alert"].lower():
            assert "/ 1024 / 1024 >" in rule["expr"], rule["alert"]


def test_exact_quantile_bounds_are_buckets() -> None:
    """alerts.yml says p95 > 8, 12 and 20 s are exact because those are bucket bounds."""
    assert {8.0, 12.0, 20.0} <= set(metrics._LATENCY_BUCKETS_S)


# ------------------------------------------------------------------------------------------ prometheus
def test_local_scrape_config_matches_the_default_ports() -> None:
    config = _one_yaml(PROMETHEUS / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == JOBS
    defaults = Settings()
    gateway_targets = [t for sc in jobs["walink-gateway"]["static_configs"] for t in sc["targets"]]
    assert gateway_targets == [f"127.0.0.1:{defaults.gateway_port}"]
    worker_targets = [t for sc in jobs["walink-worker"]["static_configs"] for t in sc["targets"]]
    assert worker_targets == defaults.workers.split(",")
    relabel = jobs["walink-worker"]["relabel_configs"]
    assert {"source_labels": ["__address__"], "target_label": "worker"} in relabel


def test_k8s_scrape_config_names_workers_as_they_name_themselves() -> None:
    config = _one_yaml(PROMETHEUS / "prometheus-k8s.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == JOBS
    worker_label = [r for r in jobs["walink-worker"]["relabel_configs"] if r.get("target_label") == "worker"]
    assert len(worker_label) == 1
    statefulset = _k8s_objects()["StatefulSet/walink-worker"]
    env = _container_env(_pod_spec(statefulset)["containers"][0], _k8s_objects(), "walink-worker-2")
    assert worker_label[0]["replacement"].replace("${1}", "walink-worker-2") == env["WALINK_WORKER_NAME"]


# ------------------------------------------------------------------------------------------ grafana
def test_dashboard_model() -> None:
    board = _dashboard()
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    assert board["uid"] and board["title"]
    panels = list(_panels(board))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in panels}
    for title in REQUIRED_PANELS:
        assert any(t.startswith(title) for t in titles), title
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == DS_UID, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DS_UID, panel["title"]
    for var in board["templating"]["list"]:
        assert var["datasource"]["uid"] == DS_UID


def test_dashboard_panels_do_not_overlap() -> None:
    boxes = [p["gridPos"] for p in _panels(_dashboard())]
    cells: set[tuple[int, int]] = set()
    for box in boxes:
        assert box["x"] + box["w"] <= 24
        mine = {
            (x, y) for x in range(box["x"], box["x"] + box["w"]) for y in range(box["y"], box["y"] + box["h"])
        }
        assert not mine & cells, box
        cells |= mine


def test_dashboard_uses_only_exported_metrics() -> None:
    board = _dashboard()
    exported = _exported_metrics()
    exprs = _dashboard_exprs(board)
    assert len(exprs) >= 20
    for expr in exprs:
        used = promql_metric_names(expr)
        assert used and used <= exported, f"{expr}: unknown {sorted(used - exported)}"
        assert _jobs_selected(expr) <= JOBS, expr
    for var in board["templating"]["list"]:
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["definition"])
        assert match, var["definition"]
        assert promql_metric_names(match.group(1)) <= exported


# ------------------------------------------------------------------------------------------ kubernetes
def test_k8s_objects_and_kustomization() -> None:
    objects = _k8s_objects()
    kustomization = objects.pop("Kustomization/kustomization.yaml")
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    assert "secret.example.yaml" not in kustomization["resources"]  # placeholders are never deployed
    expected = {
        "Namespace/walink",
        "ConfigMap/walink-config",
        "Secret/walink-secrets",
        "Service/walink-workers",
        "StatefulSet/walink-worker",
        "PodDisruptionBudget/walink-worker",
        "NetworkPolicy/walink-workers",
        "Job/walink-migrate",
        "Deployment/walink-gateway",
        "Service/walink-gateway",
    }
    assert set(objects) == expected


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)
    elif isinstance(node, str):
        yield node


def test_k8s_walink_variables_are_settings_fields() -> None:
    """Every WALINK_* name in the manifests (env names, ConfigMap and Secret keys, $(references))."""
    known = _settings_fields()
    seen = set()
    for key, obj in _k8s_objects().items():
        for text in _strings(obj):
            for name in re.findall(r"\bWALINK_[A-Z0-9_]+", text):
                seen.add(name)
                assert name.removeprefix("WALINK_").lower() in known, f"{key}: {name} is not a setting"
    assert len(seen) >= 10


def test_secret_template_holds_placeholders_only() -> None:
    secret = _k8s_objects()["Secret/walink-secrets"]
    assert set(secret["stringData"]) == {
        "WALINK_DATABASE_URL",
        "GATEWAY_DATABASE_URL",
        "OWNER_DATABASE_URL",
        "WALINK_REDIS_URL",
        "WALINK_SNAPSHOT_KEYS",
        "WALINK_INTERNAL_TOKEN",
    }
    for key, value in secret["stringData"].items():
        assert "CHANGE_ME" in value, key
    assert "data" not in secret


POD_KINDS = {"StatefulSet", "Deployment", "Job"}


def test_every_pod_spec_turns_service_links_off() -> None:
    for key, obj in _k8s_objects().items():
        if obj["kind"] in POD_KINDS:
            assert _pod_spec(obj)["enableServiceLinks"] is False, key


def test_every_pod_runs_as_non_root_without_privileges_on_a_read_only_image() -> None:
    pods = {key: _pod_spec(obj) for key, obj in _k8s_objects().items() if obj["kind"] in POD_KINDS}
    assert len(pods) == 3
    for key, pod in pods.items():
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True, key
        assert isinstance(context["runAsUser"], int) and context["runAsUser"] > 0, key
        assert context["seccompProfile"]["type"] in {"RuntimeDefault", "Localhost"}, key
        mounts = set()
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, key
            assert sc["readOnlyRootFilesystem"] is True, key
            assert sc["capabilities"] == {"drop": ["ALL"]}, key
            assert "privileged" not in sc and "runAsUser" not in sc, key
            mounts |= {m["mountPath"] for m in container.get("volumeMounts", [])}
        if not key.startswith("Job/"):
            assert "/tmp" in mounts, key  # a read-only image: somewhere to write temporary files


def test_chromium_sandbox_matches_the_worker_pods_seccomp_profile() -> None:
    """As non-root Chromium could sandbox itself, but its sandbox needs user namespaces, which the
    RuntimeDefault seccomp profile forbids: then it must be turned off, or Chromium cannot start."""
    objects = _k8s_objects()
    sts = objects["StatefulSet/walink-worker"]
    pod = _pod_spec(sts)
    settings = Settings.from_env(_container_env(pod["containers"][0], objects, "walink-worker-0"))
    seccomp = pod["securityContext"]["seccompProfile"]["type"]
    assert settings.chromium_sandbox is (seccomp == "Localhost"), (settings.chromium_sandbox, seccomp)
    # fsGroup: the non-root user owns the profiles' volume
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]


def _labels_match(selector: dict[str, Any], obj: dict[str, Any]) -> bool:
    labels = obj["spec"]["template"]["metadata"]["labels"]
    return bool(selector["matchLabels"].items() <= labels.items())


def test_only_the_gateway_and_prometheus_reach_the_workers() -> None:
    objects = _k8s_objects()
    policy = objects["NetworkPolicy/walink-workers"]["spec"]
    sts = objects["StatefulSet/walink-worker"]
    gateway = objects["Deployment/walink-gateway"]
    assert _labels_match(policy["podSelector"], sts)
    assert not _labels_match(policy["podSelector"], gateway)
    assert policy["policyTypes"] == ["Ingress"]  # what is not allowed below is denied
    (worker_port,) = _pod_spec(sts)["containers"][0]["ports"]
    sources = []
    for rule in policy["ingress"]:
        assert rule["ports"] == [{"port": worker_port["name"], "protocol": "TCP"}], rule
        (peer,) = rule["from"]
        assert "ipBlock" not in peer, peer  # no address range: pods by label only
        sources.append(peer)
    gateway_peers = [p for p in sources if "namespaceSelector" not in p]
    assert len(gateway_peers) == 1 and _labels_match(gateway_peers[0]["podSelector"], gateway)
    assert not _labels_match(gateway_peers[0]["podSelector"], sts)  # workers do not reach workers
    (prometheus,) = [p for p in sources if "namespaceSelector" in p]
    assert prometheus["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    assert prometheus["namespaceSelector"]["matchLabels"]  # one namespace, never all of them


def test_a_migration_job_owns_the_schema_and_the_gateway_role_has_no_ddl() -> None:
    objects = _k8s_objects()
    job = objects["Job/walink-migrate"]
    (migrate,) = _pod_spec(job)["containers"]
    job_settings = Settings.from_env(_container_env(migrate, objects, "walink-migrate-x"))
    owner = urlsplit(job_settings.database_url).username
    command = migrate["command"]
    assert command[:4] == ["python", "-m", "shared.cli", "migrate"]
    granted = {command[i + 1] for i, word in enumerate(command) if word == "--grant"}
    users = {}
    for key, name in (
        ("Deployment/walink-gateway", "walink-gateway-x"),
        ("StatefulSet/walink-worker", "walink-worker-0"),
    ):
        (container,) = _pod_spec(objects[key])["containers"]
        settings = Settings.from_env(_container_env(container, objects, name))
        assert settings.migrate_on_start is False, key  # no DDL at start: only a check
        users[key] = urlsplit(settings.database_url).username
    assert users["Deployment/walink-gateway"] not in {owner, users["StatefulSet/walink-worker"]}
    assert owner not in users.values()
    assert granted == set(users.values())  # row rights for exactly the roles that run walink


def test_worker_statefulset() -> None:
    objects = _k8s_objects()
    sts = objects["StatefulSet/walink-worker"]
    service = objects[f"Service/{sts['spec']['serviceName']}"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    pod = _pod_spec(sts)
    (container,) = pod["containers"]
    for ordinal in range(sts["spec"]["replicas"]):
        pod_name = f"{sts['metadata']['name']}-{ordinal}"
        settings = Settings.from_env(_container_env(container, objects, pod_name))
        assert settings.worker_name == f"{pod_name}.{service['metadata']['name']}:{settings.worker_port}"
        assert settings.advertise_url == f"http://{settings.worker_name}"
        assert settings.host == "0.0.0.0"

    settings = Settings.from_env(_container_env(container, objects, "walink-worker-0"))
    # shutdown: aiohttp's wait, the sessions' close and the warm pool's close, each up to the deadline
    assert pod["terminationGracePeriodSeconds"] > 3 * settings.shutdown_deadline_s
    assert pod["terminationGracePeriodSeconds"] > Settings().shutdown_deadline_s

    (port,) = container["ports"]
    assert port == {"name": "http", "containerPort": settings.worker_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe

    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert mounts[claim["metadata"]["name"]] == str(settings.data_dir)
    shm = {v["name"]: v for v in pod["volumes"]}[next(n for n, p in mounts.items() if p == "/dev/shm")]
    assert shm["emptyDir"]["medium"] == "Memory"

    limit = _quantity_bytes(container["resources"]["limits"]["memory"])
    request = _quantity_bytes(container["resources"]["requests"]["memory"])
    browsers = settings.max_active_sessions + settings.warm_pool_size
    # the warm pool grows after a burst within its memory budget
    assert request >= browsers * 250 * MIB + settings.warm_pool_memory_mb * MIB
    assert limit >= request + 600 * MIB  # the Python process's critical memory alert fits under it


def test_gateway_deployment_lists_the_worker_pods() -> None:
    objects = _k8s_objects()
    sts = objects["StatefulSet/walink-worker"]
    worker_container = _pod_spec(sts)["containers"][0]
    deployment = objects["Deployment/walink-gateway"]
    (container,) = _pod_spec(deployment)["containers"]
    settings = Settings.from_env(_container_env(container, objects, "walink-gateway-5d8f7-abcde"))
    assert settings.host == "0.0.0.0"
    (port,) = container["ports"]
    assert port == {"name": "http", "containerPort": settings.gateway_port}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    # the gateway names a configured worker host:port (gateway/membership.py parse_worker): each entry
    # must be the name that pod gives itself, or the pod is on the ring twice
    names = [
        Settings.from_env(_container_env(worker_container, objects, f"walink-worker-{i}")).worker_name
        for i in range(sts["spec"]["replicas"])
    ]
    assert settings.workers.split(",") == names
    service = objects["Service/walink-gateway"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"


# ------------------------------------------------------------------------------------------ tools
def test_promtool_checks_rules_and_local_config() -> None:
    promtool = _promtool()
    _run(promtool, "check", "rules", "alerts.yml", cwd=PROMETHEUS)
    _run(promtool, "check", "config", "prometheus.yml", cwd=PROMETHEUS)


def test_promtool_unit_tests_of_the_alerts() -> None:
    _run(_promtool(), "test", "rules", "alerts_test.yml", cwd=PROMETHEUS)


def test_promtool_parses_dashboard_queries(tmp_path: Path) -> None:
    promtool = _promtool()
    rules = [
        {
            "record": f"walink:dashboard_query_{i}",
            "expr": expr.replace("$__rate_interval", "1m").replace("$worker", ".*"),
        }
        for i, expr in enumerate(_dashboard_exprs(_dashboard()))
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    _run(promtool, "check", "rules", str(path), cwd=tmp_path)


def test_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl is not installed")
    built = [doc for doc in yaml.safe_load_all(_run(kubectl, "kustomize", str(K8S), cwd=ROOT)) if doc]
    assert {doc["kind"] for doc in built} == {
        "Namespace",
        "ConfigMap",
        "Service",
        "StatefulSet",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "Job",
        "Deployment",
    }
    assert all(doc["metadata"].get("namespace") == "walink" for doc in built if doc["kind"] != "Namespace")
