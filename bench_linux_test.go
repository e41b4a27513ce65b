//go:build linux && amd64

package mapguard_test

import (
	"context"
	"os"
	"sort"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mapguard/mapguard"
	"github.com/mapguard/mapguard/internal/testutil"
)

// mapHeavy is a healthy map workload: reads that hit and miss, writes and
// deletes on non-empty maps with string and integer keys.
func mapHeavy(b *testing.B) {
	strs := make(map[string]int, 1024)
	ints := make(map[int64]int, 1024)
	keys := make([]string, 1024)
	for i := range keys {
		keys[i] = "key-" + strconv.Itoa(i)
		strs[keys[i]] = i
		ints[int64(i)] = i
	}
	b.ResetTimer()
	n := 0
	for i := 0; b.Loop(); i++ {
		k := keys[i&1023]
		strs[k] = i
		n += strs[keys[(i*7)&1023]]
		n += ints[int64(i&2047)] // half of these miss
		ints[int64(i&1023)] = n
		if _, ok := strs["absent"]; ok {
			n++
		}
	}
	sink = n
}

// BenchmarkMapHeavy compares a healthy map workload with no Guard and with
// the default Guard: the default probes sit on branches healthy operations
// never take, so the two should match.
func BenchmarkMapHeavy(b *testing.B) {
	b.Run("guard=none", mapHeavy)
	b.Run("guard=default", func(b *testing.B) {
		g := startReal(b, mapguard.Options{})
		mapHeavy(b)
		b.StopTimer()
		reportHits(b, g)
	})
	// Every operation of the loop hits a deep probe while it is attached;
	// the governor keeps their cost at the budget.
	b.Run("guard=deep-1pct", func(b *testing.B) {
		g := startReal(b, mapguard.Options{
			Detect:  append(mapguard.DefaultKinds(), mapguard.MissingKeyDelete, mapguard.NilMapDelete, mapguard.SharedWriters),
			OpStats: true,
			Budget:  0.01,
		})
		mapHeavy(b)
		b.StopTimer()
		reportHits(b, g)
		if d := g.Stats().Budget; d != nil {
			b.ReportMetric(float64(d.Sampled), "sampled-sites")
			b.ReportMetric(d.Overhead*100, "est-overhead-%")
		}
		if len(g.OpStats()) == 0 {
			b.Error("no operations counted")
		}
	})
}

// BenchmarkDetection is the cost of one detected misuse: a nil-map write and
// its recovered panic, without and with the Guard.
func BenchmarkDetection(b *testing.B) {
	write := func(b *testing.B) {
		for b.Loop() {
			func() {
				defer func() { recover() }()
				var m map[string]int
				m["k"] = 1
			}()
		}
	}
	b.Run("guard=none", write)
	b.Run("guard=default", func(b *testing.B) {
		g := startReal(b, mapguard.Options{Budget: 1, BufferSize: 1 << 16})
		write(b)
		b.StopTimer()
		reportHits(b, g)
	})
}

// BenchmarkMissCost is the cost of one watched missing-key read at a call
// site that has already been reported: a single-stepped trap and a count in
// BPF, no event.
func BenchmarkMissCost(b *testing.B) {
	m := map[string]int{"here": 1}
	miss := func(b *testing.B) {
		n := 0
		for b.Loop() {
			n += m["gone"]
		}
		sink = n
	}
	b.Run("guard=none", miss)
	b.Run("guard=default", func(b *testing.B) {
		g := startReal(b, mapguard.Options{Budget: 1})
		miss(b)
		b.StopTimer()
		reportHits(b, g)
	})
}

// BenchmarkCommaOKMissCost is the cost of a comma-ok read that misses
// (v, ok := m[k]), which is no anomaly. Up to Go 1.26 no probe sits on its
// path; on Go 1.27 the miss blocks are shared with plain reads (in
// mapaccess2*), so it takes the trap and the BPF program filters it.
func BenchmarkCommaOKMissCost(b *testing.B) {
	m := map[string]int{"here": 1}
	miss := func(b *testing.B) {
		n := 0
		for b.Loop() {
			if _, ok := m["gone"]; !ok {
				n++
			}
		}
		sink = n
	}
	b.Run("guard=none", miss)
	b.Run("guard=default", func(b *testing.B) {
		g := startReal(b, mapguard.Options{Budget: 1})
		miss(b)
		b.StopTimer()
		reportHits(b, g)
	})
}

// BenchmarkStartClose measures Start (find sites, load, attach, canary) and
// Close (detach everything) with the default kinds.
func BenchmarkStartClose(b *testing.B) {
	testutil.RequirePrivileged(b)
	var start, stop time.Duration
	for b.Loop() {
		g, _ := mapguard.New(mapguard.Options{})
		t0 := time.Now()
		if err := g.Start(context.Background()); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		g.Close()
		start += t1.Sub(t0)
		stop += time.Since(t1)
	}
	b.ReportMetric(float64(start.Milliseconds())/float64(b.N), "start-ms")
	b.ReportMetric(float64(stop.Milliseconds())/float64(b.N), "close-ms")
}

func reportHits(b *testing.B, g *mapguard.Guard) {
	var hits uint64
	for _, s := range g.Stats().Sites {
		hits += s.Hits
	}
	b.ReportMetric(float64(hits)/float64(b.N), "hits/op")
}

// processCPU is the CPU time of this whole process so far.
func processCPU() time.Duration {
	var ru unix.Rusage
	unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkBudget measures what deep watching really costs against its
// budget: the same amount of map-heavy work (a quarter of its time in map
// operations, every one of them a deep probe hit while attached) is done
// without a Guard and with every deep kind and OpStats at a 1% budget,
// interleaved, over MAPGUARD_BENCH_BUDGET_SECONDS (default 30) seconds per
// run. extra-cpu-x-budget is (process CPU with - without) / wall time with,
// divided by the budget: 1 means the governor spent exactly the budget.
// Each b.N iteration is one pair of runs.
func BenchmarkBudget(b *testing.B) {
	testutil.RequirePrivileged(b)
	const budget = 0.01
	seconds := 30
	if s, err := strconv.Atoi(os.Getenv("MAPGUARD_BENCH_BUDGET_SECONDS")); err == nil && s > 0 {
		seconds = s
	}
	m := map[int]int{}
	work := func(n int) {
		x := 0
		for i := 0; i < n; i++ {
			m[i&255] = i // a deep hit: write (OpStats, shared writers)
			for j := 0; j < 40; j++ {
				x += j * i // work that is not a map operation
			}
		}
		sink = x
	}
	// Calibrate n so that a run without a Guard takes about `seconds`.
	t0 := time.Now()
	work(1_000_000)
	n := int(float64(1_000_000) * float64(seconds) / time.Since(t0).Seconds())
	var ratios []float64
	for b.Loop() {
		c0 := processCPU()
		work(n)
		off := processCPU() - c0

		g, err := mapguard.New(mapguard.Options{
			Detect:  []mapguard.Kind{mapguard.MissingKeyDelete, mapguard.NilMapDelete, mapguard.SharedWriters},
			OpStats: true,
			Budget:  budget,
		})
		if err != nil {
			b.Fatal(err)
		}
		if err := g.Start(context.Background()); err != nil {
			b.Fatal(err)
		}
		c0, w0 := processCPU(), time.Now()
		work(n)
		on, wall := processCPU()-c0, time.Since(w0)
		st := g.Stats()
		g.Close()
		r := (on - off).Seconds() / wall.Seconds() / budget
		ratios = append(ratios, r)
		b.Logf("off %v, on %v over %v: extra %.4f of a CPU (%.2fx the budget); governor's own estimate %.4f, sampled sites %d",
			off, on, wall, (on-off).Seconds()/wall.Seconds(), r, st.Budget.Overhead, st.Budget.Sampled)
	}
	sort.Float64s(ratios)
	b.ReportMetric(ratios[len(ratios)/2], "extra-cpu-x-budget")
}
