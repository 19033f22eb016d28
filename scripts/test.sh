#!/usr/bin/env bash
# The whole test suite, from a fresh machine: bring up Postgres and Kafka, check formatting and
# lints, then run every unit and integration test against the real services.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
cargo fmt --all -- --check
cargo clippy --all-targets --features fault-injection --quiet -- -D warnings
cargo test --all-targets --features fault-injection
