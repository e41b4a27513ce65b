// Command table reads `go test -bench` output on stdin and prints mapguard's
// cost table: medians per benchmark, and ratios between benchmarks of the
// same run. bench/run.sh feeds it.
package main

import (
	"bufio"
	"fmt"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// results maps a benchmark name (without the -GOMAXPROCS suffix) and a unit
// to its measurements.
type results map[string]map[string][]float64

var line = regexp.MustCompile(`^(Benchmark\S+?)(-\d+)?\s+\d+\s+(.*)$`)

func parse() results {
	res := results{}
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		m := line.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		fields := strings.Fields(m[3])
		for i := 0; i+1 < len(fields); i += 2 {
			v, err := strconv.ParseFloat(fields[i], 64)
			if err != nil {
				continue
			}
			if res[m[1]] == nil {
				res[m[1]] = map[string][]float64{}
			}
			res[m[1]][fields[i+1]] = append(res[m[1]][fields[i+1]], v)
		}
	}
	return res
}

// median returns the median of name's unit, and whether it was measured.
func (r results) median(name, unit string) (float64, bool) {
	vs := append([]float64(nil), r[name][unit]...)
	if len(vs) == 0 {
		return 0, false
	}
	sort.Float64s(vs)
	if len(vs)%2 == 1 {
		return vs[len(vs)/2], true
	}
	return (vs[len(vs)/2-1] + vs[len(vs)/2]) / 2, true
}

// main prints the cost table row by row, in the README's order.
func main() {
	r := parse()
	row := func(what, value, ratio string) { fmt.Printf("| %-62s | %16s | %10s |\n", what, value, ratio) }
	na := func(what string) { row(what, "not measured", "") }
	fmt.Println("| measurement (median of runs)                                   |            value |      ratio |")
	fmt.Println("|----------------------------------------------------------------|------------------|------------|")

	const heavy = "BenchmarkMapHeavy/guard="
	if base, ok := r.median(heavy+"none", "ns/op"); ok {
		row("map-heavy loop, no Guard", fmt.Sprintf("%.1f ns/op", base), "1.00x")
		if v, ok := r.median(heavy+"default", "ns/op"); ok {
			row("map-heavy loop, default Guard (always-on detectors)", fmt.Sprintf("%.1f ns/op", v), fmt.Sprintf("%.2fx", v/base))
		}
		if v, ok := r.median(heavy+"deep-1pct", "ns/op"); ok {
			est, _ := r.median(heavy+"deep-1pct", "est-overhead-%")
			sampled, _ := r.median(heavy+"deep-1pct", "sampled-sites")
			row(fmt.Sprintf("map-heavy loop, deep watching at a 1%% budget (%.0f sampled, est. %.2f%%)", sampled, est),
				fmt.Sprintf("%.1f ns/op", v), fmt.Sprintf("%.2fx", v/base))
		} else {
			na("map-heavy loop, deep watching")
		}
	} else {
		na("map-heavy loop")
	}
	const json = "BenchmarkReflectJSON/guard="
	if base, ok := r.median(json+"none", "ns/op"); ok {
		row("reflect/JSON loop, no Guard", fmt.Sprintf("%.0f ns/op", base), "1.00x")
		if v, ok := r.median(json+"default", "ns/op"); ok {
			row("reflect/JSON loop, default Guard", fmt.Sprintf("%.0f ns/op", v), fmt.Sprintf("%.2fx", v/base))
		}
	}
	// cpuRatio prints a paired benchmark's process CPU with the default
	// Guard / without: median of paired slices, its quartiles, and the
	// extra as a share of one CPU (what the budget limits).
	cpuRatio := func(what, name string) {
		v, ok := r.median(name, "cpu-ratio")
		if !ok {
			na(what)
			return
		}
		p25, _ := r.median(name, "cpu-ratio-p25")
		p75, _ := r.median(name, "cpu-ratio-p75")
		extra, _ := r.median(name, "extra-cpu-%")
		busy, _ := r.median(name, "off-cpu-%")
		other, _ := r.median(name, "other-threads-cpu-%")
		row(fmt.Sprintf("%s (p25-p75 %.3f-%.3f; loop had %.0f%% of a CPU; other threads %.2f%%)", what, p25, p75, busy, other),
			fmt.Sprintf("%.2f%% of a CPU", extra), fmt.Sprintf("%.3fx", v))
	}
	cpuRatio("map-heavy loop, default Guard, process CPU, paired", "BenchmarkMapHeavy/paired=default")
	cpuRatio("reflect/JSON loop, default Guard, process CPU, paired", "BenchmarkReflectJSON/paired=default")
	cpuRatio("loop without map operations, default Guard (its fixed cost), paired", "BenchmarkIdleCost/paired=default")

	// perHit prints per-hit rows of one benchmark: (probe - none), per hit
	// where the benchmark reports hits/op (a Guard whose governor samples
	// the site traps on a share of the operations only), and the ratio to
	// the floor (the empty program at the same instruction).
	perHit := func(bench, floorName string, rows [][2]string) {
		none, okNone := r.median(bench+"none", "ns/op")
		floor, okFloor := r.median(bench+floorName, "ns/op")
		for _, rw := range rows {
			v, ok := r.median(bench+rw[1], "ns/op")
			if !ok || !okNone {
				na(rw[0])
				continue
			}
			d := v - none
			what := rw[0]
			if h, ok := r.median(bench+rw[1], "hits/op"); ok && h > 0 && h < 0.999 {
				d /= h
				what = fmt.Sprintf("%s (sampled: %.2g hits/op)", what, h)
			}
			ratio := ""
			if okFloor && floor > none {
				ratio = fmt.Sprintf("%.2fx", d/(floor-none))
			}
			row(what, fmt.Sprintf("%.2f us/hit", d/1000), ratio)
		}
	}
	perHit("BenchmarkHitCost/probe=", "empty@nil-branch", [][2]string{
		{"per hit: empty program at the nil branch (the floor)", "empty@nil-branch"},
		{"per hit: mapguard's program at the nil branch", "mapguard@nil-branch"},
		{"per hit: empty program at the nil block's first instruction (single-stepped: where the site was before it moved to the emulated JE)", "empty@nil-block-start"},
		{"per hit: empty program at function entry (naive, bpftrace)", "empty@entry"},
		{"per hit: empty program after the stack check (PUSHQ BP)", "empty@after-stack-check"},
	})
	const deep = "BenchmarkDeepHitCost/probe="
	perHit(deep, "empty@after-stack-check", [][2]string{
		{"deep site, healthy write: empty program after the stack check (floor)", "empty@after-stack-check"},
		{"deep site, healthy write: mapguard's deep program there", "mapguard-deep@after-stack-check"},
		{"deep site, healthy write: mapguard counting the call site only", "mapguard-opstats@after-stack-check"},
		{"deep site, healthy write: mapguard noting the writer only", "mapguard-writers@after-stack-check"},
		{"deep site, healthy write: empty program at function entry", "empty@entry"},
	})
	if v, ok := r.median(deep+"mapguard-deep@after-stack-check", "calibrated-emulated-ns/hit"); ok {
		row("an emulated trap as Start calibrates it (empty program)", fmt.Sprintf("%.2f us/hit", v/1000), "")
	}
	if v, ok := r.median(deep+"mapguard-deep@after-stack-check", "accounted-ns/hit"); ok {
		row("a deep hit as the governor accounts it (trap + measured program)", fmt.Sprintf("%.2f us/hit", v/1000), "")
	}
	if v, ok := r.median("BenchmarkBudget", "extra-cpu-x-budget"); ok {
		p25, _ := r.median("BenchmarkBudget", "extra-cpu-x-budget-p25")
		p75, _ := r.median("BenchmarkBudget", "extra-cpu-x-budget-p75")
		secs, _ := r.median("BenchmarkBudget", "guard-on-s")
		row(fmt.Sprintf("deep watching at 1%%, %.0f s: extra process CPU / budget, paired (p25-p75 %.2f-%.2f)", secs, p25, p75),
			fmt.Sprintf("%.2fx", v), "")
		if v, ok := r.median("BenchmarkBudget", "run-extra-cpu-x-budget"); ok {
			row("deep watching at 1%: the same from the sums over the run", fmt.Sprintf("%.2fx", v), "")
		}
		if v, ok := r.median("BenchmarkBudget", "governor-x-budget"); ok {
			row("deep watching at 1%: the governor's own account / budget", fmt.Sprintf("%.2fx", v), "")
		}
	}

	if base, ok := r.median("BenchmarkMissCost/guard=none", "ns/op"); ok {
		if v, ok := r.median("BenchmarkMissCost/guard=default", "ns/op"); ok {
			// Per trapped read: the governor samples a site that traps on
			// every iteration of a loop (a whole CPU of traps).
			if h, ok := r.median("BenchmarkMissCost/guard=default", "hits/op"); ok && h > 0 && h < 0.999 {
				row(fmt.Sprintf("one watched missing-key read at a reported call site (sampled: %.2g hits/op)", h), fmt.Sprintf("%.2f us/hit", (v-base)/h/1000), "")
			} else {
				row("one watched missing-key read at a reported call site", fmt.Sprintf("%.2f us", (v-base)/1000), "")
			}
		}
	}

	const det = "BenchmarkDetection/guard="
	if base, ok := r.median(det+"none", "ns/op"); ok {
		if v, ok := r.median(det+"default", "ns/op"); ok {
			allocs, _ := r.median(det+"default", "allocs/op")
			row("one detected nil-map write, end to end (vs recovered panic alone)",
				fmt.Sprintf("%.2f us", (v-base)/1000), fmt.Sprintf("%.0f allocs", allocs))
		}
	}
	for _, depth := range []string{"0", "4"} {
		name := "BenchmarkDecode/StackDepth=" + depth
		if v, ok := r.median(name, "ns/op"); ok {
			allocs, _ := r.median(name, "allocs/op")
			row("decode one record, StackDepth "+depth, fmt.Sprintf("%.0f ns", v), fmt.Sprintf("%.0f allocs", allocs))
		}
	}
	if v, ok := r.median("BenchmarkDelivery", "events/s"); ok {
		allocs, _ := r.median("BenchmarkDelivery", "allocs/op")
		row("delivery to a callback (queue, dispatcher)", fmt.Sprintf("%.0f events/s", v), fmt.Sprintf("%.0f allocs", allocs))
	}
	if v, ok := r.median("BenchmarkStartClose", "start-ms"); ok {
		row("Start: find sites, load, attach, canary", fmt.Sprintf("%.0f ms", v), "")
	}
	if v, ok := r.median("BenchmarkStartClose", "close-ms"); ok {
		row("Close: detach every site, drain", fmt.Sprintf("%.0f ms", v), "")
	}
}
