#!/usr/bin/env python3
"""Offline checks of deploy/ that a schema cannot make: the ConfigMap is config/base.toml as it
is, the Deployment agrees with the configuration (admin port, shutdown timings, secret keys),
the ServiceMonitor fits its CRD (a schema of the fields used) and finds the Service, every
alert has a severity and a runbook_url that lands on a RUNBOOK.md heading, and the dashboard
is well-formed. Run by scripts/validate-deploy.sh (needs PyYAML and jsonschema, from its venv)."""
import json
import pathlib
import re
import subprocess
import sys
import tomllib

import jsonschema
import yaml

root = pathlib.Path(__file__).resolve().parent.parent
k8s = root / "deploy/kubernetes"
failures = []


def check(condition, message):
    if not condition:
        failures.append(message)


def load(name):
    return yaml.safe_load((k8s / name).read_text())


# The ConfigMap is generated; a hand edit or a changed base.toml shows up here.
rendered = subprocess.run(
    [sys.executable, str(root / "scripts/render-configmap.py")],
    check=True, capture_output=True, text=True,
).stdout
check(
    rendered == (k8s / "configmap.yaml").read_text(),
    "deploy/kubernetes/configmap.yaml is stale: run scripts/render-configmap.py > deploy/kubernetes/configmap.yaml",
)
configmap = load("configmap.yaml")
settings = tomllib.loads(configmap["data"]["base.toml"])
for section, values in tomllib.loads(configmap["data"]["production.toml"]).items():
    settings.setdefault(section, {}).update(values)

deployment = load("deployment.yaml")
pod = deployment["spec"]["template"]["spec"]
container = pod["containers"][0]
env = {e["name"]: e for e in container["env"]}
admin_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "admin")
check(
    env["APP__ADMIN__BIND"].get("value") == f"$(POD_IP):{admin_port}"
    and env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP",
    "APP__ADMIN__BIND must be $(POD_IP):<admin containerPort>, POD_IP from the downward API",
)
check(container["livenessProbe"]["httpGet"]["path"] == "/healthz", "liveness probe is /healthz")
check(container["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness probe is /readyz")
shutdown_ms = settings["shutdown"]["drain_timeout_ms"] + settings["kafka"]["revoke_drain_timeout_ms"]
check(
    pod["terminationGracePeriodSeconds"] * 1000 > shutdown_ms,
    f"terminationGracePeriodSeconds must exceed shutdown.drain_timeout_ms + kafka.revoke_drain_timeout_ms ({shutdown_ms} ms)",
)
for key in ("requests", "limits"):
    check("memory" in container["resources"].get(key, {}), f"container resources.{key}.memory is set")
secret = load("secret.yaml")
for name, entry in env.items():
    ref = entry.get("valueFrom", {}).get("secretKeyRef")
    if ref:
        check(
            ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"],
            f"{name} refers to secret key {ref['key']!r} that secret.yaml does not have",
        )
check(
    pod["volumes"][0]["configMap"]["name"] == configmap["metadata"]["name"],
    "the config volume mounts the ConfigMap",
)
labels = deployment["spec"]["template"]["metadata"]["labels"]
service = load("service.yaml")
check(
    service["spec"]["selector"].items() <= labels.items(),
    "the Service selects the Deployment's pods",
)
pdb = load("poddisruptionbudget.yaml")
check(pdb["spec"]["selector"]["matchLabels"].items() <= labels.items(), "the PDB selects the pods")

monitor = load("servicemonitor.yaml")
try:
    jsonschema.validate(monitor, json.loads((k8s / "schemas/servicemonitor.json").read_text()))
except jsonschema.ValidationError as error:
    failures.append(f"servicemonitor.yaml: {error.message} at {list(error.absolute_path)}")
check(
    monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items(),
    "the ServiceMonitor selects the Service",
)
service_ports = {p["name"] for p in service["spec"]["ports"]}
for endpoint in monitor["spec"]["endpoints"]:
    check(endpoint["port"] in service_ports, f"ServiceMonitor port {endpoint['port']!r} is a Service port")


def slug(heading):
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


runbook = (root / "RUNBOOK.md").read_text()
anchors = {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", runbook, re.M)}
alerts = yaml.safe_load((root / "deploy/prometheus/alerts.yml").read_text())
for group in alerts["groups"]:
    for rule in group["rules"]:
        name = rule.get("alert", "?")
        check(rule.get("labels", {}).get("severity") in ("page", "ticket"), f"{name}: severity is page or ticket")
        url = rule.get("annotations", {}).get("runbook_url", "")
        anchor = url.partition("RUNBOOK.md#")[2]
        check(anchor in anchors, f"{name}: runbook_url {url!r} is not a RUNBOOK.md heading")

dashboard = json.loads((root / "deploy/grafana/webhook-delivery.json").read_text())
ids = [panel["id"] for panel in dashboard["panels"]]
check(len(ids) == len(set(ids)), "dashboard panel ids are unique")
for panel in dashboard["panels"]:
    check(panel.get("targets") and all(t.get("expr") for t in panel["targets"]), f"panel {panel['title']!r} has queries")
    check(all(k in panel["gridPos"] for k in "xywh"), f"panel {panel['title']!r} has a position")

for failure in failures:
    print(f"FAILED: {failure}")
print(f"deploy checks: {len(failures)} failed")
sys.exit(1 if failures else 0)
