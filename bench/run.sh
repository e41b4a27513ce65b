#!/usr/bin/env bash
# Prints mapguard's cost table from one run of the benchmarks (as root: the
# benchmarks attach real uprobes). Medians over COUNT runs of each benchmark,
# ratios within the same run. Usage: bash bench/run.sh [COUNT]
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-5}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
go test -run '^$' -bench '^Benchmark(MapHeavy|ReflectJSON)$/^guard=' -benchmem -count "$count" . >>"$out"
go test -run '^$' -bench 'Detection|MissCost|StartClose|Delivery' -benchmem -count "$count" . >>"$out"
go test -run '^$' -bench 'HitCost' -benchmem -count "$count" ./internal/uprobe >>"$out"
go test -run '^$' -bench 'Decode' -benchmem -count "$count" ./internal/wire >>"$out"
# The default Guard's process CPU on the two loops (and on one without map
# operations: its fixed cost), from paired slices in two
# child processes side by side (MAPGUARD_BENCH_PAIRED_SECONDS of slices each,
# default 10, at least 20 pairs): one run, its medians and quartiles.
go test -run '^$' -bench '^Benchmark(MapHeavy|ReflectJSON|IdleCost)$/^paired=' -benchtime 1x -timeout 30m . >>"$out"
# The budget's real cost needs a long run (at least 30 s of slices with the
# Guard, paired with as many without): only with MAPGUARD_BENCH_BUDGET=1.
if [ "${MAPGUARD_BENCH_BUDGET:-0}" = 1 ]; then
	go test -run '^$' -bench 'Budget' -benchtime 1x -timeout 30m . >>"$out"
fi
go run ./bench/table <"$out"
