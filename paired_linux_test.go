//go:build linux && amd64

package mapguard_test

// Paired measurements: what a Guard costs a loop in process CPU, on a
// machine that other work loads.
//
// A Guard watches its own process, so "with" and "without" cannot share
// one: its probes are attached to the process for as long as it runs
// (starting and closing one per measurement would measure Start and Close,
// and the governor's first second, instead of its steady state). So a
// paired benchmark runs two child processes of this test binary
// (TestPairedChild), identical but for the Guard: "off" runs no Guard, "on"
// starts one before the measurement begins and closes it after it ends.
// Both run the same loop in slices of a fixed amount of work, and each
// measures every slice itself: its process CPU time (getrusage, user and
// system, all threads: the work, the traps and BPF programs it takes, the
// Guard's goroutines, the garbage collector) and wall time. Each slice of
// "on" is paired with what the same work cost "off" at the same time, and
// the benchmark reports medians and quartiles over the pairs, so that a
// burst of someone else's load spoils a few pairs, not the result.
//
// Schedule (MAPGUARD_BENCH_PAIRED):
//   - "concurrent" (the default): both children run their slices at the
//     same time, continuously, so the Guard sees a steadily busy program,
//     as in production. Their CPU time per slice is compared, never their
//     wall time. The two drift apart (the same work takes different wall
//     times in each), so a slice of "on" is paired with the "off" slices
//     that ran at the same time, weighted by overlap (alignSlices).
//   - "alternate": one child at a time, in the order off, on, on, off, off,
//     on, ... (slice i of each paired: adjacent, neither always first). The
//     child that waits is idle, and so is its Guard's governor: its token
//     bucket refills (at most half a second's budget) and the windows of
//     sampled sites that fall in the idle time see no hits, so the budget's
//     cost per slice differs from a steady program's. Use it to
//     cross-check the default Guard, where little is sampled.
//
// Left to the scheduler, two identical children each tend to keep to one
// CPU, and the CPUs differ (interrupts, other work): A/A runs on a loaded
// VM read up to 1-4% of a CPU in favour of one of them, on the work
// thread (its CPU time for the same work varies with the load; the other
// threads' does not). MAPGUARD_BENCH_PAIRED_PIN=1 makes the parent pin the
// two work threads to different CPUs and swap them every 250 ms: that
// removed the bias in one A/A run but widened the quartiles, so it is not
// the default.
//
// MAPGUARD_BENCH_PAIRED_CONTROL=1 runs no Guard in either child: the spread
// of that A/A run is the method's own noise. MAPGUARD_BENCH_PAIRED_PROFILE=file
// writes a CPU profile of the "on" child (from its first slice to Close),
// and one of the "off" child to file.off.

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mapguard/mapguard"
	"github.com/mapguard/mapguard/internal/testutil"
)

// pairedLoops are the loops a paired benchmark can run: each returns a
// function doing n units of the same work every call.
var pairedLoops = map[string]func() func(n int){
	"budget":       budgetLoop,
	"map-heavy":    mapHeavyLoop,
	"reflect-json": reflectJSONLoop,
	"no-maps":      noMapsLoop,
}

// noMapsLoop returns a loop without a single map operation: no probe of
// any Guard fires in it, so what a Guard adds to it is its fixed cost (its
// goroutines, and the runtime threads they keep busy).
func noMapsLoop() func(n int) {
	return func(n int) {
		x := 0
		for i := 0; i < n; i++ {
			for j := 0; j < 40; j++ {
				x += j * i
			}
		}
		sink = x
	}
}

// pairedGuards are the Guards a child can run.
var pairedGuards = map[string]func() mapguard.Options{
	"default": func() mapguard.Options { return mapguard.Options{} },
	"deep-1pct": func() mapguard.Options {
		return mapguard.Options{
			Detect:  []mapguard.Kind{mapguard.MissingKeyDelete, mapguard.NilMapDelete, mapguard.SharedWriters},
			OpStats: true,
			Budget:  0.01,
		}
	},
}

// pairedSlice is what a child measured over one slice of work: process
// CPU and wall time, when it started and ended on CLOCK_MONOTONIC (one
// clock for both children), and the CPU time of the thread that did the
// work (the traps and BPF programs its map operations hit run there; the
// rest of cpu is other threads: the Guard's goroutines, attaching and
// detaching probes, the garbage collector).
type pairedSlice struct{ cpu, wall, start, end, thread time.Duration }

// pairedStats is what the "on" child's Guard said at the end.
type pairedStats struct {
	budget, overhead float64
	spent, elapsed   time.Duration
	sampled          int
	hits             uint64
	trapScale        float64
	sites            []string // sites that took hits and threads' CPU, one line each
}

type pairedResult struct {
	off, on []pairedSlice // on[i] is paired with off[i]
	stats   pairedStats
	wall    time.Duration // of the whole measurement
}

// TestPairedChild is not a test: it is the child process of the paired
// benchmarks, and skips unless MAPGUARD_PAIRED_CHILD says which loop and
// Guard to run ("map-heavy,default", "budget,none"). It reads commands on
// stdin ("slice": one slice; "run": slices until "stop"; "stop" or end of
// input: close the Guard and exit) and writes one line per slice on fd 3:
// "slice <cpu ns> <wall ns>".
func TestPairedChild(t *testing.T) {
	spec := os.Getenv("MAPGUARD_PAIRED_CHILD")
	if spec == "" {
		t.Skip("the child process of the paired benchmarks")
	}
	loopName, guardName, _ := strings.Cut(spec, ",")
	n, _ := strconv.Atoi(os.Getenv("MAPGUARD_PAIRED_WORK"))
	mk, ok := pairedLoops[loopName]
	if !ok || n <= 0 {
		t.Fatalf("bad MAPGUARD_PAIRED_CHILD=%q or MAPGUARD_PAIRED_WORK", spec)
	}
	out := bufio.NewWriter(os.NewFile(3, "replies"))
	reply := func(format string, args ...any) {
		fmt.Fprintf(out, format+"\n", args...)
		out.Flush()
	}
	runtime.LockOSThread() // the work runs on this thread (threadCPU)
	work := mk()
	work(max(n/10, 1)) // warm up: maps made, caches filled
	var g *mapguard.Guard
	if opts, ok := pairedGuards[guardName]; ok {
		var err error
		if g, err = mapguard.New(opts()); err != nil {
			t.Fatal(err)
		}
		if err := g.Start(context.Background()); err != nil {
			t.Fatalf("Start: %v", err)
		}
	} else if guardName != "none" {
		t.Fatalf("unknown Guard %q", guardName)
	}
	cmds := make(chan string)
	go func() {
		sc := bufio.NewScanner(os.Stdin)
		for sc.Scan() {
			cmds <- sc.Text()
		}
		close(cmds)
	}()
	slice := func() {
		c0, t0, m0 := processCPU(), threadCPU(), monotonic()
		work(n)
		c1, t1, m1 := processCPU(), threadCPU(), monotonic()
		reply("slice %d %d %d %d %d", int64(c1-c0), int64(m1-m0), int64(m0), int64(m1), int64(t1-t0))
	}
	if path := os.Getenv("MAPGUARD_BENCH_PAIRED_PROFILE"); path != "" {
		// A CPU profile of the "on" child's slices (and of its Guard), and
		// one of the "off" child's in path.off.
		if g == nil {
			path += ".off"
		}
		f, err := os.Create(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			t.Fatal(err)
		}
		defer func() { pprof.StopCPUProfile(); f.Close() }()
	}
	reply("ready %d", unix.Gettid())
loop:
	for cmd := range cmds {
		switch cmd {
		case "slice":
			slice()
		case "run":
			for {
				select {
				case <-cmds: // "stop", or the end of input
					break loop
				default:
					slice()
				}
			}
		default:
			break loop
		}
	}
	// Where the process's CPU went, thread by thread (the work ran on this
	// one): user and system ticks, time on a CPU, times switched out.
	self := strconv.Itoa(unix.Gettid())
	ents, _ := os.ReadDir("/proc/self/task")
	for _, e := range ents {
		dir := "/proc/self/task/" + e.Name()
		stat, _ := os.ReadFile(dir + "/stat")
		sched, _ := os.ReadFile(dir + "/schedstat")
		status, _ := os.ReadFile(dir + "/status")
		f := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
		onCPU := strings.Fields(string(sched))
		ctx := ""
		for _, l := range strings.Split(string(status), "\n") {
			if strings.HasSuffix(strings.Fields(l + " x")[0], "ctxt_switches:") {
				ctx += " " + strings.Join(strings.Fields(l), "=")
			}
		}
		if len(f) > 12 && len(onCPU) > 0 && onCPU[0] != "0" {
			reply("thread guard=%s tid=%s work=%v utime=%s stime=%s oncpu=%sns%s", guardName, e.Name(), e.Name() == self, f[11], f[12], onCPU[0], ctx)
		}
	}
	if g != nil {
		st := g.Stats()
		var hits uint64
		for _, s := range st.Sites {
			hits += s.Hits
			if s.Hits > 0 {
				reply("site %s+%d %s emulated=%v deep=%v hits=%d cost=%v rate=%.0f/s sampled=%v watched=%v",
					s.Function, s.Offset, strings.ReplaceAll(s.Inst, " ", "_"), s.Emulated, s.Deep,
					s.Hits, s.Cost, s.Rate, s.Sampled, s.Watched.Round(time.Millisecond))
			}
		}
		if b := st.Budget; b != nil {
			reply("stats %g %g %d %d %d %d %g", b.Budget, b.Overhead, int64(b.Spent), int64(b.Elapsed), b.Sampled, hits, b.TrapScale)
		}
		g.Close()
	}
	pprof.StopCPUProfile()
	reply("end")
	out.Flush()
	os.Exit(0) // no PASS line, no leak checks: the parent reads fd 3 only
}

// pairedChild is a running child process.
type pairedChild struct {
	name  string
	cmd   *exec.Cmd
	stdin io.WriteCloser
}

func (c *pairedChild) send(cmd string) error {
	_, err := io.WriteString(c.stdin, cmd+"\n")
	return err
}

type pairedMsg struct {
	child  int // 0 off, 1 on
	fields []string
	err    error // the child's replies ended (nil) or failed; fields nil
}

// runPaired runs loop in an "off" and an "on" child (Guard guard), n units
// of work per slice, until the "on" child has worked seconds of wall time
// in slices and at least minPairs pairs are done.
func runPaired(b *testing.B, loop, guard string, n int, seconds float64, minPairs int) pairedResult {
	b.Helper()
	testutil.RequirePrivileged(b)
	alternate := os.Getenv("MAPGUARD_BENCH_PAIRED") == "alternate"
	if os.Getenv("MAPGUARD_BENCH_PAIRED_CONTROL") == "1" {
		guard = "none"
		b.Log("control run: no Guard in either child")
	}
	msgs := make(chan pairedMsg, 64)
	var children [2]*pairedChild
	for i, g := range []string{"none", guard} {
		r, w, err := os.Pipe()
		if err != nil {
			b.Fatal(err)
		}
		cmd := exec.Command(os.Args[0], "-test.run=^TestPairedChild$")
		cmd.Env = append(os.Environ(),
			"MAPGUARD_PAIRED_CHILD="+loop+","+g,
			"MAPGUARD_PAIRED_WORK="+strconv.Itoa(n))
		cmd.ExtraFiles = []*os.File{w}
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr // a failing child says why
		stdin, err := cmd.StdinPipe()
		if err != nil {
			b.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		w.Close()
		c := &pairedChild{name: []string{"off", "on"}[i], cmd: cmd, stdin: stdin}
		children[i] = c
		b.Cleanup(func() {
			c.stdin.Close()
			done := make(chan struct{})
			go func() { c.cmd.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(30 * time.Second):
				c.cmd.Process.Kill() // the child we started, by its process
				<-done
			}
		})
		go func(i int) {
			sc := bufio.NewScanner(r)
			for sc.Scan() {
				msgs <- pairedMsg{child: i, fields: strings.Fields(sc.Text())}
			}
			r.Close()
			msgs <- pairedMsg{child: i, err: sc.Err()}
		}(i)
	}

	var res pairedResult
	var tids [2]int // the children's work threads
	ended := 0
	ready := 0
	// next reads the next message, records a slice or the stats, and
	// returns its first field ("" when a child's replies ended).
	next := func() (int, string) {
		m := <-msgs
		if m.fields == nil {
			ended++
			if m.err != nil {
				b.Fatalf("%s child: %v", children[m.child].name, m.err)
			}
			return m.child, ""
		}
		f := m.fields
		switch f[0] {
		case "ready":
			ready++
			if len(f) > 1 {
				tids[m.child], _ = strconv.Atoi(f[1])
			}
		case "slice":
			var v [5]int64
			for i := range v {
				v[i], _ = strconv.ParseInt(f[1+i], 10, 64)
			}
			s := pairedSlice{time.Duration(v[0]), time.Duration(v[1]), time.Duration(v[2]), time.Duration(v[3]), time.Duration(v[4])}
			if m.child == 0 {
				res.off = append(res.off, s)
			} else {
				res.on = append(res.on, s)
			}
		case "stats":
			st := &res.stats
			st.budget, _ = strconv.ParseFloat(f[1], 64)
			st.overhead, _ = strconv.ParseFloat(f[2], 64)
			v, _ := strconv.ParseInt(f[3], 10, 64)
			st.spent = time.Duration(v)
			v, _ = strconv.ParseInt(f[4], 10, 64)
			st.elapsed = time.Duration(v)
			st.sampled, _ = strconv.Atoi(f[5])
			st.hits, _ = strconv.ParseUint(f[6], 10, 64)
			st.trapScale, _ = strconv.ParseFloat(f[7], 64)
		case "site", "thread":
			res.stats.sites = append(res.stats.sites, strings.Join(f, " "))
		}
		return m.child, f[0]
	}
	for ready < 2 {
		if _, kind := next(); kind == "" {
			b.Fatal("a child ended before it was ready (see its output above)")
		}
	}
	// paired returns the "on" child's slices that have a pair so far.
	paired := func() []pairedSlice {
		if alternate {
			return res.on[:min(len(res.off), len(res.on))]
		}
		on, _ := alignSlices(res.on, res.off)
		return on
	}
	enough := func() bool {
		on := paired()
		return len(on) >= minPairs && sumWall(on).Seconds() >= seconds
	}
	t0 := time.Now()
	if alternate {
		// off, on, on, off, off, on, on, off, ...
		for i := 0; !enough(); i++ {
			c := (i + 1) / 2 % 2
			if err := children[c].send("slice"); err != nil {
				b.Fatal(err)
			}
			for {
				from, kind := next()
				if kind == "" {
					b.Fatalf("%s child ended", children[from].name)
				}
				if from == c && kind == "slice" {
					break
				}
			}
		}
	} else {
		stopPin := make(chan struct{})
		pinned := make(chan struct{})
		go func() {
			defer close(pinned)
			if runtime.NumCPU() < 2 || os.Getenv("MAPGUARD_BENCH_PAIRED_PIN") != "1" {
				return
			}
			tick := time.NewTicker(250 * time.Millisecond)
			defer tick.Stop()
			for k := 0; ; k++ {
				for i, tid := range tids {
					var set unix.CPUSet
					set.Set((k + i) % 2)
					unix.SchedSetaffinity(tid, &set) // fails only once the child is gone
				}
				select {
				case <-stopPin:
					return
				case <-tick.C:
				}
			}
		}()
		for _, c := range children {
			if err := c.send("run"); err != nil {
				b.Fatal(err)
			}
		}
		for !enough() {
			if from, kind := next(); kind == "" {
				b.Fatalf("%s child ended", children[from].name)
			}
		}
		close(stopPin)
		<-pinned
	}
	res.wall = time.Since(t0)
	for _, c := range children {
		c.send("stop")
		c.stdin.Close()
	}
	for ended < 2 {
		next()
	}
	mode := "alternate"
	if alternate {
		k := min(len(res.off), len(res.on))
		res.off, res.on = res.off[:k], res.on[:k] // adjacent in time
	} else {
		mode = "concurrent"
		res.on, res.off = alignSlices(res.on, res.off)
	}
	k := len(res.on)
	b.Logf("%s, %s Guard, %s: %d pairs of %d units, %v of slices on, %v in all",
		loop, guard, mode, k, n, sumWall(res.on).Round(time.Millisecond), res.wall.Round(time.Millisecond))
	for _, s := range res.stats.sites {
		b.Logf("  %s", s)
	}
	if os.Getenv("MAPGUARD_BENCH_PAIRED_LOG") == "1" {
		for i := range res.on {
			on, off := res.on[i], res.off[i]
			b.Logf("  pair %2d: off %v cpu (thread %v) / %v wall, on %v cpu (thread %v) / %v wall: extra %.3f%% of a CPU (thread %.3f%%)",
				i, off.cpu.Round(time.Millisecond), off.thread.Round(time.Millisecond), off.wall.Round(time.Millisecond),
				on.cpu.Round(time.Millisecond), on.thread.Round(time.Millisecond), on.wall.Round(time.Millisecond),
				100*(on.cpu-off.cpu).Seconds()/on.wall.Seconds(), 100*(on.thread-off.thread).Seconds()/on.wall.Seconds())
		}
	}
	return res
}

// sumWall is the wall time of slices.
func sumWall(ss []pairedSlice) (d time.Duration) {
	for _, s := range ss {
		d += s.wall
	}
	return d
}

// alignSlices pairs each slice of on with what the same work cost off at
// the same time: the children's slices drift apart (the same work takes
// different wall times in each), so slice i of one may run while slice
// i+3 of the other does. For each slice of on, the off slices that
// overlapped it in time give its pair: their CPU and wall time averaged,
// each weighted by the share of its work done while s ran (each did the
// same work, so that is what the work cost off then). Slices of on not
// wholly covered by off slices (at the ends) are dropped.
func alignSlices(on, off []pairedSlice) (alignedOn, alignedOff []pairedSlice) {
	if len(off) == 0 {
		return nil, nil
	}
	for _, s := range on {
		if s.start < off[0].start || s.end > off[len(off)-1].end {
			continue
		}
		var w, cpu, wall, thread float64
		for _, o := range off {
			ov := min(s.end, o.end) - max(s.start, o.start)
			if ov <= 0 || o.wall <= 0 {
				continue
			}
			// The share of o's work done during s: weighting by the
			// overlap alone would favour long slices, which are the
			// slow, costly ones on a loaded machine.
			f := float64(ov) / float64(o.wall)
			w += f
			cpu += f * float64(o.cpu)
			wall += f * float64(o.wall)
			thread += f * float64(o.thread)
		}
		if w == 0 {
			continue
		}
		alignedOn = append(alignedOn, s)
		alignedOff = append(alignedOff, pairedSlice{
			cpu: time.Duration(cpu / w), wall: time.Duration(wall / w), start: s.start, end: s.end,
			thread: time.Duration(thread / w),
		})
	}
	return alignedOn, alignedOff
}

// threadCPU is the CPU time of the calling thread so far.
func threadCPU() time.Duration {
	var ru unix.Rusage
	unix.Getrusage(unix.RUSAGE_THREAD, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// monotonic is CLOCK_MONOTONIC, the same clock in every process.
func monotonic() time.Duration {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return time.Duration(ts.Nano())
}

// quartiles returns the 25th, 50th and 75th percentiles of vs
// (interpolated).
func quartiles(vs []float64) (p25, p50, p75 float64) {
	s := slices.Clone(vs)
	slices.Sort(s)
	at := func(q float64) float64 {
		if len(s) == 0 {
			return math.NaN()
		}
		x := q * float64(len(s)-1)
		i := int(x)
		if i+1 >= len(s) {
			return s[len(s)-1]
		}
		return s[i] + (x-float64(i))*(s[i+1]-s[i])
	}
	return at(0.25), at(0.5), at(0.75)
}

// calibrateWork returns how many units of work() take about d on this
// machine now (measured in CPU time, which the machine's other load
// inflates less than wall time).
func calibrateWork(work func(int), d time.Duration) int {
	n := 1
	for {
		c0 := processCPU()
		work(n)
		if el := processCPU() - c0; el >= 100*time.Millisecond {
			return max(1, int(float64(n)*float64(d)/float64(el)))
		}
		n *= 2
	}
}

// meanSE returns the mean of vs and its standard error.
func meanSE(vs []float64) (mean, se float64) {
	if len(vs) == 0 {
		return math.NaN(), math.NaN()
	}
	for _, v := range vs {
		mean += v
	}
	mean /= float64(len(vs))
	if len(vs) < 2 {
		return mean, math.NaN()
	}
	var ss float64
	for _, v := range vs {
		ss += (v - mean) * (v - mean)
	}
	return mean, math.Sqrt(ss/float64(len(vs)-1)) / math.Sqrt(float64(len(vs)))
}

// pairedSeconds is MAPGUARD_BENCH_PAIRED_SECONDS, or def.
func pairedSeconds(def float64) float64 {
	if s, err := strconv.ParseFloat(os.Getenv("MAPGUARD_BENCH_PAIRED_SECONDS"), 64); err == nil && s > 0 {
		return s
	}
	return def
}

// benchCPURatio runs loop off and with the default Guard in paired slices
// and reports cpu-ratio: the median over pairs of CPU time with the Guard
// divided by CPU time without, with its quartiles.
func benchCPURatio(b *testing.B, loop string) {
	n := calibrateWork(pairedLoops[loop](), 250*time.Millisecond)
	var ratios, shares, busy, others []float64
	var last pairedResult
	for b.Loop() {
		last = runPaired(b, loop, "default", n, pairedSeconds(10), 20)
		for i := range last.on {
			on, off := last.on[i], last.off[i]
			ratios = append(ratios, on.cpu.Seconds()/off.cpu.Seconds())
			shares = append(shares, (on.cpu-off.cpu).Seconds()/on.wall.Seconds())
			busy = append(busy, off.cpu.Seconds()/off.wall.Seconds())
			others = append(others, ((on.cpu-on.thread)-(off.cpu-off.thread)).Seconds()/on.wall.Seconds())
		}
	}
	p25, p50, p75 := quartiles(ratios)
	b.ReportMetric(p50, "cpu-ratio")
	b.ReportMetric(p25, "cpu-ratio-p25")
	b.ReportMetric(p75, "cpu-ratio-p75")
	// The budget is a share of one CPU per second of wall time, so the
	// ratio depends on how much of a CPU the loop gets: extra-cpu-% is the
	// Guard's cost as the budget counts it (median over pairs of
	// (CPU with - CPU without) / wall time with), and off-cpu-% how busy
	// the loop without a Guard kept its process (100: one whole CPU).
	_, p50, _ = quartiles(shares)
	b.ReportMetric(p50*100, "extra-cpu-%")
	_, p50, _ = quartiles(busy)
	b.ReportMetric(p50*100, "off-cpu-%")
	// The part of the extra outside the thread doing the work: the Guard's
	// goroutines, and the runtime's threads they keep busy.
	_, p50, _ = quartiles(others)
	b.ReportMetric(p50*100, "other-threads-cpu-%")
	if st := last.stats; st.elapsed > 0 {
		b.ReportMetric(float64(st.hits)/st.elapsed.Seconds(), "hits/s")
		b.ReportMetric(st.overhead*100, "est-overhead-%")
	}
}
