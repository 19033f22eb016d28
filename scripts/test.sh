#!/usr/bin/env bash
# The whole test suite, from a fresh machine: bring up Postgres and Kafka, check formatting and
# lints, validate deploy/ (Kubernetes schemas, promtool rule tests), run every unit and integration
# test against the real services (including the runbook checker and the check that every metric
# the alerts and the dashboard use is exported), the scheduler's simulation over 250,000 more
# seeds, then a smoke run of the benchmark harness
# (correctness only: nothing lost, nothing duplicated; no timing asserts).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
# Each test makes its own database; drop what earlier runs left behind.
psql -h 127.0.0.1 -U postgres -d test -Atc \
  "SELECT datname FROM pg_database WHERE datname ~ '^wd_(test|cli|demo|explain)_?'" |
  while read -r database; do
    psql -h 127.0.0.1 -U postgres -d test -qc "DROP DATABASE IF EXISTS \"$database\"" || true
  done
cargo fmt --all -- --check
cargo clippy --all-targets --features fault-injection --quiet -- -D warnings
cargo clippy -p webhook-delivery-bench --all-targets --quiet -- -D warnings
scripts/validate-deploy.sh
cargo test --all-targets --features fault-injection
# The scheduler's simulation over more seeds than `cargo test` gives it (release mode, about
# 100 s): the first million-seed run found a bug at seed 201157 that 50,000 did not.
scripts/simulate.sh --seeds 250000 --first 2001
cargo test -p webhook-delivery-bench --quiet
scripts/bench.sh --smoke
