#!/usr/bin/env bash
# The benchmark harness (docs/performance.md): brings up Postgres and Tansu, builds, runs each
# scenario against the service and against a port of the original inline consumer, and prints
# the results table (also written to bench/results/latest.md, with lag.csv and lag.svg).
#   scripts/bench.sh                        every scenario at full size, release build (~15 min)
#   scripts/bench.sh --smoke                tiny scenarios, correctness only, debug build (< 2 min);
#                                           exits non-zero if the service lost or duplicated anything
#   scripts/bench.sh --scenario incident    only that scenario (repeatable: healthy, incident,
#                                           backlog, memory, onebroker, hotload, deepload,
#                                           manybrokers, growth, soak); --system
#                                           service|baseline for one side; --growth-rows N for
#                                           a smaller growth history;
#                                           --soak-minutes N for a shorter soak; --postgres
#                                           HOST:PORT for another server (the soak's, with
#                                           autovacuum on: docs/performance.md "Soak")
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh

profile=(--release)
for arg in "$@"; do
  if [ "$arg" = "--smoke" ]; then profile=(); fi
done
exec cargo run --quiet "${profile[@]}" -p webhook-delivery-bench -- run "$@"
