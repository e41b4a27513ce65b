//go:build linux && amd64

package mapguard_test

import (
	"context"
	"encoding/json"
	"os"
	"runtime"
	"runtime/metrics"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mapguard/mapguard"
	"github.com/mapguard/mapguard/internal/testutil"
)

// mapHeavyLoop returns a healthy map workload: reads that hit and miss,
// writes and deletes on non-empty maps with string and integer keys. Every
// call of the function it returns does the same n iterations.
func mapHeavyLoop() func(n int) {
	strs := make(map[string]int, 1024)
	ints := make(map[int64]int, 1024)
	keys := make([]string, 1024)
	for i := range keys {
		keys[i] = "key-" + strconv.Itoa(i)
		strs[keys[i]] = i
		ints[int64(i)] = i
	}
	return func(iters int) {
		n := 0
		for i := 0; i < iters; i++ {
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
}

func mapHeavy(b *testing.B) {
	work := mapHeavyLoop()
	b.ResetTimer()
	work(b.N)
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
	// The default Guard's cost as issue 11 asks for it: process CPU with
	// it / without it, median of paired slices (paired_linux_test.go).
	b.Run("paired=default", func(b *testing.B) { benchCPURatio(b, "map-heavy") })
}

// BenchmarkIdleCost is what a Guard costs a loop that does no map
// operation at all (no probe fires): its fixed cost, in process CPU from
// paired slices (cpu-ratio and extra-cpu-%, as in BenchmarkMapHeavy).
func BenchmarkIdleCost(b *testing.B) {
	b.Run("paired=default", func(b *testing.B) { benchCPURatio(b, "no-maps") })
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

// BenchmarkGuardHeap is what a started, idle default Guard keeps alive on
// the heap, and how much of it holds pointers: each garbage collection of
// the host scans that part again, so on a small service that collects tens
// of times a second it is a cost in every second (live-KiB, scan-KiB; and
// closed-KiB, what is left after Close). Deterministic, unlike a CPU ratio.
func BenchmarkGuardHeap(b *testing.B) {
	testutil.RequirePrivileged(b)
	samples := []metrics.Sample{{Name: "/gc/heap/live:bytes"}, {Name: "/gc/scan/heap:bytes"}}
	read := func() (live, scan float64) {
		runtime.GC()
		runtime.GC()
		metrics.Read(samples)
		return float64(samples[0].Value.Uint64()), float64(samples[1].Value.Uint64())
	}
	var live, scan, closed float64
	for b.Loop() {
		live0, scan0 := read()
		g, err := mapguard.New(mapguard.Options{})
		if err != nil {
			b.Fatal(err)
		}
		if err := g.Start(context.Background()); err != nil {
			b.Fatal(err)
		}
		g.Events()
		time.Sleep(300 * time.Millisecond) // a few of the reader's ticks
		live1, scan1 := read()
		g.Close()
		live2, _ := read()
		live += live1 - live0
		scan += scan1 - scan0
		closed += live2 - live0
	}
	b.ReportMetric(live/1024/float64(b.N), "live-KiB")
	b.ReportMetric(scan/1024/float64(b.N), "scan-KiB")
	b.ReportMetric(closed/1024/float64(b.N), "closed-KiB")
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

// budgetLoop returns BenchmarkBudget's work: map-heavy (about a quarter of
// its time in map writes, every one of them a deep probe hit while
// attached), and the same n iterations every call.
func budgetLoop() func(n int) {
	m := map[int]int{}
	return func(n int) {
		x := 0
		for i := 0; i < n; i++ {
			m[i&255] = i // a deep hit: write (OpStats, shared writers)
			for j := 0; j < 40; j++ {
				x += j * i // work that is not a map operation
			}
		}
		sink = x
	}
}

// BenchmarkBudget measures what deep watching really costs against its
// budget: budgetLoop without a Guard and with every deep kind and OpStats
// at a 1% budget, in two child processes running side by side, in paired
// slices of the same work (about 0.5 s of CPU each, at least 30 pairs; see paired_linux_test.go for
// the method), until the Guard's child has run
// MAPGUARD_BENCH_BUDGET_SECONDS (default 30) seconds of slices. One Guard
// runs for the whole measurement; its Start and Close are outside it.
//
// For each pair, the extra CPU is (CPU with - CPU without) / wall time of
// the slice with the Guard: a share of one CPU, what Options.Budget
// limits. extra-cpu-x-budget is the median over pairs of that share
// divided by the budget (1: the governor spent exactly the budget; issue
// 11's target is at most 1.25), with its quartiles (-p25, -p75);
// run-extra-cpu-x-budget is the same from the sums over the whole run, and
// mean-extra-cpu-x-budget the mean over pairs with its standard error
// (-se): the budget limits an average, and a sampled site's cost comes in
// windows (one a second), so the mean is the figure to hold against the
// budget and the median the one a burst of other load cannot move; and
// governor-x-budget is the governor's own account (Stats().Budget.Overhead
// / budget) at the end, and trap-scale the trap sampler's correction of the
// calibrated trap costs (Stats().Budget.TrapScale). mean-work-thread-x-budget is the part of the mean
// spent on the thread doing the work (its traps and BPF programs, and any
// slowdown of the work itself); the rest is the Guard's goroutines,
// attaching and detaching, and the garbage collector, whose median over
// pairs is other-threads-x-budget (the work thread's CPU time for the same
// work varies with the machine's load far more than the other threads'). Each b.N iteration is one whole run.
func BenchmarkBudget(b *testing.B) {
	const budget = 0.01
	seconds := 30.0
	if s, err := strconv.ParseFloat(os.Getenv("MAPGUARD_BENCH_BUDGET_SECONDS"), 64); err == nil && s > 0 {
		seconds = s
	}
	n := calibrateWork(budgetLoop(), 500*time.Millisecond)
	var shares, threads, others []float64
	var sumOn, sumOff, sumWall time.Duration
	var last pairedResult
	for b.Loop() {
		last = runPaired(b, "budget", "deep-1pct", n, seconds, 30)
		for i := range last.on {
			on, off := last.on[i], last.off[i]
			shares = append(shares, (on.cpu-off.cpu).Seconds()/on.wall.Seconds())
			threads = append(threads, (on.thread-off.thread).Seconds()/on.wall.Seconds())
			others = append(others, ((on.cpu-on.thread)-(off.cpu-off.thread)).Seconds()/on.wall.Seconds())
			sumOn += on.cpu
			sumOff += off.cpu
			sumWall += on.wall
		}
	}
	p25, p50, p75 := quartiles(shares)
	b.ReportMetric(p50/budget, "extra-cpu-x-budget")
	b.ReportMetric(p25/budget, "extra-cpu-x-budget-p25")
	b.ReportMetric(p75/budget, "extra-cpu-x-budget-p75")
	b.ReportMetric((sumOn-sumOff).Seconds()/sumWall.Seconds()/budget, "run-extra-cpu-x-budget")
	mean, se := meanSE(shares)
	b.ReportMetric(mean/budget, "mean-extra-cpu-x-budget")
	b.ReportMetric(se/budget, "mean-extra-cpu-x-budget-se")
	mean, _ = meanSE(threads)
	b.ReportMetric(mean/budget, "mean-work-thread-x-budget")
	_, p50, _ = quartiles(others)
	b.ReportMetric(p50/budget, "other-threads-x-budget")
	if st := last.stats; st.budget > 0 {
		b.ReportMetric(st.overhead/st.budget, "governor-x-budget")
		b.ReportMetric(float64(st.sampled), "sampled-sites")
		b.ReportMetric(st.trapScale, "trap-scale")
	}
	b.ReportMetric(sumWall.Seconds()/float64(b.N), "guard-on-s")
}

// jsonDoc is BenchmarkReflectJSON's document: structs, maps of strings, of
// numbers and of structs, a nested map, and a slice.
type jsonDoc struct {
	Name    string                        `json:"name"`
	Labels  map[string]string             `json:"labels"`
	Counts  map[string]int                `json:"counts"`
	Items   map[string]jsonItem           `json:"items"`
	Nested  map[string]map[string]float64 `json:"nested"`
	Tags    []string                      `json:"tags,omitempty"`
	Missing map[string]int                `json:"missing,omitempty"`
}

type jsonItem struct {
	ID    int               `json:"id"`
	Price float64           `json:"price"`
	Attrs map[string]string `json:"attrs"`
}

// reflectJSONLoop returns a reflect-heavy workload: encoding/json marshals
// and unmarshals structs holding maps (reflect's map iteration and
// SetMapIndex, the type and field caches), and decodes into an `any`.
func reflectJSONLoop() func(n int) {
	docs := make([]jsonDoc, 8)
	for d := range docs {
		doc := jsonDoc{
			Name:   "doc-" + strconv.Itoa(d),
			Labels: map[string]string{},
			Counts: map[string]int{},
			Items:  map[string]jsonItem{},
			Nested: map[string]map[string]float64{},
			Tags:   []string{"a", "b", "c"},
		}
		for i := 0; i < 12; i++ {
			k := "k" + strconv.Itoa(i)
			doc.Labels[k] = "v" + strconv.Itoa(i*d)
			doc.Counts[k] = i * d
			doc.Items[k] = jsonItem{ID: i, Price: float64(i) / 3, Attrs: map[string]string{"color": "red", "size": k}}
			doc.Nested[k] = map[string]float64{"x": float64(i), "y": float64(d)}
		}
		docs[d] = doc
	}
	return func(n int) {
		x := 0
		for i := 0; i < n; i++ {
			data, err := json.Marshal(&docs[i&7])
			if err != nil {
				panic(err)
			}
			var back jsonDoc
			if err := json.Unmarshal(data, &back); err != nil {
				panic(err)
			}
			var generic map[string]any
			if err := json.Unmarshal(data, &generic); err != nil {
				panic(err)
			}
			x += len(data) + len(back.Items) + len(generic)
		}
		sink = x
	}
}

// BenchmarkReflectJSON is issue 11's "reflect/JSON loop": its time per
// iteration without and with the default Guard (one after the other), and
// paired=default, the default Guard's cost in process CPU from paired
// slices (cpu-ratio, as in BenchmarkMapHeavy).
func BenchmarkReflectJSON(b *testing.B) {
	loop := func(b *testing.B) {
		work := reflectJSONLoop()
		b.ResetTimer()
		work(b.N)
	}
	b.Run("guard=none", loop)
	b.Run("guard=default", func(b *testing.B) {
		g := startReal(b, mapguard.Options{})
		loop(b)
		b.StopTimer()
		reportHits(b, g)
	})
	b.Run("paired=default", func(b *testing.B) { benchCPURatio(b, "reflect-json") })
}
