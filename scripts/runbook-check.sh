#!/usr/bin/env bash
# Runs every command in the ```sh blocks of RUNBOOK.md, one line at a time, against whatever
# deployment the environment points at (ADMIN, DATABASE_URL, LOG, APP__* for the CLI). The test
# suite runs it against a live local instance so the runbook cannot rot.
#   usage: scripts/runbook-check.sh [RUNBOOK.md]
set -uo pipefail
runbook="${1:-RUNBOOK.md}"
failed=0
ran=0
in_block=0
while IFS= read -r line; do
  trimmed="${line#"${line%%[![:space:]]*}"}"  # blocks may be indented inside list items
  case "$trimmed" in
    '```sh') in_block=1; continue ;;
    '```'*) in_block=0; continue ;;
  esac
  [ "$in_block" = 1 ] || continue
  command="${trimmed%%#*}"                   # drop trailing comments
  [ -n "${command//[[:space:]]/}" ] || continue
  ran=$((ran + 1))
  if output=$(bash -eu -c "$command" 2>&1); then
    echo "ok: $command"
  else
    echo "FAILED: $command"
    echo "$output" | sed 's/^/    /' | tail -n 20
    failed=$((failed + 1))
  fi
done < "$runbook"
echo "runbook commands: $ran run, $failed failed"
[ "$ran" -gt 0 ] && [ "$failed" = 0 ]
