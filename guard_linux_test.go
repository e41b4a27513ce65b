//go:build linux && amd64

package mapguard_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mapguard/mapguard"
	"github.com/mapguard/mapguard/internal/rt"
	"github.com/mapguard/mapguard/internal/testutil"
)

// startReal starts a Guard with real uprobes on this test binary; it is
// closed when the test or benchmark ends.
func startReal(t testing.TB, opts mapguard.Options) *mapguard.Guard {
	t.Helper()
	testutil.RequirePrivileged(t)
	g, err := mapguard.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Start(context.Background()); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		if err := g.Close(); err != nil {
			t.Error(err)
		}
	})
	return g
}

// misuse is one provoked map misuse: run it on a fresh goroutine, and it
// returns the line of the offending operation.
type misuse struct {
	name    string
	kind    mapguard.Kind
	mapType string
	run     func() (line int)
}

type point struct{ x, y int }

var sink any

func here() int {
	_, _, line, _ := runtime.Caller(1)
	return line
}

var misuses = []misuse{
	{"write string", mapguard.NilMapWrite, "map[string]int", func() (line int) {
		defer func() { recover() }()
		var m map[string]int
		line = here() + 1
		m["k"] = 1
		return
	}},
	{"write int64", mapguard.NilMapWrite, "map[int64]bool", func() (line int) {
		defer func() { recover() }()
		var m map[int64]bool
		line = here() + 1
		m[7] = true
		return
	}},
	{"write int32", mapguard.NilMapWrite, "map[int32]string", func() (line int) {
		defer func() { recover() }()
		var m map[int32]string
		line = here() + 1
		m[7] = "x"
		return
	}},
	{"write pointer", mapguard.NilMapWrite, "map[*int]int", func() (line int) {
		defer func() { recover() }()
		var m map[*int]int
		line = here() + 1
		m[new(int)] = 1
		return
	}},
	{"write struct", mapguard.NilMapWrite, "map[mapguard_test.point]int", func() (line int) {
		defer func() { recover() }()
		var m map[point]int
		line = here() + 1
		m[point{1, 2}] = 1
		return
	}},
	{"write big value", mapguard.NilMapWrite, "map[string][200]uint8", func() (line int) {
		defer func() { recover() }()
		var m map[string][200]byte
		line = here() + 1
		m["k"] = [200]byte{}
		return
	}},
	{"nested read", mapguard.NestedMapMiss, "map[int64]bool", func() (line int) {
		outer := map[string]map[int64]bool{"alice": {1: true}}
		line = here() + 1
		sink = outer["bob"][1]
		return
	}},
	{"read string", mapguard.NilMapRead, "map[string]int", func() (line int) {
		var m map[string]int
		line = here() + 1
		sink = m["k"]
		return
	}},
	{"read struct", mapguard.NilMapRead, "map[mapguard_test.point]string", func() (line int) {
		var m map[point]string
		line = here() + 1
		sink = m[point{}]
		return
	}},
}

// provoke runs fn on a fresh goroutine and returns its goroutine id and
// the line it reported.
func provoke(fn func() int) (goid uint64, line int) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		goid = rt.GoID()
		line = fn()
	}()
	<-done
	return goid, line
}

// await returns the first event from ch that matches, or fails after 5 s.
func await(t *testing.T, ch <-chan mapguard.Event, match func(mapguard.Event) bool) mapguard.Event {
	t.Helper()
	timeout := time.After(5 * time.Second)
	for {
		select {
		case ev, ok := <-ch:
			if !ok {
				t.Fatal("Events channel closed")
			}
			if match(ev) {
				return ev
			}
		case <-timeout:
			t.Fatal("no matching event within 5s")
		}
	}
}

func TestRealMisuseEvents(t *testing.T) {
	// Nil-map reads are statistics unless listed.
	g := startReal(t, mapguard.Options{StackDepth: 3, Detect: []mapguard.Kind{mapguard.NilMapRead}})
	events := g.Events()
	for _, m := range misuses {
		t.Run(m.name, func(t *testing.T) {
			before := time.Now()
			goid, line := provoke(m.run)
			// m[a][b] with a missing is also a missing-key read of m[a].
			ev := await(t, events, func(ev mapguard.Event) bool { return ev.Goroutine == goid && ev.Kind != mapguard.MissingKeyRead })
			if ev.Kind != m.kind {
				t.Errorf("kind %v, want %v", ev.Kind, m.kind)
			}
			if !strings.HasSuffix(ev.Site.File, "/guard_linux_test.go") || ev.Site.Line != line {
				t.Errorf("site %v, want guard_linux_test.go:%d", ev.Site, line)
			}
			if ev.MapType != m.mapType {
				t.Errorf("map type %q, want %q", ev.MapType, m.mapType)
			}
			if ev.Map != 0 || ev.Len != 0 || ev.Count != 1 {
				t.Errorf("map %#x len %d count %d, want a nil map once", ev.Map, ev.Len, ev.Count)
			}
			if ev.Time.Before(before.Add(-time.Second)) || ev.Time.After(time.Now().Add(time.Second)) {
				t.Errorf("time %v not around %v", ev.Time, before)
			}
			if len(ev.Stack) == 0 || ev.Stack[0] != ev.Site {
				t.Errorf("stack %v does not start at the site", ev.Stack)
			}
			if !strings.HasPrefix(ev.Probe, "runtime.map") {
				t.Errorf("probe %q", ev.Probe)
			}
			t.Log(ev)
		})
	}
}

func TestRealRecoveredByNetHTTP(t *testing.T) {
	g := startReal(t, mapguard.Options{})
	events := g.Events()

	var handlerLine atomic.Int64
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			var hits map[string]int
			handlerLine.Store(int64(here() + 1))
			hits[r.URL.Path]++ // panics; net/http recovers it
		}),
		ErrorLog: log.New(io.Discard, "", 0), // silence "http: panic serving"
	}
	go srv.Serve(ln)
	defer srv.Close()

	resp, err := http.Get("http://" + ln.Addr().String() + "/x")
	if err == nil {
		resp.Body.Close()
	}
	ev := await(t, events, func(ev mapguard.Event) bool { return ev.Kind == mapguard.NilMapWrite })
	if want := int(handlerLine.Load()); ev.Site.Line != want || ev.MapType != "map[string]int" {
		t.Fatalf("event %v, want line %d", ev, want)
	}
}

// A probed site hit N times, from fresh goroutines that grow their stacks,
// counts exactly N hits and N events.
func TestRealExactCount(t *testing.T) {
	g := startReal(t, mapguard.Options{Budget: 1, BufferSize: 4096})
	site := func() mapguard.SiteStats {
		for _, s := range g.Stats().Sites {
			if s.Function == "runtime.mapassign_fast64" {
				return s
			}
		}
		t.Fatal("runtime.mapassign_fast64 not probed")
		return mapguard.SiteStats{}
	}
	before := site()
	const n = 1000
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(depth int) {
			defer wg.Done()
			growAndWrite(depth)
		}(i % 64)
	}
	wg.Wait()
	after := site()
	if hits := after.Hits - before.Hits; hits != n {
		t.Errorf("hits %d, want %d", hits, n)
	}
	if evs := after.Events - before.Events; evs != n {
		t.Errorf("events %d, want %d", evs, n)
	}
}

// growAndWrite recurses with a large frame to force stack growth, then
// writes to a nil map.
//
//go:noinline
func growAndWrite(depth int) int {
	var pad [512]byte
	if depth > 0 {
		return growAndWrite(depth-1) + int(pad[depth%512])
	}
	defer func() { recover() }()
	var m map[int64]int
	m[int64(pad[0])] = 1
	return 0
}

// The Guard's dispatcher runs callbacks; their map misuse is not reported.
func TestRealSelfExclusion(t *testing.T) {
	g := startReal(t, mapguard.Options{})
	events := g.Events()
	var nilMap map[string]int
	seen := make(chan uint64, 16)
	g.OnEvent(func(ev mapguard.Event) {
		sink = nilMap["from-callback"] // a nil-map read on the dispatcher
		seen <- rt.GoID()
	})
	goid, _ := provoke(misuses[0].run)
	await(t, events, func(ev mapguard.Event) bool { return ev.Goroutine == goid })
	dispatcher := <-seen
	deadline := time.After(500 * time.Millisecond)
	for {
		select {
		case ev := <-events:
			if ev.Goroutine == dispatcher {
				t.Fatalf("event from the Guard's own goroutine: %v", ev)
			}
		case <-deadline:
			var ignored uint64
			for _, s := range g.Stats().Sites {
				ignored += s.Ignored
			}
			if ignored == 0 {
				t.Fatal("the callback's nil-map read was not seen as ignored")
			}
			return
		}
	}
}

// missStorm reads a missing key of m twice every millisecond, from after
// delay until stop is closed, adding the reads to n if not nil; the
// channel it returns is closed when it has stopped. Two every
// millisecond: even a window of a few ms (an emulated VM's, where a trap
// costs far more) sees the storm.
func missStorm(m map[string]int, delay time.Duration, n *atomic.Int64, stop <-chan struct{}) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		time.Sleep(delay)
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			for i := 0; i < 2; i++ {
				sink = m["gone"]
			}
			if n != nil {
				n.Add(2)
			}
		}
	}()
	return done
}

// A storm of misses at one call site (2,000 a second, paced, as a busy
// service's header lookups are) costs more than the default budget: the
// site is then sampled in short windows, and its counts keep arriving,
// scaled and marked Sampled, while the storm goes on.
func TestRealSampling(t *testing.T) {
	g := startReal(t, mapguard.Options{Detect: []mapguard.Kind{mapguard.MissingKeyRead}})
	events := g.Events()
	m := map[string]int{"here": 1}
	var misses atomic.Int64
	stop := make(chan struct{})
	done := missStorm(m, 0, &misses, stop)
	defer func() { close(stop); <-done }()
	var site mapguard.SiteStats
	waitFor(t, func() bool {
		for _, s := range g.Stats().Sites {
			if s.Sampled {
				site = s
				return true
			}
		}
		return false
	}, "the storm's site to be sampled")
	sampledAt := time.Now()
	t.Logf("sampled: %s+%#x cost %v rate %.0f/s window %v period %v", site.Function, site.Offset, site.Cost, site.Rate, site.Window, site.Period)
	if site.Window <= 0 || site.Period < site.Window || site.Cost <= 0 {
		t.Fatalf("sampled site %+v", site)
	}
	// Aggregates keep coming while the storm goes on, as estimates. What
	// was reported before the site was sampled (its first occurrence, an
	// aggregate flushed in the tick that sampled it) may still be on its
	// way (the ring is read every 100 ms): the loop skips it by its time.
	for len(events) > 0 {
		<-events
	}
	var estimated uint64
	var last time.Time
	var maxGap time.Duration
	// The site's period as the governor sets it over the run (it moves
	// with the measured rate and costs); the longest one seen bounds the
	// silences.
	period := time.Second
	nextStats := time.Now()
	begin := time.Now()
	m0 := misses.Load()
	for time.Since(begin) < 5*time.Second {
		if time.Now().After(nextStats) {
			for _, s := range g.Stats().Sites {
				if s.Function == site.Function && s.Offset == site.Offset && s.Sampled {
					period = max(period, s.Period)
				}
			}
			nextStats = time.Now().Add(250 * time.Millisecond)
		}
		select {
		case ev := <-events:
			if ev.Kind != mapguard.MissingKeyRead || !strings.HasSuffix(ev.Site.File, "guard_linux_test.go") || ev.Time.Before(sampledAt) {
				continue
			}
			if !ev.Sampled {
				t.Errorf("an event of a sampled site is not marked Sampled: %v", ev)
			}
			now := time.Now()
			if !last.IsZero() && now.Sub(last) > maxGap {
				maxGap = now.Sub(last)
			}
			last = now
			estimated += ev.Count
		case <-time.After(100 * time.Millisecond):
		}
	}
	actual := misses.Load() - m0
	t.Logf("estimated %d misses, %d happened; longest silence %v; budget %+v", estimated, actual, maxGap, g.Stats().Budget)
	for _, s := range g.Stats().Sites {
		if s.Hits > 0 {
			t.Logf("site %s+%#x kind %v hits %d agg %d sampled %v window %v period %v watched %v rate %.0f", s.Function, s.Offset, s.Kind, s.Hits, s.Aggregated, s.Sampled, s.Window, s.Period, s.Watched, s.Rate)
		}
	}
	if estimated == 0 || last.IsZero() {
		t.Fatal("no counts while sampled")
	}
	// A window each second, unless the budget cannot pay one that often
	// (a slow machine, or an emulated one, where traps and links cost far
	// more): the site's period then says how far apart its windows are.
	allowed := 2500 * time.Millisecond
	if period > time.Second {
		allowed = 2*period + 1500*time.Millisecond
	}
	if maxGap > allowed || time.Since(last) > allowed {
		t.Errorf("a steady storm went unreported for %v (period %v)", max(maxGap, time.Since(last)), period)
	}
	r := float64(estimated) / float64(actual)
	switch {
	case period > time.Second:
		t.Logf("windows spaced out to %v: the estimate (%.2fx) covers few windows, not checked", period, r)
	case r < 0.3 || r > 3:
		t.Errorf("estimated %d misses of %d (%.2fx)", estimated, actual, r)
	}
}

// A quiet site on Start's shared link stays counted exactly when a storm
// at a busy site on the same link samples that one: the quiet site moves
// to a new link before the shared one is detached (make before break).
// Attached again only after the detach, it missed the occurrences of the
// 20-40 ms the detach took and of the wait for the next governor run.
func TestRealQuietSiteStaysExact(t *testing.T) {
	// The default options: the reads' sites serve statistics, on one link.
	g := startReal(t, mapguard.Options{})
	if b := g.Stats().Budget; b != nil && b.StepCost > 50*time.Microsecond {
		t.Skipf("a trap costs %v here: 10 reads a second are no quiet site", b.StepCost)
	}
	// 10 a second: quiet below 100 us a trap (at 20 a second, a minute
	// when a trap cost 34 us made the site busy). The old detach and
	// re-attach showed in Estimated even when no read fell in the gap.
	const quiet = 30 // nil-map reads, one each 100 ms
	var nm map[int64]int
	line := make(chan int, 1)
	quietDone := make(chan struct{})
	go func() {
		defer close(quietDone)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		line <- here() + 3
		for i := 0; i < quiet; i++ {
			<-tick.C
			sink = nm[int64(i)]
		}
	}()
	quietLine := <-line
	// The storm: missing-key reads, two a millisecond, from 400 ms on (the
	// quiet site must have been watched long enough to tell it is quiet).
	stop := make(chan struct{})
	stormDone := missStorm(map[string]int{"here": 1}, 400*time.Millisecond, nil, stop)
	<-quietDone
	close(stop)
	<-stormDone
	st := g.Stats()
	var stormSampled bool
	for _, s := range st.Sites {
		if s.Hits > 0 {
			t.Logf("site %s+%#x %v hits %d sampled %v watched %v rate %.0f", s.Function, s.Offset, s.Kind, s.Hits, s.Sampled, s.Watched, s.Rate)
		}
		// mapaccess1_* before Go 1.27, mapaccess2_* from it.
		if s.Kind == mapguard.MissingKeyRead && strings.HasSuffix(s.Function, "_faststr") && s.Sampled {
			stormSampled = true
		}
		if s.Kind == mapguard.NilMapRead && strings.HasSuffix(s.Function, "_fast64") && s.Cost > 50*time.Microsecond {
			// Under TCG a hit there cost 154 us with the program (the
			// calibrated trap 16 us): no quiet site at 10 a second.
			t.Skipf("a hit at the quiet site costs %v here: 10 reads a second are no quiet site", s.Cost)
		}
		if s.Kind == mapguard.NilMapRead && strings.HasSuffix(s.Function, "_fast64") && s.Sampled {
			t.Errorf("the quiet site was sampled: %+v", s)
		}
	}
	if err := g.Close(); err != nil { // counts the occurrences not yet reported
		t.Fatal(err)
	}
	if !stormSampled {
		t.Fatalf("the storm's site was not sampled (no demotion to test); budget %+v", st.Budget)
	}
	if b := st.Budget; b.Traps <= 0 || b.Traps >= b.Spent {
		t.Errorf("Traps %v of Spent %v: want the storm's traps, and the Guard's own work besides", b.Traps, b.Spent)
	}
	var found bool
	for _, c := range g.Stats().CallSites {
		if c.Kind != mapguard.NilMapRead || c.Site.Line != quietLine || !strings.HasSuffix(c.Site.File, "/guard_linux_test.go") {
			continue
		}
		found = true
		if c.Count != quiet || c.Estimated {
			t.Errorf("quiet call site: %d nil-map reads (estimated %v), want %d exactly", c.Count, c.Estimated, quiet)
		}
	}
	if !found {
		t.Errorf("quiet call site (line %d) not in Stats().CallSites", quietLine)
	}
}

// Start and Close leave no goroutines and no file descriptors behind.
func TestRealStartCloseLeavesNothing(t *testing.T) {
	testutil.RequirePrivileged(t)
	// Warm up lazily created runtime and library state.
	g, _ := mapguard.New(mapguard.Options{})
	if err := g.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	g.Close()
	goroutines, fds := runtime.NumGoroutine(), testutil.OpenFDs(t)
	for i := 0; i < 3; i++ {
		g, _ := mapguard.New(mapguard.Options{})
		if err := g.Start(context.Background()); err != nil {
			t.Fatal(err)
		}
		if err := g.Close(); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, func() bool { return runtime.NumGoroutine() <= goroutines }, "goroutines back to %d", goroutines)
	if n := testutil.OpenFDs(t); n > fds {
		t.Fatalf("%d open fds after 3 cycles, %d before", n, fds)
	}
}

func TestRealContextCancel(t *testing.T) {
	testutil.RequirePrivileged(t)
	g, _ := mapguard.New(mapguard.Options{})
	ctx, cancel := context.WithCancel(context.Background())
	if err := g.Start(ctx); err != nil {
		t.Fatal(err)
	}
	events := g.Events()
	cancel()
	waitFor(t, func() bool {
		select {
		case _, ok := <-events:
			return !ok
		default:
			return false
		}
	}, "Events closed after cancel")
	if err := g.Start(context.Background()); !errors.Is(err, mapguard.ErrClosed) {
		t.Fatalf("Start after cancel: %v", err)
	}
}

func waitFor(t *testing.T, cond func() bool, format string, args ...any) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for "+format, args...)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// With a tiny ring buffer and a consumer that does not keep up, every event
// is either delivered or counted as dropped at exactly one stage, and the
// goroutines that hit the probes never wait.
func TestRealOverflow(t *testing.T) {
	g := startReal(t, mapguard.Options{BufferSize: 1, Budget: 1})
	events := g.Events()
	block := make(chan struct{})
	g.OnEvent(func(mapguard.Event) { <-block }) // a stalled consumer

	const n = 500
	begin := time.Now()
	for i := 0; i < n; i++ {
		growAndWrite(0)
	}
	took := time.Since(begin)
	time.Sleep(300 * time.Millisecond) // let the reader drain the ring
	close(block)
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	delivered := uint64(len(events))
	st := g.Stats()
	left := st.Events[mapguard.NilMapWrite]
	if left+st.DroppedKernel != n {
		t.Errorf("%d events left the kernel + %d dropped there = %d, want %d", left, st.DroppedKernel, left+st.DroppedKernel, n)
	}
	if delivered+st.DroppedQueue+st.DroppedChannel != left {
		t.Errorf("%d delivered + %d dropped in the queue + %d on the channel != %d", delivered, st.DroppedQueue, st.DroppedChannel, left)
	}
	if st.DroppedKernel == 0 {
		t.Errorf("a %d-event burst into a one-page ring dropped nothing", n)
	}
	t.Logf("%d misuses in %v: %d dropped in the kernel, %d in the queue, %d on the channel, %d delivered",
		n, took, st.DroppedKernel, st.DroppedQueue, st.DroppedChannel, delivered)
}

// A map that crosses the growth threshold is reported with the insert that
// grew it, and again at each doubling, not at every growth.
func TestRealMapGrowth(t *testing.T) {
	g := startReal(t, mapguard.Options{DetectOnly: true, Detect: []mapguard.Kind{mapguard.MapGrowth}, GrowthThreshold: 5000})
	events := g.Events()
	var line int
	goid, _ := provoke(func() int {
		cache := make(map[string][]byte)
		for i := 0; i < 40000; i++ {
			line = here() + 1
			cache[strconv.Itoa(i)] = nil
		}
		sink = cache
		return 0
	})
	var got []mapguard.Event
	deadline := time.After(2 * time.Second)
collect:
	for {
		select {
		case ev := <-events:
			if ev.Goroutine == goid {
				got = append(got, ev)
			}
		case <-deadline:
			break collect
		}
	}
	if len(got) < 2 || len(got) > 4 {
		t.Fatalf("%d growth events for 40000 entries from a 5000 threshold, want 2 to 4 (one per doubling): %v", len(got), got)
	}
	prev := 0
	for _, ev := range got {
		if ev.Kind != mapguard.MapGrowth || ev.MapType != "map[string][]uint8" || ev.Site.Line != line || ev.Map == 0 {
			t.Errorf("event %v, want map-growth of map[string][]uint8 at line %d", ev, line)
		}
		if ev.Len < 5000 || ev.Len < 2*prev {
			t.Errorf("len %d after %d: not a doubling past the threshold", ev.Len, prev)
		}
		prev = ev.Len
	}
	t.Log(got[0])
	for _, s := range g.Stats().Sites {
		if s.Kind == mapguard.NilMapWrite && s.Events > 1 {
			t.Errorf("unwatched canary site delivered %d events", s.Events)
		}
	}
}

// The standard library reads nil maps as empty on purpose; those reads are
// counted as NotOwned, and the program's own are reported.
func TestRealStdlibNilReadNotReported(t *testing.T) {
	g := startReal(t, mapguard.Options{Detect: []mapguard.Kind{mapguard.NilMapRead}})
	events := g.Events()
	notOwned := func() (n uint64) {
		for _, s := range g.Stats().Sites {
			n += s.NotOwned
		}
		return n
	}
	before := notOwned()
	var line int
	goid, _ := provoke(func() int {
		var q url.Values // nil: Get reads it as empty
		sink = q.Get("page")
		line = here() + 1
		sink = misuseNilRead()
		return 0
	})
	ev := await(t, events, func(ev mapguard.Event) bool { return ev.Goroutine == goid })
	if !strings.HasSuffix(ev.Site.Function, ".misuseNilRead") {
		t.Fatalf("first event %v, want the program's own read (line %d's callee)", ev, line)
	}
	waitFor(t, func() bool { return notOwned() > before }, "the standard library's nil-map read counted as NotOwned")
}

//go:noinline
func misuseNilRead() int {
	var m map[string]int
	return m["k"]
}

// The goroutines a started Guard runs are the ones GoroutineFunctions
// names, so that leak checkers can be told to ignore them.
func TestRealGoroutineFunctions(t *testing.T) {
	testutil.RequirePrivileged(t)
	g, _ := mapguard.New(mapguard.Options{Detect: []mapguard.Kind{mapguard.SharedWriters}}) // every goroutine: deep too
	if err := g.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	names := mapguard.GoroutineFunctions()
	found := map[string]bool{}
	// A goroutine just created may not have entered its function yet (its
	// stack shows the go statement's wrapper): look again a little later,
	// as goleak does.
	var unnamed []string
	for try := 0; try < 5; try++ {
		buf := make([]byte, 1<<20)
		stacks := strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n")
		unnamed = unnamed[:0]
		for _, s := range stacks {
			if !strings.Contains(s, "github.com/mapguard/mapguard") || strings.Contains(s, "testing.tRunner") {
				continue // not the Guard's
			}
			ok := false
			for _, n := range names {
				if strings.Contains(s, n+"(") {
					found[n], ok = true, true
				}
			}
			if !ok {
				unnamed = append(unnamed, s)
			}
		}
		if len(unnamed) == 0 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	for _, s := range unnamed {
		t.Errorf("a goroutine of the Guard is not named by GoroutineFunctions:\n%s", s)
	}
	for _, n := range names {
		// The feeder runs only while events wait for the Events channel's
		// reader (TestEventsBacklog); the calibration's goroutines for
		// about a second after Start; the attaches and detaches while the governor
		// attaches and detaches; the
		// search for nested reads for a few seconds after Start.
		transient := false
		for _, f := range []string{".feed", ".(*calibrating).run", ".(*linkLane).holdEnded", ".closeTimed", ".finishCalibration", ".(*uprobes).detach", ".(*uprobes).detachChain", ".(*uprobes).attachAsync", ".scanNested"} {
			transient = transient || strings.HasSuffix(n, f)
		}
		if !found[n] && !transient {
			t.Errorf("GoroutineFunctions names %s, which no goroutine runs", n)
		}
	}
}

// A low RLIMIT_NOFILE is refused as ErrResourceLimit, naming the limit,
// and nothing is left open; with the limit raised again Start works.
func TestRealResourceLimit(t *testing.T) {
	testutil.RequirePrivileged(t)
	var old unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	fds := testutil.OpenFDs(t)
	low := old
	low.Cur = uint64(fds + 12)
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &low); err != nil {
		t.Fatal(err)
	}
	g, _ := mapguard.New(mapguard.Options{})
	err := g.Start(context.Background())
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	if !errors.Is(err, mapguard.ErrResourceLimit) || !strings.Contains(err.Error(), "RLIMIT_NOFILE") {
		t.Fatalf("Start with RLIMIT_NOFILE %d: %v, want ErrResourceLimit naming the limit", low.Cur, err)
	}
	if n := testutil.OpenFDs(t); n > fds {
		t.Fatalf("%d open fds after a refused Start, %d before", n, fds)
	}
	if err := g.Start(context.Background()); err != nil {
		t.Fatalf("Start after raising the limit: %v", err)
	}
	g.Close()
}

// A context cancelled while Start attaches stops it promptly with the
// context's error, and the Guard can be started again.
func TestRealStartCancelled(t *testing.T) {
	testutil.RequirePrivileged(t)
	g, _ := mapguard.New(mapguard.Options{})
	defer g.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Millisecond)
	defer cancel()
	begin := time.Now()
	err := g.Start(ctx)
	if err == nil {
		t.Skip("Start finished within its 5 ms deadline: nothing was cancelled")
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Start with a short deadline: %v", err)
	}
	t.Logf("cancelled Start returned after %v", time.Since(begin))
	if err := g.Start(context.Background()); err != nil {
		t.Fatalf("second Start: %v", err)
	}
}

// Delivering events makes the Guard's own goroutines hit no probe: no
// missing-key or nil-map reads on its paths (each would cost a trap).
func TestRealNoSelfHits(t *testing.T) {
	g := startReal(t, mapguard.Options{})
	events := g.Events()
	ignored := func() (n uint64) {
		for _, s := range g.Stats().Sites {
			n += s.Ignored
		}
		return n
	}
	// Warm up: the first event of a site fills the decoder's caches.
	goid, _ := provoke(misuses[0].run)
	await(t, events, func(ev mapguard.Event) bool { return ev.Goroutine == goid })
	time.Sleep(1100 * time.Millisecond) // one aggregate flush, too
	before := ignored()
	// The filters of the growth and bloat sites run before the goroutine
	// is known: the Guard's hits there are filtered, not ignored. Nothing
	// in this test grows or clears a map.
	grownOrCleared := func() (n uint64) {
		for _, s := range g.Stats().Sites {
			if s.Kind == mapguard.MapGrowth || s.Kind == mapguard.MapBloat {
				n += s.Hits
			}
		}
		return n
	}
	quiet := grownOrCleared()
	const n = 50
	for i := 0; i < n; i++ {
		goid, _ := provoke(misuses[0].run)
		await(t, events, func(ev mapguard.Event) bool { return ev.Goroutine == goid })
	}
	time.Sleep(1100 * time.Millisecond)
	if d := ignored() - before; d != 0 {
		t.Fatalf("delivering %d events made the Guard's goroutines hit its probes %d times", n, d)
	}
	if d := grownOrCleared() - quiet; d != 0 {
		t.Errorf("the growth and bloat sites took %d hits while the Guard delivered and flushed counts", d)
	}
	// Nor do Stats and Close on the caller's goroutine, which the probes
	// do not ignore (teardown once read a map[link.Link]bool there).
	g.Stats()
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	for _, c := range g.Stats().CallSites {
		if strings.HasPrefix(c.Site.Function, "github.com/mapguard/mapguard") {
			t.Errorf("the Guard's own code is a call site: %s %s:%d (%d)", c.Kind, c.Site.File, c.Site.Line, c.Count)
		}
	}
}

// With default options, a map grown to 1<<21 entries is reported: the
// growth sites take about 2,000 hits meanwhile, which the budget pays for.
func TestRealMapGrowthDefault(t *testing.T) {
	if testing.Short() {
		t.Skip("grows a map to 2M entries")
	}
	g := startReal(t, mapguard.Options{})
	events := g.Events()
	var line int
	goid, _ := provoke(func() int {
		m := make(map[int]int)
		for i := 0; i < 1<<21; i++ {
			line = here() + 1
			m[i] = i
		}
		sink = len(m)
		return 0
	})
	ev := await(t, events, func(ev mapguard.Event) bool { return ev.Goroutine == goid && ev.Kind == mapguard.MapGrowth })
	if ev.Site.Line != line || ev.MapType != "map[int]int" || ev.Len < 1<<20 {
		t.Fatalf("event %v, want map-growth of map[int]int past 1<<20 at line %d", ev, line)
	}
	for _, s := range g.Stats().Sites {
		if s.Kind == mapguard.MapGrowth && s.Hits > 0 {
			t.Logf("%s+%#x: %d hits, cost %v, sampled %v", s.Function, s.Offset, s.Hits, s.Cost, s.Sampled)
		}
	}
}

// Idioms are statistics, not events, by default: a read of a missing key,
// of a nil map, a comma-ok read of a nil map. They are counted per call
// site with the map type; the nested miss m[a][b] is an event.
func TestRealIdiomsAreStatistics(t *testing.T) {
	g := startReal(t, mapguard.Options{Budget: 1})
	events := g.Events()
	lines := map[string]int{}
	goid, _ := provoke(func() int {
		var nilCounts map[string]int
		present := map[string]int{"a": 1}
		for i := 0; i < 3; i++ {
			lines["plain nil"] = here() + 1
			sink = nilCounts["x"]
			lines["comma-ok nil"] = here() + 1
			_, ok := nilCounts["y"]
			sink = ok
			lines["missing"] = here() + 1
			sink = present["gone"]
		}
		return 0
	})
	nested, _ := provoke(misuses[6].run)
	ev := await(t, events, func(ev mapguard.Event) bool { return ev.Goroutine == nested })
	if ev.Kind != mapguard.NestedMapMiss {
		t.Fatalf("the nested read gave %v first, want nested-map-miss", ev)
	}
	time.Sleep(1500 * time.Millisecond) // an aggregation interval
	for len(events) > 0 {
		if ev := <-events; ev.Goroutine == goid || strings.HasSuffix(ev.Site.File, "guard_linux_test.go") && ev.Kind != mapguard.NestedMapMiss {
			t.Errorf("an idiom delivered an event: %v", ev)
		}
	}
	st := g.Stats()
	find := func(kind mapguard.Kind, line int) *mapguard.CallSiteStats {
		for i, c := range st.CallSites {
			if c.Kind == kind && c.Site.Line == line {
				return &st.CallSites[i]
			}
		}
		return nil
	}
	for _, c := range []struct {
		name    string
		kind    mapguard.Kind
		commaOK bool
		mapType string
	}{
		{"plain nil", mapguard.NilMapRead, false, "map[string]int"},
		{"comma-ok nil", mapguard.NilMapRead, true, "map[string]int"},
		{"missing", mapguard.MissingKeyRead, false, "map[string]int"},
	} {
		cs := find(c.kind, lines[c.name])
		if cs == nil {
			t.Errorf("%s: no call-site statistics at line %d: %+v", c.name, lines[c.name], st.CallSites)
			continue
		}
		if cs.Count != 3 || cs.CommaOK != c.commaOK || cs.MapType != c.mapType || cs.First.IsZero() || cs.Estimated {
			t.Errorf("%s: %+v, want 3 %s, comma-ok %v", c.name, *cs, c.mapType, c.commaOK)
		}
	}
}

// A nested read is told from its caller's code, without the outer miss:
// m[a][b] where m[a] holds a nil map (no miss to pair with), and where it
// is missing (the kernel pairs the two reads), at one call site, give one
// nested-map-miss event and then counts, every occurrence counted once,
// and no nil-map-read statistics there (the outer read's misses are
// missing-key-read statistics).
func TestRealNestedFromCode(t *testing.T) {
	g := startReal(t, mapguard.Options{Budget: 1})
	events := g.Events()
	awaitNestedSite(t, g, "TestRealNestedFromCode.func1")
	const n = 10
	goid, line := provoke(func() (line int) {
		m := map[string]map[string]int{"nil": nil, "full": {"b": 1}}
		for i := 0; i < n; i++ {
			key := "nil"
			if i%2 == 1 {
				key = "absent"
			}
			line = here() + 1
			sink = m[key]["b"]
		}
		return line
	})
	ev := await(t, events, func(ev mapguard.Event) bool { return ev.Goroutine == goid })
	if ev.Kind != mapguard.NestedMapMiss || ev.Site.Line != line || ev.Peer == nil || ev.Peer.Site.Line != line {
		t.Fatalf("first event %v (peer %+v), want nested-map-miss at line %d, the outer read there too", ev, ev.Peer, line)
	}
	total := uint64(ev.Count)
	deadline := time.After(2500 * time.Millisecond) // past an aggregation interval
	for total < n {
		select {
		case ev := <-events:
			if ev.Site.Line != line || !strings.HasSuffix(ev.Site.File, "guard_linux_test.go") {
				continue
			}
			if ev.Kind != mapguard.NestedMapMiss || ev.Count < 1 {
				t.Errorf("event %v (count %d), want nested-map-miss counts", ev, ev.Count)
			}
			total += uint64(ev.Count)
		case <-deadline:
			t.Fatalf("%d of %d nested misses counted", total, n)
		}
	}
	if total != n {
		t.Errorf("%d nested misses counted, want %d", total, n)
	}
	st := g.Stats()
	// The inner read has a site of its own, at its CALL (emulated), which
	// took every execution of the expression.
	var own *mapguard.SiteStats
	for i, s := range st.Sites {
		if s.Kind == mapguard.NestedMapMiss && strings.HasSuffix(s.Function, "TestRealNestedFromCode.func1") {
			own = &st.Sites[i]
		}
	}
	if own == nil || own.Hits != n || !own.Emulated {
		t.Errorf("the nested read's own site: %+v, want an emulated site with %d hits", own, n)
	}
	for _, c := range st.CallSites {
		// The outer read's misses are missing-key reads (statistics).
		if c.Site.Line == line && strings.HasSuffix(c.Site.File, "guard_linux_test.go") && c.Kind != mapguard.MissingKeyRead {
			t.Errorf("call-site statistics for the nested read: %+v", c)
		}
	}
}

// Start attaches the nested reads it found before it returns, when the
// search is done in time (a small program's is): a nested miss right
// after Start, the only one, is reported at the read's own site (seen in
// CI: the quickstart's, lost while the runtime's site was detached).
func TestRealNestedAtStart(t *testing.T) {
	g := startReal(t, mapguard.Options{})
	attached := false
	for _, s := range g.Stats().Sites {
		if s.Kind == mapguard.NestedMapMiss && strings.HasSuffix(s.Function, "TestRealNestedAtStart.func1") && s.Armed {
			attached = true
		}
	}
	if !attached {
		// The search took longer than Start's wait for it (the VM's
		// emulation): it goes on after Start, tested by
		// TestRealNestedAcrossAttach.
		t.Skip("the search for nested reads was not done within Start")
	}
	goid, line := provoke(func() int {
		m := map[string]map[string]int{"full": {"b": 1}}
		line := here() + 1
		sink = m["absent"]["b"]
		return line
	})
	ev := await(t, g.Events(), func(ev mapguard.Event) bool { return ev.Goroutine == goid })
	if ev.Kind != mapguard.NestedMapMiss || ev.Site.Line != line {
		t.Fatalf("event %v, want nested-map-miss at line %d", ev, line)
	}
	for _, s := range g.Stats().Sites {
		if s.Kind == mapguard.NestedMapMiss && strings.HasSuffix(s.Function, "TestRealNestedAtStart.func1") && s.Hits != 1 {
			t.Errorf("the nested read's own site took %d hits, want 1", s.Hits)
		}
	}
}

// The nested read's own site is attached after Start (the search is held
// until the expression runs), while the expression runs: every
// occurrence is still counted once, whether the runtime's sites saw it
// (before the attach) or its own site (after), but for the handover's
// instant.
func TestRealNestedAcrossAttach(t *testing.T) {
	release := mapguard.HoldNestedScan()
	t.Cleanup(release)
	g := startReal(t, mapguard.Options{Budget: 1})
	events := g.Events()
	var line, n int
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		m := map[string]map[string]int{"full": {"b": 1}}
		for {
			select {
			case <-stop:
				return
			default:
			}
			line = here() + 1
			sink = m["absent"]["b"]
			n++
			// About 500 a second: under the budget even in CI's emulated
			// 6.1 VM, where the read's three traps cost 330 us and, at
			// 200 us a sleep, the second booked 817 ms and the governor
			// sampled the sites (786 of 920 counted by the deadline).
			time.Sleep(2 * time.Millisecond)
		}
	}()
	time.Sleep(100 * time.Millisecond)
	release()
	awaitNestedSite(t, g, "TestRealNestedAcrossAttach.func1")
	time.Sleep(300 * time.Millisecond)
	close(stop)
	<-done
	total, sampled := uint64(0), 0
	// why says whether the governor sampled the sites (the counts are then
	// estimates), and what it booked them at: once in the 6.1 VM 647 were
	// counted of 627, once 543 of 659 by the deadline.
	why := func() string { return fmt.Sprintf("%d of the events sampled; %s", sampled, governorState(g)) }
	deadline := time.After(5 * time.Second)
	for total < uint64(n) {
		select {
		case ev := <-events:
			if ev.Kind == mapguard.NestedMapMiss && ev.Site.Line == line && strings.HasSuffix(ev.Site.File, "guard_linux_test.go") {
				total += uint64(max(ev.Count, 1))
				if ev.Sampled {
					sampled++
				}
			}
		case <-deadline:
			t.Fatalf("%d of %d nested misses counted; %s", total, n, why())
		}
	}
	// Counts that come late (a second aggregation) would exceed n.
	time.Sleep(1500 * time.Millisecond)
	for len(events) > 0 {
		if ev := <-events; ev.Kind == mapguard.NestedMapMiss && ev.Site.Line == line {
			total += uint64(max(ev.Count, 1))
			if ev.Sampled {
				sampled++
			}
		}
	}
	// An occurrence during the handover's one pass over the kernel's
	// counts (microseconds here, more under the VMs' emulation) may be
	// counted twice or not at all: seen once, by 1 of 372.
	if total+2 < uint64(n) || total > uint64(n)+2 {
		t.Errorf("%d nested misses counted, want %d (within 2); %s", total, n, why())
	}
	var own uint64
	for _, s := range g.Stats().Sites {
		if s.Kind == mapguard.NestedMapMiss && strings.HasSuffix(s.Function, "TestRealNestedAcrossAttach.func1") {
			own = s.Hits
		}
	}
	if own == 0 || own >= uint64(n) {
		t.Errorf("the nested read's own site took %d of %d: the attach did not fall inside the run", own, n)
	}
	t.Logf("%d nested misses, counted %d; %d at the read's own site", n, total, own)
}

// governorState is what a test that counts occurrences says when the
// count is off: the Budget stats, and every site with hits, sampled or
// not (its counts then estimates), its cost and trap scale, its rate.
func governorState(g *mapguard.Guard) string {
	var b strings.Builder
	st := g.Stats()
	if st.Budget != nil {
		fmt.Fprintf(&b, "budget %+v", *st.Budget)
	}
	for _, s := range st.Sites {
		if s.Hits > 0 {
			fmt.Fprintf(&b, "\n  %s+%#x %s: %d hits, sampled %v, cost %v (trap scale %.2f), %.0f/s", s.Function, s.Offset, s.Kind, s.Hits, s.Sampled, s.Cost, s.TrapScale, s.Rate)
		}
	}
	return b.String()
}

// awaitNestedSite waits for the site of a nested read in the function
// whose name ends with fn: the search for them runs after Start.
func awaitNestedSite(t *testing.T, g *mapguard.Guard, fn string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		for _, s := range g.Stats().Sites {
			if s.Kind == mapguard.NestedMapMiss && strings.HasSuffix(s.Function, fn) {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no nested-read site in %s 10 s after Start", fn)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A function with a probed nested read (its CALL holds the kernel's
// breakpoint) is still decoded as the program's code: a miss followed by a
// nil-map read of another map a few instructions later is not a nested
// miss, and both call sites' statistics keep their map type.
func TestRealProbedFunctionDecodes(t *testing.T) {
	g := startReal(t, mapguard.Options{Budget: 1})
	events := g.Events()
	awaitNestedSite(t, g, "TestRealProbedFunctionDecodes.func1")
	var nestedLine, missLine, nilLine int
	goid, _ := provoke(func() int {
		perms := map[string]map[string]bool{"alice": {"read": true}}
		nestedLine = here() + 1
		sink = perms["bob"]["read"]
		prices := map[string]int{"apple": 3}
		var discounts map[string]int
		n := 0
		for i := 0; i < 5; i++ {
			missLine = here() + 1
			n += prices["pear"]
			nilLine = here() + 1
			n += discounts["pear"]
		}
		sink = n
		return 0
	})
	ev := await(t, events, func(ev mapguard.Event) bool { return ev.Goroutine == goid })
	if ev.Kind != mapguard.NestedMapMiss || ev.Site.Line != nestedLine {
		t.Fatalf("first event %v, want the nested miss at line %d", ev, nestedLine)
	}
	time.Sleep(1500 * time.Millisecond) // an aggregation interval
	for len(events) > 0 {
		if ev := <-events; ev.Kind == mapguard.NestedMapMiss && ev.Site.Line != nestedLine && strings.HasSuffix(ev.Site.File, "guard_linux_test.go") {
			t.Errorf("a nested miss that is not one: %v (peer %+v)", ev, ev.Peer)
		}
	}
	var own bool
	for _, s := range g.Stats().Sites {
		own = own || (s.Kind == mapguard.NestedMapMiss && strings.HasSuffix(s.Function, "TestRealProbedFunctionDecodes.func1"))
	}
	if !own {
		t.Fatal("the nested read has no site of its own: the test does not test what it says")
	}
	for _, want := range []struct {
		kind mapguard.Kind
		line int
	}{{mapguard.MissingKeyRead, missLine}, {mapguard.NilMapRead, nilLine}} {
		var got *mapguard.CallSiteStats
		st := g.Stats()
		for i, c := range st.CallSites {
			if c.Kind == want.kind && c.Site.Line == want.line {
				got = &st.CallSites[i]
			}
		}
		if got == nil || got.Count != 5 || got.MapType != "map[string]int" {
			t.Errorf("%s at line %d: %+v, want 5 of map[string]int", want.kind, want.line, got)
		}
	}
}
