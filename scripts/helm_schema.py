"""Write helm/pdserve/values.schema.json and the values table of helm/pdserve/README.md.

Usage: python scripts/helm_schema.py [--check]
The chart's own values are described here, once; `config` (what goes into pdserve.yaml) takes its
schema from the typed configuration (pdserve/config.py), so a key pdserve would refuse at start is
refused at `helm install` instead. tests/helm/test_chart.py fails when the files are not current.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

from pdserve.config import PDServeConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "pdserve"
SCHEMA_FILE = CHART / "values.schema.json"
README_FILE = CHART / "README.md"
BEGIN, END = "<!-- values: begin (scripts/helm_schema.py) -->", "<!-- values: end -->"


def obj(description: str, **properties) -> dict:
    return {"type": "object", "description": description, "additionalProperties": False, "properties": properties}


def s(description: str, **extra) -> dict:
    return {"type": "string", "description": description, **extra}


def i(description: str, minimum: int = 0, **extra) -> dict:
    return {"type": "integer", "description": description, "minimum": minimum, **extra}


def b(description: str) -> dict:
    return {"type": "boolean", "description": description}


def free(description: str, type_: str = "object") -> dict:
    """Passed through to Kubernetes as given (resources, nodeSelector, ...): Kubernetes checks it."""
    return {"type": type_, "description": description}


PORT = {"minimum": 1, "maximum": 65535}


def _placement(what: str) -> dict:
    return {"resources": free(f"{what}: container resources (requests/limits)"),
            "nodeSelector": free(f"{what}: node selector"),
            "tolerations": free(f"{what}: tolerations", "array"),
            "terminationGracePeriodSeconds": i(f"{what}: seconds a stopping pod may take to drain", 1)}


def chart_values() -> dict:
    worker_group = obj(
        "A group of workers serving one scenario and model",
        name=s("Name of the group, part of its StatefulSets' names", pattern="^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
        scenario=s("Scenario the workers serve (worker.scenario)"),
        model=s("Model of the group; empty: config.model.name"),
        prefill=obj("Prefill StatefulSet", replicas=i("Workers that start as prefill")),
        decode=obj("Decode StatefulSet", replicas=i("Workers that start as decode")),
        port=i("Worker gRPC port", **PORT),
        kvTcpPort=i("Port of the TCP KV-transfer backend", **PORT),
        accelerator=obj("Accelerators per worker", resource=s("Extended resource name, e.g. nvidia.com/gpu"),
                        count=i("Accelerators per worker; 0 runs on CPU")),
        **_placement("Workers of the group"))
    worker_group["required"] = ["name", "scenario", "prefill", "decode"]
    return {
        "image": obj("Container image (see Dockerfile)", repository=s("Image repository"),
                     tag=s("Image tag; empty: the chart's appVersion"),
                     pullPolicy=s("Image pull policy", enum=["Always", "IfNotPresent", "Never"])),
        "imagePullSecrets": free("Secrets for pulling the image", "array"),
        "config": {"$ref": "#/$defs/PDServeConfig",
                   "description": "pdserve.yaml settings merged over the chart's (secrets are refused here)"},
        "secrets": obj(
            "One Secret with the cluster secret, admin token and database URL",
            existingSecret=s("Use this Secret instead of creating one"),
            clusterSecretKey=s("Key of the cluster secret"), adminTokenKey=s("Key of the admin token"),
            databaseUrlKey=s("Key of the database URL"),
            clusterSecret=s("Cluster secret of a created Secret; empty: random, kept across upgrades"),
            adminToken=s("Admin token (Admin API, dashboard) of a created Secret; empty: random, kept across upgrades")),
        "database": obj(
            "Where state lives; SQLite is refused (the router and gateway pods both write)",
            url=s("External PostgreSQL URL, postgresql+psycopg://user:password@host/db (stored in the Secret)"),
            postgresql=obj("A single bundled PostgreSQL for trying pdserve out",
                           enabled=b("Deploy it and point pdserve at it when database.url is empty"), image=s("PostgreSQL image"),
                           storage=s("Volume size"), storageClassName=s("Storage class; empty: the default"),
                           resources=free("Container resources"))),
        "gateway": obj(
            "OpenAI-compatible HTTP gateway",
            replicas=i("Replicas when the HPA is off", 1), port=i("Container port", **PORT),
            requireApiKey=b("Require an API key on every request (false serves anyone reaching the Service)"),
            service=obj("Service", type=s("Service type", enum=["ClusterIP", "NodePort", "LoadBalancer"]),
                        port=i("Service port", **PORT)),
            ingress=obj("Ingress", enabled=b("Create an Ingress"), className=s("Ingress class"),
                        host=s("Host name"), tlsSecretName=s("TLS Secret; empty: no TLS"),
                        annotations=free("Ingress annotations")),
            hpa=obj("Horizontal pod autoscaler on CPU", enabled=b("Create it"), minReplicas=i("Fewest", 1),
                    maxReplicas=i("Most", 1), targetCPUUtilizationPercentage=i("CPU target", 1, maximum=100)),
            **_placement("Gateway")),
        "router": obj("Router (one replica)", port=i("gRPC port", **PORT),
                      podDisruptionBudget=obj("PodDisruptionBudget", enabled=b("Keep voluntary evictions off the router")),
                      **_placement("Router")),
        "workers": {"type": "array", "description": "Worker groups, one per scenario and model",
                    "items": worker_group, "minItems": 1},
        "networkPolicy": obj("NetworkPolicies", enabled=b("Only this release's pods reach router, workers, database"),
                             gatewayIngressFrom=free("Peers allowed to reach the gateway; empty: anyone", "array")),
        "serviceMonitor": obj("Prometheus Operator ServiceMonitor for the gateway's /metrics",
                              enabled=b("Create it"), interval=s("Scrape interval"),
                              labels=free("Extra labels (for the Prometheus selector)")),
    }


def schema() -> dict:
    config = PDServeConfig.model_json_schema(ref_template="#/$defs/{model}")
    defs = config.pop("$defs")
    defs["PDServeConfig"] = config
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "pdserve chart values",
            "type": "object", "additionalProperties": False, "properties": chart_values(), "$defs": defs}


def _rows(prefix: str, node: dict) -> list[str]:
    if node.get("type") == "object" and "properties" in node and "$ref" not in node:
        rows = []
        for key, child in node["properties"].items():
            rows += _rows(f"{prefix}.{key}" if prefix else key, child)
        return rows
    if node.get("type") == "array" and "properties" in node.get("items", {}):
        return _rows(f"{prefix}[]", node["items"])
    return [f"| `{prefix}` | {node.get('type', 'object')} | {node['description']} |"]


def values_table() -> str:
    rows = _rows("", {"type": "object", "properties": chart_values()})
    return "\n".join([BEGIN, "| Value | Type | What it does |", "|---|---|---|", *rows, END])


def _readme_with(table: str) -> str:
    text = README_FILE.read_text()
    head, rest = text.split(BEGIN, 1)
    return head + table + rest.split(END, 1)[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the files are not current")
    args = parser.parse_args()
    wanted = {SCHEMA_FILE: json.dumps(schema(), indent=2) + "\n", README_FILE: _readme_with(values_table())}
    stale = [p for p, text in wanted.items() if not p.is_file() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"{p.relative_to(ROOT)} is stale: run python scripts/helm_schema.py", file=sys.stderr)
        return 1 if stale else 0
    for p in stale:
        p.write_text(wanted[p])
    return 0


if __name__ == "__main__":
    sys.exit(main())
