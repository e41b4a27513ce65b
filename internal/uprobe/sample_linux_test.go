//go:build linux && amd64

package uprobe

import (
	"math"
	"runtime"
	"slices"
	"testing"
	"time"
	"unsafe"

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
		done := p.samp.estimates > 0
		p.mu.Unlock()
		if done {
			break
		}
	}
	st := p.Stats().Budget
	t.Logf("%+v", *st)
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.samp.estimates == 0 {
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

// The first estimate is preceded by a provisional one from firstSamples
// samples, which it replaces; the sampler rests only after an estimate.
func TestTrapEstimates(t *testing.T) {
	u := &uprobes{log: logr.Discard(), samp: &sampler{scale: 1}}
	p := u.samp
	// Traps are a hundredth of the samples, the process used 1 s of CPU,
	// the hits' floors were 4 ms: the traps cost 10 ms, a scale of 2.5.
	feed := func(samples uint64) (bool, bool) {
		p.acc = sampleAcc{samples: samples, own: 100 * samples, cpu: 1e9, floor: 4e6}
		return u.estimateLocked()
	}
	if moved, done := feed(firstSamples - 1); moved || done || p.scale != 1 {
		t.Fatalf("%d samples: moved %v, done %v, scale %v", firstSamples-1, moved, done, p.scale)
	}
	if moved, done := feed(firstSamples); !moved || done || math.Abs(p.scale-2.5) > 1e-9 || !p.provisional {
		t.Fatalf("%d samples: moved %v, done %v, scale %v, want a provisional 2.5", firstSamples, moved, done, p.scale)
	}
	if p.acc.samples != firstSamples {
		t.Errorf("the provisional estimate dropped its samples (%d left): the first estimate counts them", p.acc.samples)
	}
	// Still short of minSamples: no second provisional estimate.
	p.acc = sampleAcc{samples: minSamples - 1, own: 50 * (minSamples - 1), cpu: 1e9, floor: 4e6}
	if moved, _ := u.estimateLocked(); moved {
		t.Errorf("a second provisional estimate (scale %v)", p.scale)
	}
	// The first estimate replaces the provisional one; the next moves halfway.
	if moved, done := feed(minSamples); !moved || !done || math.Abs(p.scale-2.5) > 1e-9 || p.estimates != 1 {
		t.Fatalf("first estimate: moved %v, done %v, scale %v", moved, done, p.scale)
	}
	p.acc = sampleAcc{samples: minSamples, own: 200 * minSamples, cpu: 1e9, floor: 4e6} // 1.25
	if moved, done := u.estimateLocked(); !moved || !done || math.Abs(p.scale-(2.5+1.25)/2) > 1e-9 {
		t.Errorf("second estimate: moved %v, done %v, scale %v, want %v", moved, done, p.scale, (2.5+1.25)/2)
	}
}

// trapIPs gives the breakpoint, one past it, and where the instruction
// resumes: the next instruction and, for an emulated branch, its target.
func TestTrapIPs(t *testing.T) {
	call := &site{fn: symbols.Func{Entry: 0x1000}, found: found{at: x86site.Site{Offset: 0x20, Emulated: true, Len: 5, Branch: true, Target: 0x400}}}
	if ips, n := trapIPs(call); n != 4 || ips != [4]uint64{0x1020, 0x1021, 0x1025, 0x1400} {
		t.Errorf("emulated CALL: %#x", ips[:n])
	}
	step := &site{fn: symbols.Func{Entry: 0x1000}, found: found{at: x86site.Site{Offset: 0x30, Len: 7}}}
	if ips, n := trapIPs(step); n != 3 || ips != [4]uint64{0x1030, 0x1031, 0x1037, 0} {
		t.Errorf("single-stepped LEAQ: %#x", ips[:n])
	}
}

// The sampler never spends more than sampleShare of the budget on its
// samples: a process busy on many CPUs is sampled more slowly, and one on
// very many not at all.
func TestSampleRate(t *testing.T) {
	budget := 0.01 * float64(time.Second)
	for _, c := range []struct{ cpus, want float64 }{{0, sampleHz}, {0.5, sampleHz}, {0.9, 185.2}, {1.5, 111.1}, {4, 41.7}, {16, 10.4}, {64, 2.6}} {
		got := sampleRate(budget, c.cpus)
		if got < c.want-0.1 || got > c.want+0.1 {
			t.Errorf("%v CPUs: %.1f Hz, want %.1f", c.cpus, got, c.want)
		}
		if cost := got * max(c.cpus, 0.1) * float64(sampleCost); cost > sampleShare*budget*1.0001 {
			t.Errorf("%v CPUs: samples cost %.0f ns a second, over %v of the budget", c.cpus, cost, sampleShare)
		}
	}
	if sampleRate(budget, 64) >= minHz {
		t.Error("64 busy CPUs are sampled")
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
// the thread it interrupts (sampleCost): the same work timed on the
// thread's CPU clock with a task-clock event at 10 kHz on the thread, the
// trap sampler's program attached, and without, alternately. ns/sample is
// the difference of the medians over the samples taken.
func BenchmarkSampleCost(b *testing.B) {
	testutil.RequirePrivileged(b)
	p, _ := startProbe(b, Config{Kinds: []decode.Kind{decode.NilMapWrite}})
	if p.samp == nil {
		b.Skip("no trap sampler here")
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	const hz = 10_000
	attr := unix.PerfEventAttr{
		Type:   unix.PERF_TYPE_SOFTWARE,
		Config: unix.PERF_COUNT_SW_TASK_CLOCK,
		Size:   uint32(unsafe.Sizeof(unix.PerfEventAttr{})),
		Sample: uint64(time.Second / hz),
		Bits:   unix.PerfBitDisabled,
	}
	fd, err := unix.PerfEventOpen(&attr, unix.Gettid(), -1, -1, unix.PERF_FLAG_FD_CLOEXEC)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.IoctlSetInt(fd, unix.PERF_EVENT_IOC_SET_BPF, p.samp.prog.FD()); err != nil {
		b.Fatal(err)
	}
	var on, off []float64
	for b.Loop() {
		t0 := threadCPU()
		sampleWork()
		t1 := threadCPU()
		unix.IoctlSetInt(fd, unix.PERF_EVENT_IOC_ENABLE, 0)
		sampleWork()
		unix.IoctlSetInt(fd, unix.PERF_EVENT_IOC_DISABLE, 0)
		t2 := threadCPU()
		off, on = append(off, float64(t1-t0)), append(on, float64(t2-t1))
	}
	slices.Sort(on)
	slices.Sort(off)
	mOn, mOff := on[len(on)/2], off[len(off)/2]
	b.ReportMetric((mOn-mOff)/(mOn/1e9*hz), "ns/sample")
}
