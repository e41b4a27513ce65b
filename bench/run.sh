#!/usr/bin/env bash
# Prints mapguard's cost table from one run of the benchmarks (as root: the
# benchmarks attach real uprobes). Medians over COUNT runs of each benchmark,
# ratios within the same run. Usage: bash bench/run.sh [COUNT]
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-5}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
go test -run '^$' -bench 'MapHeavy|Detection|MissCost|StartClose|Delivery' -benchmem -count "$count" . >>"$out"
go test -run '^$' -bench 'HitCost' -benchmem -count "$count" ./internal/uprobe >>"$out"
go test -run '^$' -bench 'Decode' -benchmem -count "$count" ./internal/wire >>"$out"
# The budget's real cost needs long runs (30 s each, off and on): only with
# MAPGUARD_BENCH_BUDGET=1.
if [ "${MAPGUARD_BENCH_BUDGET:-0}" = 1 ]; then
	go test -run '^$' -bench 'Budget' -benchtime 3x -timeout 30m . >>"$out"
fi
go run ./bench/table <"$out"
