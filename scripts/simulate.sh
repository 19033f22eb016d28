#!/usr/bin/env bash
# Runs the delivery scheduler's deterministic simulation (tests/simulation.rs) over more seeds
# than CI does, in release mode.
#   scripts/simulate.sh --seeds 100000 [--first 2001]   many random seeds
#   scripts/simulate.sh --seed 7683                      one seed, with its trace on failure
# A failing seed prints its trace; add it to REGRESSION_SEEDS in tests/simulation.rs.
set -euo pipefail
cd "$(dirname "$0")/.."

seeds=20000
first=1
one=""
while [ $# -gt 0 ]; do
    case "$1" in
        --seeds) seeds="$2"; shift 2 ;;
        --first) first="$2"; shift 2 ;;
        --seed) one="$2"; shift 2 ;;
        *) echo "usage: $0 [--seeds N] [--first SEED] [--seed SEED]" >&2; exit 2 ;;
    esac
done

if [ -n "$one" ]; then
    SIM_SEED="$one" exec cargo test --release --test simulation random_seeds -- --nocapture
fi
SIM_SEEDS="$seeds" SIM_FIRST_SEED="$first" \
    exec cargo test --release --test simulation random_seeds -- --nocapture
