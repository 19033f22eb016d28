#!/usr/bin/env bash
# The local demo: bring up Postgres and Kafka, then run the service against three brokers (one
# healthy, one slow, one whose endpoint fails) and print what each received.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
cargo run --quiet --example demo
