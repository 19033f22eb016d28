#!/usr/bin/env python3
"""Prints the queries of deploy/grafana/webhook-delivery.json as a Prometheus rule file, one
recording rule per query, so `promtool check rules` can check their PromQL offline. Grafana's
`$__rate_interval` becomes 5m. Used by scripts/validate-deploy.sh."""
import json
import pathlib

root = pathlib.Path(__file__).resolve().parent.parent
dashboard = json.loads((root / "deploy/grafana/webhook-delivery.json").read_text())
rules = [
    {
        "record": f"dashboard:panel_{panel['id']}:query_{target['refId'].lower()}",
        "expr": target["expr"].replace("$__rate_interval", "5m"),
    }
    for panel in dashboard["panels"]
    for target in panel["targets"]
]
print(json.dumps({"groups": [{"name": "dashboard-queries", "rules": rules}]}, indent=2))
