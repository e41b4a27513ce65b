//go:build linux && amd64

package uprobe

import (
	"math"
	"runtime"
	"testing"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
	"golang.org/x/sys/unix"

	"github.com/mapguard/mapguard/decode"
	"github.com/mapguard/mapguard/internal/testutil"
	"github.com/mapguard/mapguard/internal/x86site"
	"github.com/mapguard/mapguard/symbols"
)

var (
	sampleMap    = map[uint64]uint64{1: 1}
	sampleStrMap = map[string]uint64{"a": 1}
	sampleKeys   = []string{"b", "c", "d", "e"}
)

//go:noinline
func sampleMiss(k uint64) uint64 { return sampleMap[k] + sampleStrMap[sampleKeys[k&3]] }

// The trap sampler finds the process in its probes' traps: a loop of
// missing-key reads, every one trapped (the budget is the whole CPU), has
// samples in the traps (at the sites' own addresses or in the [uprobes]
// area) and an estimate of what they cost, and what sampling cost is
// booked.
func TestTrapSampler(t *testing.T) {
	log := funcr.New(func(prefix, args string) { t.Logf("log: %s %s", prefix, args) }, funcr.Options{Verbosity: 1})
	p, _ := startProbe(t, Config{Kinds: []decode.Kind{decode.MissingKeyRead}, Budget: 1, Logger: log})
	if st := p.Stats().Budget; !st.Sampler {
		t.Fatal("trap sampler not running")
	}
	var sum uint64
	// An estimate takes 1-3 s here; on CI's emulated 6.1 VM, where a trap
	// costs 70-115 us and the sites are sampled, 3-11 s, and once it found
	// only 7 samples in traps in 20 s.
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		for k := range uint64(1000) {
			sum += sampleMiss(k + 2)
		}
		p.mu.Lock()
		done := p.samp.estimated()
		p.mu.Unlock()
		if done {
			break
		}
	}
	st := p.Stats().Budget
	t.Logf("%+v", *st)
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.samp.estimated() {
		t.Fatalf("no estimate in 60 s of traps: %d samples in traps of %d", p.samp.inTraps, p.samp.counts.Own)
	}
	if st.TrapSamples < minSamples || st.TrapScale < 1 || st.TrapScale > maxScale {
		t.Errorf("TrapSamples %d, TrapScale %v", st.TrapSamples, st.TrapScale)
	}
	if p.samp.on {
		t.Error("sampler still on after its estimate: it rests")
	}
	atSites := uint64(0)
	for _, s := range p.sites {
		atSites += p.counters[s.index].Samples
	}
	t.Logf("samples: %d of the process's %d; %d at the sites, %d in [uprobes]", p.samp.inTraps, p.samp.counts.Own, atSites, p.samp.counts.Xol)
	// Every sample in a trap is one of the process's too. All of them can
	// be (CI, Go 1.25: 22 of 22): with the sites attached throughout, the
	// loop's thread spends nearly all its time in their traps.
	if atSites == 0 || p.samp.counts.Own < p.samp.inTraps {
		t.Errorf("samples at the sites %d, in traps %d, of the process %d", atSites, p.samp.inTraps, p.samp.counts.Own)
	}
}

// estimated reports whether any scale was estimated (not only
// provisionally).
func (p *sampler) estimated() bool {
	if p.pool.estimates > 0 {
		return true
	}
	for i := range p.known {
		if p.trapEst[i].estimates > 0 {
			return true
		}
	}
	return false
}

// open begins sampling at once, under u.mu (the Guard attaches off it, see
// sampleAttachLocked), for the benchmarks.
func (p *sampler) open() error {
	l, err := p.newLink()
	if err != nil {
		return err
	}
	p.lnk, p.on = l, true
	return nil
}

// The first estimate is preceded by a provisional one from firstSamples
// samples, which it replaces; the sampler rests only after an estimate.
func TestTrapEstimates(t *testing.T) {
	e := scaleEst{scale: 1}
	var a sampleAcc
	// Traps are a hundredth of the samples, the process used 1 s of CPU,
	// the hits' floors were 4 ms: the traps cost 10 ms, a scale of 2.5.
	feed := func(samples float64) (bool, bool) {
		a = sampleAcc{samples: samples, own: uint64(100 * samples), cpu: 1e9, floor: 4e6}
		moved, done, _ := e.update(&a)
		return moved, done
	}
	if moved, done := feed(firstSamples - 1); moved || done || e.scale != 1 {
		t.Fatalf("%d samples: moved %v, done %v, scale %v", firstSamples-1, moved, done, e.scale)
	}
	if moved, done := feed(firstSamples); !moved || done || math.Abs(e.scale-2.5) > 1e-9 || !e.provisional {
		t.Fatalf("%d samples: moved %v, done %v, scale %v, want a provisional 2.5", firstSamples, moved, done, e.scale)
	}
	if a.samples != firstSamples {
		t.Errorf("the provisional estimate dropped its samples (%v left): the first estimate counts them", a.samples)
	}
	// Still short of minSamples: no second provisional estimate.
	a = sampleAcc{samples: minSamples - 1, own: 50 * (minSamples - 1), cpu: 1e9, floor: 4e6}
	if moved, _, _ := e.update(&a); moved {
		t.Errorf("a second provisional estimate (scale %v)", e.scale)
	}
	// The first estimate replaces the provisional one; the next moves halfway.
	if moved, done := feed(minSamples); !moved || !done || math.Abs(e.scale-2.5) > 1e-9 || e.estimates != 1 {
		t.Fatalf("first estimate: moved %v, done %v, scale %v", moved, done, e.scale)
	}
	a = sampleAcc{samples: minSamples, own: 200 * minSamples, cpu: 1e9, floor: 4e6} // 1.25
	if moved, done, _ := e.update(&a); !moved || !done || math.Abs(e.scale-(2.5+1.25)/2) > 1e-9 {
		t.Errorf("second estimate: moved %v, done %v, scale %v, want %v", moved, done, e.scale, (2.5+1.25)/2)
	}
	// Samples with no floor (a trap's code ran while it was detached) tell
	// nothing: they are dropped.
	a = sampleAcc{samples: minSamples, own: 1e4, cpu: 1e9}
	if moved, _, _ := e.update(&a); moved || a.samples != 0 {
		t.Errorf("samples without hits: moved %v, %v samples left", moved, a.samples)
	}
}

// trapIPs gives the breakpoint, one past it, and where the instruction
// resumes: the next instruction and, for an emulated branch, its target;
// only the target for an emulated JMP, neither for a CALL.
func TestTrapIPs(t *testing.T) {
	call := &site{fn: symbols.Func{Entry: 0x1000}, found: found{at: x86site.Site{Offset: 0x20, Inst: "CALL .+992", Emulated: true, Len: 5, Branch: true, Target: 0x400}}}
	if ips, n := trapIPs(call); n != 2 || ips != [4]uint64{0x1020, 0x1021, 0, 0} {
		t.Errorf("emulated CALL: %#x", ips[:n])
	}
	jmp := &site{fn: symbols.Func{Entry: 0x1000}, found: found{at: x86site.Site{Offset: 0x20, Inst: "JMP .+16", Emulated: true, Len: 2, Branch: true, Target: 0x32}}}
	if ips, n := trapIPs(jmp); n != 3 || ips != [4]uint64{0x1020, 0x1021, 0x1032, 0} {
		t.Errorf("emulated JMP: %#x", ips[:n])
	}
	jcc := &site{fn: symbols.Func{Entry: 0x1000}, found: found{at: x86site.Site{Offset: 0x20, Inst: "JE .+4", Emulated: true, Len: 2, Branch: true, Target: 0x26}}}
	if ips, n := trapIPs(jcc); n != 4 || ips != [4]uint64{0x1020, 0x1021, 0x1022, 0x1026} {
		t.Errorf("emulated JE: %#x", ips[:n])
	}
	step := &site{fn: symbols.Func{Entry: 0x1000}, found: found{at: x86site.Site{Offset: 0x30, Inst: "LEAQ 0x10(IP), AX", Len: 7}}}
	if ips, n := trapIPs(step); n != 3 || ips != [4]uint64{0x1030, 0x1031, 0x1037, 0} {
		t.Errorf("single-stepped LEAQ: %#x", ips[:n])
	}
}

// A trap whose own samples are enough gets a scale of its own; the
// others are booked at the pool's, estimated from their samples less
// those of the trap with the most, and sites at one instruction share
// their trap's.
func TestTrapScalePerTrap(t *testing.T) {
	at := func(i uint32, off uint64) *site {
		return &site{index: i, fn: symbols.Func{Entry: 0x1000, FileOffset: 0x1000}, found: found{at: x86site.Site{Offset: off, Inst: "JE .+4", Emulated: true, Len: 2, Branch: true, Target: off + 6}}}
	}
	// 0: a cold trap (a hit followed by a recovered panic); 1 and 2: one
	// instruction, two sites; 3, 4 and 5: other traps.
	u := &uprobes{log: logr.Discard(), samp: &sampler{pool: scaleEst{scale: 1}}}
	u.sites = []*site{at(0, 0x10), at(1, 0x40), at(2, 0x40), at(3, 0x80), at(4, 0x90), at(5, 0xa0)}
	p := u.samp
	u.addTrapIPsLocked(p)
	if [6]uint32(p.trapKey[:6]) != [6]uint32{0, 1, 1, 3, 4, 5} {
		t.Fatalf("trap keys %v, want 0 1 1 3 4 5", p.trapKey[:6])
	}
	// A sample is 0.1 ms of the process's CPU. The cold trap: 10
	// samples, 1 ms, on floors of 0.1 ms: a scale of 10, at the cap.
	// Trap 1: 7 samples on 0.35 ms of floors (a scale of 2, short of an
	// estimate of its own, the pool's biggest); 3 and 4: 3 samples each
	// on 0.5 ms, 6 with trap 1's left out, short of the pool's first.
	acc := func(samples, floor float64) sampleAcc {
		return sampleAcc{samples: samples, own: 1e4, cpu: 1e9, floor: floor}
	}
	p.trapAcc[0], p.trapAcc[1], p.trapAcc[3], p.trapAcc[4] = acc(10, 1e5), acc(7, 3.5e5), acc(3, 5e5), acc(3, 5e5)
	p.acc = sampleAcc{own: 1e4, cpu: 1e9}
	if moved, done := u.estimateLocked(); !moved || done {
		t.Fatalf("moved %v, done %v: want provisional scales", moved, done)
	}
	for i, want := range []float64{maxScale, 1, 1, 1, 1, 1} {
		if got := p.scaleOf(uint32(i)); math.Abs(got-want) > 1e-9 {
			t.Errorf("site %d: scale %v, want %v", i, got, want)
		}
	}
	if p.pool.provisional {
		t.Errorf("pool scale %v, provisional: its traps but the biggest have 6 samples", p.pool.scale)
	}
	// Trap 5's samples make the pool's first: 8 samples besides trap 1's,
	// on 1.6 ms of floors less nothing of program: 0.5, so 1.
	p.trapAcc[5] = acc(0, 6e5)
	p.trapAcc[3].samples, p.trapAcc[4].samples = 4, 4
	u.estimateLocked()
	if !p.pool.provisional || p.pool.scale != 1 {
		t.Errorf("pool: %+v, want a provisional 1", p.pool)
	}
	// Sites added later at a known instruction share its trap.
	u.sites = append(u.sites, at(6, 0x10))
	u.addTrapIPsLocked(p)
	if got := p.scaleOf(6); got != maxScale {
		t.Errorf("a site at the cold trap's instruction: scale %v, want %v", got, maxScale)
	}
}

// The sampler stops for the second before the next tick's samples would
// take it past its share of the budget, not after.
func TestSampleCapped(t *testing.T) {
	const perSecond = 10e6 // the default budget's second: 1 ms of samples, 333 at 3 us
	for _, tc := range []struct {
		secOwn, own uint64
		want        bool
	}{
		{0, 100, false},
		{100, 100, false},
		{290, 190, true}, // 0.87 ms so far, 1.44 ms by the next tick
		{340, 0, true},
	} {
		if got := sampleCapped(tc.secOwn, tc.own, perSecond); got != tc.want {
			t.Errorf("%d samples so far, %d in the last tick: capped %v, want %v", tc.secOwn, tc.own, got, tc.want)
		}
	}
}

var sampleSink uint64

// sampleWork is a fixed amount of CPU work, about 20 ms here.
func sampleWork() {
	x := sampleSink | 1
	for range 20_000_000 {
		x = x*6364136223846793005 + 1442695040888963407
	}
	sampleSink = x
}

// BenchmarkSampleCost measures what one sample of the trap sampler costs
// (sampleCost): the program's run in the timer's interrupt, from the
// kernel's BPF run-time statistics (turned on for the benchmark; they add
// two clock reads to each run), while this thread works. Each iteration
// works twice, once counting this process (ns/own-sample: its samples'
// runs, less the others' at the rate measured the other time) and once
// counting nothing (ns/other-run: every run returns at once, as for the
// other processes' interrupts). The Guard's reader waits meanwhile, so
// that it neither turns the sampler off nor reads its counts.
func BenchmarkSampleCost(b *testing.B) {
	testutil.RequirePrivileged(b)
	p, _ := startProbe(b, Config{Kinds: []decode.Kind{decode.NilMapWrite}})
	if p.samp == nil {
		b.Skip("no trap sampler here")
	}
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		b.Skip("no BPF run-time statistics:", err)
	}
	defer stats.Close()
	tgid := p.coll.Variables[mapguardVarSampleTgid]
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.samp.open(); err != nil {
		b.Fatal(err)
	}
	defer p.samp.close()
	defer tgid.Set(uint32(unix.Getpid()))
	counts := func() mapguardSampleCounts {
		var c mapguardSampleCounts
		if _, err := p.samp.mem.ReadAt(unsafe.Slice((*byte)(unsafe.Pointer(&c)), unsafe.Sizeof(c)), p.samp.off); err != nil {
			b.Fatal(err)
		}
		return c
	}
	// work runs sampleWork counting tgid's samples and returns the runs,
	// their time and the samples counted.
	work := func(id uint32) (runs uint64, ns float64, own uint64) {
		if err := tgid.Set(id); err != nil {
			b.Fatal(err)
		}
		s0, err := p.samp.prog.Stats()
		if err != nil {
			b.Fatal(err)
		}
		c0 := counts()
		for range 10 {
			sampleWork()
		}
		s1, err := p.samp.prog.Stats()
		if err != nil {
			b.Fatal(err)
		}
		return s1.RunCount - s0.RunCount, float64(s1.Runtime - s0.Runtime), counts().Own - c0.Own
	}
	var otherRuns, ownRuns, own uint64
	var otherNs, ownNs float64
	for b.Loop() {
		r, ns, _ := work(0)
		otherRuns, otherNs = otherRuns+r, otherNs+ns
		r, ns, o := work(uint32(unix.Getpid()))
		ownRuns, ownNs, own = ownRuns+r, ownNs+ns, own+o
	}
	if otherRuns == 0 || own == 0 {
		b.Fatalf("runs %d counting nothing, %d samples counted", otherRuns, own)
	}
	other := otherNs / float64(otherRuns)
	b.ReportMetric(other, "ns/other-run")
	b.ReportMetric((ownNs-other*float64(ownRuns-own))/float64(own), "ns/own-sample")
}

// BenchmarkSamplerSwitch measures what the trap sampler adds to a context
// switch: two threads hand one goroutine's turn to the other (GOMAXPROCS
// 1, each locked to its thread), ns/op a round trip of two switches, with
// no sampler, with the sampler on (the timer's tracepoint: nothing per
// switch), and with what the sampler used first: a task-clock perf event
// on each thread, 200 samples a second of its CPU, no program (the kernel
// stops and starts each event's timer at every switch).
func BenchmarkSamplerSwitch(b *testing.B) {
	testutil.RequirePrivileged(b)
	p, _ := startProbe(b, Config{Kinds: []decode.Kind{decode.NilMapWrite}})
	if p.samp == nil {
		b.Skip("no trap sampler here")
	}
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	for _, mode := range []string{"none", "tick", "task-clock"} {
		b.Run("sampler="+mode, func(b *testing.B) {
			ping, pong := make(chan struct{}), make(chan struct{})
			tid := make(chan int)
			go func() {
				runtime.LockOSThread()
				defer runtime.UnlockOSThread()
				tid <- unix.Gettid()
				for range ping {
					pong <- struct{}{}
				}
			}()
			defer close(ping)
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			tids := []int{unix.Gettid(), <-tid}
			switch mode {
			case "tick":
				p.mu.Lock() // the reader must not turn it off
				if err := p.samp.open(); err != nil {
					p.mu.Unlock()
					b.Fatal(err)
				}
				defer func() { p.samp.close(); p.mu.Unlock() }()
			case "task-clock":
				for _, t := range tids {
					attr := unix.PerfEventAttr{
						Type:   unix.PERF_TYPE_SOFTWARE,
						Config: unix.PERF_COUNT_SW_TASK_CLOCK,
						Size:   uint32(unsafe.Sizeof(unix.PerfEventAttr{})),
						Sample: uint64(time.Second / 200),
					}
					fd, err := unix.PerfEventOpen(&attr, t, -1, -1, unix.PERF_FLAG_FD_CLOEXEC)
					if err != nil {
						b.Fatal(err)
					}
					defer unix.Close(fd)
				}
			}
			for b.Loop() {
				ping <- struct{}{}
				<-pong
			}
		})
	}
}
