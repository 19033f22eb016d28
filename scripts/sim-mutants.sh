#!/usr/bin/env bash
# Re-derives the simulator's regression seeds (tests/simulation.rs, REGRESSION_SEEDS). Each
# mutant below undoes one rule of the scheduler that a past bug broke, by commenting out one
# line of src/core/scheduler/mod.rs (or putting the old line back); the script runs the
# simulator over many seeds against it (release mode), prints the seeds that caught it and
# which regression seeds are among them, whether the seeds long runs found still catch it,
# then the scheduler unit tests that fail with it, and puts the file back. Run it after
# changing what the simulator draws: a regression seed is worth keeping only while it still
# catches its mutant. Every mutant should be caught by at least one unit test too.
#   scripts/sim-mutants.sh [--seeds 50000]
set -euo pipefail
cd "$(dirname "$0")/.."

seeds=50000
if [ "${1:-}" = "--seeds" ]; then seeds="$2"; fi
scheduler=src/core/scheduler/mod.rs
if ! git diff --quiet -- "$scheduler"; then
    echo "sim-mutants: $scheduler has uncommitted changes; commit or stash them first" >&2
    exit 2
fi
trap 'git checkout -q -- "$scheduler"' EXIT

# name | the exact line (trimmed) | which occurrence (1-based) | the bug it stands for
#   [| the line that replaces it; without one the line is commented out]
mutants=(
    "replay-suspects|self.replay_suspects.insert(load.clone());|1|a replay racing the save of an outcome (the head awaiting its save was dead and is pending again)"
    "evicted-blocked|sweep.blocked.extend(evicted);|1|an evicted load taken back later in the same sweep"
    "replay-unread|self.replay_read_by = Some(self.wanted);|1|a claim joining a lane before the sweep after a replay"
    "replay-stale-claims|self.claims_stale_before = Some(now);|1|a claim older than a replay trusted"
    "page-stale-claims|self.claims_stale_before = Some(now);|2|a claim older than the last page trusted (the page brought in and finished its delivery)"
    "replay-read-partly|if !rows_left && sweep.blocked.is_empty() {|1|a claim trusted after a sweep that ended with memory full before the replayed row (seed 12979934)|if true {"
    "held-replay|self.lanes.forget_held_through(None);|1|a replay's rows left below the held mark, never read (session 16's sweep start)"
    "held-suspect|self.lanes.not_held(outcome.order);|1|a dead outcome's row, replayed meanwhile, left below the held mark (seed 70)"
    "held-unbroken|sweep.prefix.get(&partition) == Some(&self.lanes.held_through(partition));|1|the held mark raised over a row given back while the sweep was reading|sweep.prefix.contains_key(&partition);"
)

for mutant in "${mutants[@]}"; do
    IFS='|' read -r name line occurrence bug replacement <<<"$mutant"
    python3 - "$scheduler" "$line" "$occurrence" "$replacement" <<'EOF'
import sys
path, line, occurrence, replacement = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
lines = open(path).read().split("\n")
hits = [i for i, text in enumerate(lines) if text.strip() == line]
if len(hits) < occurrence:
    sys.exit(f"sim-mutants: occurrence {occurrence} of `{line}` not found in {path}")
i = hits[occurrence - 1]
lines[i] = lines[i].replace(line, replacement or "// mutant: " + line)
open(path, "w").write("\n".join(lines))
EOF
    echo "== $name: $bug"
    # The test fails when a seed breaks an invariant, which is what a mutant should do.
    out=$(SIM_KEEP_GOING=1 SIM_SEEDS="$seeds" \
        cargo test --quiet --release --test simulation random_seeds -- --nocapture 2>/dev/null || true)
    caught=$(grep ' seeds: ' <<<"$out" || true)
    echo "${caught:-   not caught by any of $seeds seeds}"
    # The seeds long runs found (tests/simulation.rs, run by every CI run): a rule that only
    # a million-seed run caught is still checked by its seed.
    if cargo test --quiet --release --test simulation seeds_that_found_scheduler_bugs_in_long_runs \
        >/dev/null 2>&1; then
        echo "   long-run seeds: none catches it"
    else
        echo "   long-run seeds: caught"
    fi
    # And the scheduler's unit tests that fail with it (each rule should have one).
    failed=$(cargo test --quiet --release --lib core::scheduler 2>/dev/null \
        | sed -n 's/^    core::scheduler::tests::\(.*\)$/\1/p' || true)
    echo "   unit tests that catch it: ${failed:-none}" | tr '\n' ' '
    echo
    git checkout -q -- "$scheduler"
done
