//go:build linux && amd64

package mapguard_test

import (
	"context"
	"errors"
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
	{"nested read", mapguard.NilMapRead, "map[int64]bool", func() (line int) {
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
	{"comma-ok read int32", mapguard.NilMapRead, "map[int32]int", func() (line int) {
		var m map[int32]int
		line = here() + 1
		_, ok := m[3]
		sink = ok
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
	g := startReal(t, mapguard.Options{StackDepth: 3})
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
	g := startReal(t, mapguard.Options{SiteRateLimit: -1, BufferSize: 4096})
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

// A site over its rate limit is detached, then re-armed after the back-off.
func TestRealRateLimit(t *testing.T) {
	g := startReal(t, mapguard.Options{SiteRateLimit: 50})
	// The nil-map site of the plain string read: in mapaccess1_faststr, or
	// on Go 1.27, where that only calls mapaccess2_faststr, in the latter.
	site := func() mapguard.SiteStats {
		for _, fn := range []string{"runtime.mapaccess1_faststr", "runtime.mapaccess2_faststr"} {
			for _, s := range g.Stats().Sites {
				if s.Function == fn && s.Kind == mapguard.NilMapRead {
					return s
				}
			}
		}
		t.Fatal("runtime.mapaccess1_faststr not probed")
		return mapguard.SiteStats{}
	}
	empty := map[string]int{} // empty, not nil: the nil-or-empty branch, filtered in BPF
	deadline := time.Now().Add(5 * time.Second)
	for site().Armed {
		if time.Now().After(deadline) {
			t.Fatalf("site still armed after 5s of hammering: %+v", site())
		}
		for i := 0; i < 100; i++ {
			sink = empty["k"]
		}
	}
	s := site()
	if s.Disarms != 1 || s.RearmAt.IsZero() || s.Filtered == 0 {
		t.Fatalf("after disarm: %+v", s)
	}
	hits := s.Hits
	for i := 0; i < 100; i++ {
		sink = empty["k"]
	}
	if s := site(); s.Hits != hits {
		t.Fatalf("disarmed site took %d hits", s.Hits-hits)
	}
	time.Sleep(time.Until(s.RearmAt) + 500*time.Millisecond)
	if s := site(); !s.Armed {
		t.Fatalf("site not re-armed after its back-off: %+v", s)
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
	g := startReal(t, mapguard.Options{BufferSize: 1, SiteRateLimit: -1})
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
	g := startReal(t, mapguard.Options{Detect: []mapguard.Kind{mapguard.MapGrowth}, GrowthThreshold: 5000})
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
	g := startReal(t, mapguard.Options{})
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
