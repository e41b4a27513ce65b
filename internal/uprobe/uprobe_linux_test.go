//go:build linux && amd64

package uprobe

import (
	"context"
	"reflect"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/mapguard/mapguard/decode"
	"github.com/mapguard/mapguard/internal/testutil"
	"github.com/mapguard/mapguard/probe"
	"github.com/mapguard/mapguard/symbols"
)

// startProbe starts real uprobes and returns a channel of their events.
func startProbe(t testing.TB, cfg Config) (*uprobes, <-chan decode.Event) {
	t.Helper()
	testutil.RequirePrivileged(t)
	p := New(cfg).(*uprobes)
	events := make(chan decode.Event, 64)
	if err := p.Start(context.Background(), func(ev *decode.Event) {
		select {
		case events <- *ev:
		default:
		}
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p, events
}

var sinkByte uint8

// The perf-event path, used on kernels without a working uprobe_multi,
// attaches, delivers and detaches too.
func TestPerfEventLinks(t *testing.T) {
	forceSingleLinks = true
	defer func() { forceSingleLinks = false }()
	p, events := startProbe(t, Config{Kinds: []decode.Kind{decode.NilMapRead}})
	if p.multi {
		t.Fatal("uprobe_multi used despite forceSingleLinks")
	}
	var m map[int64]uint8
	sinkByte = m[42]
	select {
	case ev := <-events:
		if ev.Kind != decode.NilMapRead || ev.MapType != "map[int64]uint8" {
			t.Fatalf("event %v", ev)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no event")
	}
	begin := time.Now()
	p.Close()
	t.Logf("closed %d perf-event links in %v", len(p.sites), time.Since(begin))
}

func TestMultiLinks(t *testing.T) {
	p, _ := startProbe(t, Config{})
	if !haveUprobeMulti() {
		t.Skip("kernel without a per-process uprobe_multi filter")
	}
	if !p.multi {
		t.Fatal("uprobe_multi available but not used")
	}
	begin := time.Now()
	p.Close()
	t.Logf("closed %d uprobe_multi links in %v", len(p.sites), time.Since(begin))
}

func TestSitesChosen(t *testing.T) {
	p, _ := startProbe(t, Config{})
	st := p.Stats()
	if len(st.Sites) == 0 {
		t.Fatal("no sites")
	}
	for _, s := range st.Sites {
		if !s.Armed || s.Offset == 0 || s.Inst == "" {
			t.Errorf("site %+v", s)
		}
	}
	for _, in := range st.Inactive {
		if in.Reason != "not in binary" {
			t.Errorf("function not probed: %+v", in)
		}
	}
}

// Start returns before the trap costs are calibrated: until then every
// site is costed at the assumed (high) trap cost, and the governor's first
// tick calibrates soon after.
func TestCalibrationAfterStart(t *testing.T) {
	p, _ := startProbe(t, Config{})
	b := p.Stats().Budget
	if b == nil {
		t.Fatal("no budget stats")
	}
	if b.Calibrations == 0 && (b.StepCost != assumedTrapCost || b.EmulatedCost != assumedTrapCost) {
		t.Errorf("not calibrated yet, but costs %v single-stepped, %v emulated; want %v for both", b.StepCost, b.EmulatedCost, assumedTrapCost)
	}
	deadline := time.Now().Add(10 * time.Second)
	for b.Calibrations == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
		b = p.Stats().Budget
	}
	if b.Calibrations == 0 {
		t.Fatal("not calibrated 10 s after Start")
	}
	if b.EmulatedCost <= 0 || b.EmulatedCost >= b.StepCost || b.LinkCost <= 0 {
		t.Errorf("calibrated: %v single-stepped, %v emulated, %v a link", b.StepCost, b.EmulatedCost, b.LinkCost)
	}
	st := p.Stats()
	for _, s := range st.Sites {
		if s.Emulated && s.Cost >= assumedTrapCost {
			t.Errorf("site %s+%#x still costed at %v after calibration (emulated trap %v)", s.Function, s.Offset, s.Cost, b.EmulatedCost)
		}
	}
	t.Logf("calibrated %+v", *b)
}

// Recalibrations run on the governor's waker without the probe's lock, and
// the first measures what a link costs the rest of the process, which
// Start's calibration leaves assumed.
func TestRecalibration(t *testing.T) {
	old := recalibrateEvery
	recalibrateEvery = 200 * time.Millisecond
	t.Cleanup(func() { recalibrateEvery = old })
	p, _ := startProbe(t, Config{})
	deadline := time.Now().Add(15 * time.Second)
	var b *probe.BudgetStats
	for time.Now().Before(deadline) {
		if b = p.Stats().Budget; b != nil && b.Calibrations >= 3 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if b == nil || b.Calibrations < 3 {
		t.Fatalf("calibrations after 15 s at one per 200 ms: %+v", b)
	}
	p.mu.Lock()
	measured, thread, others := p.othersMeasured, p.linkThread, p.linkOthers
	p.mu.Unlock()
	if !measured {
		t.Errorf("a link's cost to the rest of the process still assumed after %d calibrations", b.Calibrations)
	}
	t.Logf("link: %v on the thread, %v for the rest; %+v", thread, others, *b)
}

var nestedProbeMap = map[string]map[string]int{"a": {"b": 1}}

//go:noinline
func nestedProbeRead(a, b string) int { return nestedProbeMap[a][b] }

// A nested read in the program's code gets a site of its own at its CALL;
// while it is attached, the kernel's breakpoint is in the process's code,
// and what the Guard decodes there (the call's map type, the nested read
// itself, the call's target) is still the program's code.
func TestCallerSiteCode(t *testing.T) {
	sink := nestedProbeRead("x", "y")
	_ = sink
	// A budget of one CPU: the search for nested reads is paced to half
	// of it (at the default 1%, it takes seconds on the slow VMs).
	p, _ := startProbe(t, Config{Kinds: []decode.Kind{decode.NestedMapMiss}, Budget: 1})
	fn := runtime.FuncForPC(reflect.ValueOf(nestedProbeRead).Pointer()).Name()
	s := awaitCallerSite(t, p, fn)
	call, ret := uintptr(s.wrapRet[0]-5), uintptr(s.wrapRet[0])
	mem := unsafe.Slice((*byte)(*(*unsafe.Pointer)(unsafe.Pointer(&call))), 1)
	if mem[0] != 0xcc {
		t.Logf("memory at the probed CALL holds %#x, not the breakpoint: nothing to restore", mem[0])
	}
	if got := codeAt(call, call+1); got[0] != 0xe8 {
		t.Errorf("codeAt at the probed CALL = %#x, want the CALL opcode", got[0])
	}
	if callTarget(ret) != "runtime.mapaccess1_faststr" {
		t.Errorf("callTarget(ret) = %q", callTarget(ret))
	}
	want := callSiteType(p.offsets, uintptr(s.wrapRet[1]))
	if want == 0 {
		t.Fatal("no map type at the outer read")
	}
	p.mu.Lock()
	p.nestedAt = nil
	p.mu.Unlock()
	if outer, ok := nestedOuter(p.offsets, ret); !ok || outer != uintptr(s.wrapRet[1]) {
		t.Errorf("nestedOuter(ret) = %#x, %v; want %#x", outer, ok, s.wrapRet[1])
	}
	if typ := callSiteType(p.offsets, ret); typ == 0 {
		t.Error("no map type at the inner read, decoded through the breakpoint")
	}
}

// The search for nested reads runs after Start, in the watched process:
// it reads no map that could miss, so it never traps at the Guard's own
// probes. Run here on a goroutine the probe watches, any such read would
// be a missing-key or nil-map read call site in the search's code; a miss
// of the test's own shows that those are counted.
func TestNestedScanNoTraps(t *testing.T) {
	bin, err := symbols.OpenSelf() // as Start does, before the probes are attached
	if err != nil {
		t.Fatal(err)
	}
	defer bin.Close()
	p, _ := startProbe(t, Config{Kinds: []decode.Kind{decode.MissingKeyRead, decode.NilMapRead}, Budget: 1})
	chunks := 0
	n, complete := findNestedReads(bin, symbolsCallee(bin), func() error { chunks++; return nil })
	if !complete || chunks == 0 {
		t.Fatalf("search incomplete (%v) or not paced (%d calls)", complete, chunks)
	}
	fn := runtime.FuncForPC(reflect.ValueOf(nestedProbeRead).Pointer()).Name()
	found := false
	for _, s := range n.sites {
		found = found || s.fn.Name == fn
	}
	if !found {
		t.Errorf("the search did not find %s's nested read", fn)
	}
	sinkInt = scanControlMiss("absent")
	deadline := time.Now().Add(5 * time.Second)
	for {
		control := false
		for _, c := range p.Stats().CallSites {
			f := c.Site.Function
			control = control || strings.HasSuffix(f, ".scanControlMiss")
			if strings.Contains(f, "/internal/x86site.") || strings.Contains(f, "/symbols.") || strings.Contains(f, "findNestedReads") || strings.Contains(f, "symbolsCallee") {
				t.Errorf("the search read a map that missed: %s at %s", c.Kind, c.Site)
			}
		}
		if control {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the control miss was not counted: the test does not test what it says")
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("%d sites, %d pace calls", len(n.sites), chunks)
}

var (
	scanControl = map[string]int{"present": 1}
	sinkInt     int
)

//go:noinline
func scanControlMiss(k string) int { return scanControl[k] }

// The search for nested reads goes on after Start (here held at its first
// step until Close) and Close stops it: nothing of it is left, and its
// sites are not attached afterwards.
func TestNestedScanStopsAtClose(t *testing.T) {
	pace := func(stop <-chan struct{}) { <-stop }
	testScanPace.Store(&pace)
	defer testScanPace.Store(nil)
	p, _ := startProbe(t, Config{Kinds: []decode.Kind{decode.NestedMapMiss}})
	p.mu.Lock()
	done := p.scanDone
	p.mu.Unlock()
	if done == nil {
		t.Fatal("no search for nested reads after Start")
	}
	select {
	case <-done:
		t.Fatal("the search ended before Close")
	case <-time.After(50 * time.Millisecond):
	}
	begin := time.Now()
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	default:
		t.Fatal("Close returned with the search running")
	}
	if d := time.Since(begin); d > time.Second {
		t.Errorf("Close took %v with the search running", d)
	}
	for _, s := range p.sites {
		if s.flags&siteCaller != 0 {
			t.Errorf("a nested read's site added: %s", s.fn.Name)
		}
	}
}

// awaitCallerSite waits for the site at the inner read of m[a][b] in fn,
// which the search for nested reads adds after Start.
func awaitCallerSite(t *testing.T, p *uprobes, fn string) *site {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		p.mu.Lock()
		for _, c := range p.sites {
			if c.flags&siteCaller != 0 && c.link != nil && runtime.FuncForPC(uintptr(c.wrapRet[0])).Name() == fn {
				p.mu.Unlock()
				return c
			}
		}
		p.mu.Unlock()
		if time.Now().After(deadline) {
			t.Fatalf("no site at %s's inner read 10 s after Start", fn)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// An attach runs off the probe's lock: attachGroupLocked returns before
// the link exists (Stats, the readers and the governor do not wait for an
// attach, 0.04-21 ms under load), and the site is attached, and traps,
// once the lock is free.
func TestAttachOffLock(t *testing.T) {
	p, events := startProbe(t, Config{Kinds: []decode.Kind{decode.NilMapRead}})
	i := -1
	p.mu.Lock()
	for k, s := range p.sites {
		if s.link != nil && !s.deep && s.kind == decode.NilMapRead {
			i = k
			break
		}
	}
	if i < 0 {
		p.mu.Unlock()
		t.Fatal("no attached nil-map-read site")
	}
	b, ok := p.detachBatchLocked([]int{i})
	p.mu.Unlock()
	if !ok {
		t.Fatal("site not detached")
	}
	p.detaches.Add(1)
	p.detach(b.sites, b.links, p.lane.enter(laneDetach))

	p.mu.Lock()
	s := p.sites[i]
	if s.link != nil {
		p.mu.Unlock()
		t.Skip("the governor attached the site again first")
	}
	begin := time.Now()
	p.attachGroupLocked([]int{i})
	returned := time.Since(begin)
	attaching, linked := s.attaching, s.link != nil
	time.Sleep(50 * time.Millisecond) // the attach's syscall runs meanwhile
	p.mu.Unlock()
	t.Logf("attachGroupLocked returned in %v", returned)
	if !attaching || linked {
		t.Fatalf("after attachGroupLocked: attaching %v, linked %v; want an attach in flight", attaching, linked)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		p.mu.Lock()
		linked, attaching = s.link != nil, s.attaching
		p.mu.Unlock()
		if linked && !attaching {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("site not attached 5 s after the lock was freed (attaching %v)", attaching)
		}
		time.Sleep(time.Millisecond)
	}
	for len(events) > 0 {
		<-events
	}
	var m map[int64]uint8
	sinkByte = m[43]
	select {
	case ev := <-events:
		if ev.Kind != decode.NilMapRead {
			t.Fatalf("event %v", ev)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no event from the site attached off the lock")
	}
}

// Stats does not wait for the probe's lock: with it held (by a plan's
// move, say), Stats answers from the last account's view, with the
// kernel's counters of now.
func TestStatsOffLock(t *testing.T) {
	p, _ := startProbe(t, Config{Kinds: []decode.Kind{decode.NilMapRead}})
	hits := func(st probe.Stats) (n uint64) {
		for _, s := range st.Sites {
			if s.Kind == decode.NilMapRead && !s.Deep {
				n += s.Hits
			}
		}
		return n
	}
	before := hits(p.Stats())
	p.mu.Lock()
	locked := true
	defer func() {
		if locked {
			p.mu.Unlock()
		}
	}()
	const reads = 25
	var m map[int64]uint8
	for i := range reads {
		sinkByte = m[int64(i)]
	}
	got := make(chan probe.Stats, 1)
	go func() { got <- p.Stats() }()
	select {
	case st := <-got:
		if n := hits(st) - before; n < reads {
			t.Errorf("Stats with the lock held: %d nil-map-read hits since the last call, want at least %d", n, reads)
		}
		if len(st.Sites) == 0 || st.Budget == nil {
			t.Errorf("Stats with the lock held: %d sites, budget %v", len(st.Sites), st.Budget)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Stats waited for the probe's lock")
	}
	p.mu.Unlock()
	locked = false
	if n := hits(p.Stats()) - before; n < reads {
		t.Errorf("Stats: %d nil-map-read hits, want at least %d", n, reads)
	}
}

// The first Stats call that finds the lock held, long after Start (no call
// before it asked the reader to keep the view fresh), waits for the lock
// rather than report the view of Start's end; it waits statsWait at most,
// then reports the view as it is.
func TestStatsStaleView(t *testing.T) {
	p, _ := startProbe(t, Config{})
	time.Sleep(4 * pollInterval)
	hold := func(d time.Duration) (released *atomic.Bool) {
		released = new(atomic.Bool)
		locked := make(chan struct{})
		go func() {
			p.mu.Lock()
			close(locked)
			time.Sleep(d)
			released.Store(true)
			p.mu.Unlock()
		}()
		<-locked
		return released
	}
	defer func(w time.Duration) { statsWait = w }(statsWait)
	statsWait = 10 * time.Second // the test's holder decides
	hold(20 * time.Millisecond)
	if b := p.Stats().Budget; b == nil || b.Elapsed < 3*pollInterval {
		t.Fatalf("Stats %v after Start, the lock held: Budget %+v, want the account of now", 4*pollInterval, b)
	}
	// Held longer than statsWait, with a stale view: the view as it is,
	// without waiting for the lock.
	statsWait = time.Millisecond
	released := hold(2 * time.Second)
	p.view.Store(&statsView{at: time.Now().Add(-time.Hour), st: p.view.Load().st}) // no tick can publish now
	st := p.Stats()
	if released.Load() {
		t.Errorf("Stats waited for a lock held for 2 s (statsWait %v)", statsWait)
	}
	if st.Budget == nil {
		t.Error("Stats with the lock held: no budget")
	}
}

var laneSink int

// The link system calls the governor makes while it samples a hot site
// take turns in the lane: no more are in the kernel at once than it
// allows (a thread blocked there holds its P until sysmon retakes it).
func TestLinkLaneReal(t *testing.T) {
	p, _ := startProbe(t, Config{Budget: 0.001})
	var nilMap map[uint64]int
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		for k := range 1000 {
			laneSink += nilMap[uint64(k)]
		}
	}
	p.lane.mu.Lock()
	peak, turns := p.lane.peak, p.lane.turns
	p.lane.mu.Unlock()
	if turns < 2 {
		t.Fatalf("%d link calls in 2 s of a hot site at a budget of 0.1%%: the governor did not sample it", turns)
	}
	if peak > laneSize() {
		t.Errorf("%d link calls in the kernel at once, lane of %d", peak, laneSize())
	}
	t.Logf("%d link calls, at most %d at once (GOMAXPROCS %d)", turns, peak, runtime.GOMAXPROCS(0))
}
