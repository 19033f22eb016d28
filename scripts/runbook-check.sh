#!/usr/bin/env bash
# Runs every command in the ```sh blocks of RUNBOOK.md against whatever deployment the
# environment points at (the variables of the runbook's setup block, APP__* for the CLI) and
# checks what each one printed. The test suite runs it against a live local instance with an
# open breaker, a dead letter, a rejected message and a disabled broker, so the runbook cannot
# rot.
#
# - The first ```sh block is the setup block (it exports ADMIN, BROKER, ...). Every other
#   command runs on its own, in order, as `set -euo pipefail; <setup block>; <command>`: a
#   failing command anywhere in a pipe fails it.
# - Every command must have an entry in the expectations file: the command exactly as written,
#   then lines `~ REGEX` (some output line must match, grep -E) and `!~ REGEX` (no output line
#   may match). A command without an entry, or an entry no command uses, fails the check.
#   usage: scripts/runbook-check.sh [RUNBOOK.md] [scripts/runbook-expect.txt]
set -uo pipefail
runbook="${1:-RUNBOOK.md}"
expectations="${2:-$(dirname "$0")/runbook-expect.txt}"

declare -A expected=()
declare -A used=()
current=""
while IFS= read -r line || [ -n "$line" ]; do
  case "$line" in
    '#'*) ;;
    '') current="" ;;
    '~ '* | '!~ '*)
      if [ -z "$current" ]; then
        echo "runbook-check: $expectations: expectation without a command: $line" >&2
        exit 2
      fi
      expected["$current"]+="$line"$'\n'
      ;;
    *)
      current="$line"
      expected["$current"]+=""
      ;;
  esac
done <"$expectations"

setup=""
blocks=0
in_block=0
failed=0
ran=0
while IFS= read -r line; do
  trimmed="${line#"${line%%[![:space:]]*}"}" # blocks may be indented inside list items
  case "$trimmed" in
    '```sh')
      in_block=1
      blocks=$((blocks + 1))
      continue
      ;;
    '```'*)
      in_block=0
      continue
      ;;
  esac
  [ "$in_block" = 1 ] || continue
  case "$trimmed" in '#'* | '') continue ;; esac
  if [ "$blocks" = 1 ]; then
    setup+="$trimmed"$'\n'
    continue
  fi
  command="$trimmed"
  ran=$((ran + 1))
  output=$(bash -c "set -euo pipefail
$setup
$command" 2>&1)
  status=$?
  problems=()
  [ "$status" = 0 ] || problems+=("exit status $status")
  if [ -z "${expected["$command"]+set}" ]; then
    problems+=("no entry in $expectations: add the command and the shape of its output")
  else
    used["$command"]=1
    while IFS= read -r expectation; do
      [ -n "$expectation" ] || continue
      pattern="${expectation#* }"
      if [ "${expectation%% *}" = "~" ]; then
        grep -Eq -- "$pattern" <<<"$output" || problems+=("no output line matches: $pattern")
      elif grep -Eq -- "$pattern" <<<"$output"; then
        problems+=("an output line matches: $pattern")
      fi
    done <<<"${expected["$command"]}"
  fi
  if [ "${#problems[@]}" = 0 ]; then
    echo "ok: $command"
  else
    echo "FAILED: $command"
    printf '    %s\n' "${problems[@]}"
    echo "    output:"
    echo "$output" | sed 's/^/      /' | tail -n 20
    failed=$((failed + 1))
  fi
done <"$runbook"

for command in "${!expected[@]}"; do
  if [ -z "${used["$command"]+set}" ]; then
    echo "FAILED: $expectations has an entry for a command RUNBOOK.md no longer has: $command"
    failed=$((failed + 1))
  fi
done
echo "runbook commands: $ran run, $failed failed"
[ -n "$setup" ] && [ "$ran" -gt 0 ] && [ "$failed" = 0 ]
