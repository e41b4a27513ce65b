package mapguard_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mapguard/mapguard"
)

// t0 is where fake clocks and event times start.
var t0 = time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)

// fakeClock is a clock for BreakerConfig.Now that moves only when told.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{now: t0} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// callbacks counts a breaker's callbacks and records their order.
type callbacks struct {
	mu     sync.Mutex
	trips  int
	resets int
	order  string // "T" per OnTrip, "R" per OnReset
	last   mapguard.Event
}

func (c *callbacks) onTrip(ev mapguard.Event) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.trips++
	c.order += "T"
	c.last = ev
}

func (c *callbacks) onReset() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.resets++
	c.order += "R"
}

func (c *callbacks) counts() (trips, resets int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.trips, c.resets
}

// newTestBreaker returns a breaker on a fake clock, with cfg's callbacks
// replaced by counting ones.
func newTestBreaker(t *testing.T, cfg mapguard.BreakerConfig) (*mapguard.Breaker, *fakeClock, *callbacks) {
	t.Helper()
	clk, cb := newFakeClock(), new(callbacks)
	cfg.Now, cfg.OnTrip, cfg.OnReset = clk.Now, cb.onTrip, cb.onReset
	b, err := mapguard.NewBreaker(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return b, clk, cb
}

func TestNewBreakerRejectsBadConfig(t *testing.T) {
	ok := mapguard.BreakerConfig{Trip: 3, Window: time.Second, Cooldown: time.Second}
	for name, mod := range map[string]func(*mapguard.BreakerConfig){
		"zero trip":          func(c *mapguard.BreakerConfig) { c.Trip = 0 },
		"negative trip":      func(c *mapguard.BreakerConfig) { c.Trip = -1 },
		"huge trip":          func(c *mapguard.BreakerConfig) { c.Trip = mapguard.MaxBreakerTrip + 1 },
		"zero window":        func(c *mapguard.BreakerConfig) { c.Window = 0 },
		"negative window":    func(c *mapguard.BreakerConfig) { c.Window = -time.Second },
		"negative window/1":  func(c *mapguard.BreakerConfig) { c.Trip, c.Window = 1, -time.Second },
		"zero cooldown":      func(c *mapguard.BreakerConfig) { c.Cooldown = 0 },
		"negative cooldown":  func(c *mapguard.BreakerConfig) { c.Cooldown = -time.Second },
		"unknown kind":       func(c *mapguard.BreakerConfig) { c.Kinds = []mapguard.Kind{99} },
		"kind zero":          func(c *mapguard.BreakerConfig) { c.Kinds = []mapguard.Kind{0} },
		"kind listed twice":  func(c *mapguard.BreakerConfig) { c.Kinds = []mapguard.Kind{mapguard.NilMapRead, mapguard.NilMapRead} },
		"zero value":         func(c *mapguard.BreakerConfig) { *c = mapguard.BreakerConfig{} },
		"only callbacks set": func(c *mapguard.BreakerConfig) { *c = mapguard.BreakerConfig{OnTrip: func(mapguard.Event) {}} },
	} {
		cfg := ok
		mod(&cfg)
		if b, err := mapguard.NewBreaker(cfg); err == nil || b != nil {
			t.Errorf("%s: NewBreaker(%+v) = %v, %v; want an error", name, cfg, b, err)
		}
	}
	for name, cfg := range map[string]mapguard.BreakerConfig{
		"minimal":               ok,
		"trip 1 without window": {Trip: 1, Cooldown: time.Second},
		"max trip":              {Trip: mapguard.MaxBreakerTrip, Window: time.Second, Cooldown: time.Second},
		"kinds":                 {Trip: 2, Window: time.Second, Cooldown: time.Second, Kinds: []mapguard.Kind{mapguard.NilMapWrite, mapguard.NilMapRead}},
	} {
		if _, err := mapguard.NewBreaker(cfg); err != nil {
			t.Errorf("%s: NewBreaker(%+v): %v", name, cfg, err)
		}
	}
}

// A step moves the fake clock, optionally observes an event, and then
// checks Tripped and the callback counts.
type step struct {
	advance time.Duration // clock moves by this first
	kind    mapguard.Kind // 0: no event
	at      time.Duration // event time is t0+at; 0 leaves Event.Time zero (the clock is used)
	count   uint64        // Event.Count
	tripped bool          // want Tripped()
	trips   int           // want OnTrip calls so far
	resets  int           // want OnReset calls so far
	skip    bool          // do not call Tripped (to test resets triggered by Observe)
}

const (
	w = mapguard.NilMapWrite
	r = mapguard.NilMapRead
)

func TestBreakerSteps(t *testing.T) {
	cfg := mapguard.BreakerConfig{Trip: 3, Window: 10 * time.Second, Cooldown: 30 * time.Second}
	writes := cfg
	writes.Kinds = []mapguard.Kind{w}
	one := mapguard.BreakerConfig{Trip: 1, Cooldown: time.Minute}

	for _, tc := range []struct {
		name  string
		cfg   mapguard.BreakerConfig
		steps []step
	}{
		{"trips at N within window", cfg, []step{
			{kind: w},
			{advance: time.Second, kind: w},
			{advance: time.Second, kind: w, tripped: true, trips: 1},
		}},
		{"not at N-1", cfg, []step{
			{kind: w},
			{advance: time.Second, kind: w},
			{advance: time.Hour},
		}},
		{"exactly Window apart trips", cfg, []step{
			{kind: w},
			{advance: 5 * time.Second, kind: w},
			{advance: 5 * time.Second, kind: w, tripped: true, trips: 1},
		}},
		{"just over Window does not", cfg, []step{
			{kind: w},
			{advance: 5 * time.Second, kind: w},
			{advance: 5*time.Second + 1, kind: w},
		}},
		{"old events slide out", cfg, []step{
			{kind: w},                           // 0 s
			{advance: 6 * time.Second, kind: w}, // 6 s
			{advance: 5 * time.Second, kind: w}, // 11 s: 0..11 is too wide
			{advance: 5 * time.Second, kind: w, tripped: true, trips: 1}, // 16 s: 6..16
		}},
		{"kinds filter", writes, []step{
			{kind: r}, {kind: r}, {kind: r}, {kind: r},
			{kind: w}, {kind: r}, {kind: w},
			{kind: w, tripped: true, trips: 1},
		}},
		{"empty Kinds counts every kind", cfg, []step{
			{kind: r}, {kind: w},
			{kind: r, tripped: true, trips: 1},
		}},
		{"unknown kinds count when Kinds is empty", cfg, []step{
			{kind: 77}, {kind: 77},
			{kind: 77, tripped: true, trips: 1},
		}},
		{"OnTrip once; events during cool-down ignored", cfg, []step{
			{kind: w}, {kind: w},
			{kind: w, tripped: true, trips: 1},
			{kind: w, tripped: true, trips: 1},
			{kind: w, tripped: true, trips: 1},
			{kind: w, tripped: true, trips: 1},
			{advance: time.Second, kind: w, tripped: true, trips: 1},
		}},
		{"tripped during cool-down, reset after it, OnReset once", cfg, []step{
			{kind: w}, {kind: w},
			{kind: w, tripped: true, trips: 1},
			{advance: 30*time.Second - 1, tripped: true, trips: 1},
			{advance: 1, trips: 1, resets: 1},
			{trips: 1, resets: 1},
			{advance: time.Hour, trips: 1, resets: 1},
		}},
		{"trips again after reset with Trip new events", cfg, []step{
			{kind: w}, {kind: w},
			{kind: w, tripped: true, trips: 1},
			{advance: 30 * time.Second, trips: 1, resets: 1},
			{kind: w, trips: 1, resets: 1},
			{kind: w, trips: 1, resets: 1},
			{kind: w, tripped: true, trips: 2, resets: 1},
			{advance: 30 * time.Second, trips: 2, resets: 2},
		}},
		{"events during cool-down do not count after reset", cfg, []step{
			{kind: w}, {kind: w},
			{kind: w, tripped: true, trips: 1},
			{advance: 29 * time.Second, kind: w, tripped: true, trips: 1},
			{kind: w, tripped: true, trips: 1},
			{advance: time.Second, trips: 1, resets: 1},
			{kind: w, trips: 1, resets: 1},
		}},
		{"Observe performs the lazy reset", cfg, []step{
			{kind: w}, {kind: w},
			{kind: w, tripped: true, trips: 1},
			{advance: time.Minute, kind: w, trips: 1, resets: 1, skip: true},
			{kind: w, trips: 1, resets: 1},
			{kind: w, tripped: true, trips: 2, resets: 1},
		}},
		{"Count weighs an event", cfg, []step{
			{kind: w, count: 2},
			{kind: w, count: 1, tripped: true, trips: 1},
			{advance: time.Minute, trips: 1, resets: 1},
			{kind: w, count: 1000, tripped: true, trips: 2, resets: 1},
		}},
		{"Trip 1 ignores Window", one, []step{
			{kind: r, tripped: true, trips: 1},
			{advance: time.Minute, trips: 1, resets: 1},
			{advance: time.Hour, kind: w, tripped: true, trips: 2, resets: 1},
		}},
		{"window on event time, not delivery time", cfg, []step{
			// delivered a minute apart, but happened within 2 s
			{kind: w, at: 1 * time.Second},
			{advance: time.Minute, kind: w, at: 2 * time.Second},
			{advance: time.Minute, kind: w, at: 3 * time.Second, tripped: true, trips: 1},
		}},
		{"delivered together, happened too far apart", cfg, []step{
			{kind: w, at: 1 * time.Second},
			{kind: w, at: 7 * time.Second},
			{kind: w, at: 13 * time.Second},
		}},
		{"out-of-order event times", cfg, []step{
			{kind: w, at: 20 * time.Second},
			{kind: w, at: 5 * time.Second},
			{kind: w, at: 12 * time.Second},                          // 5..20 is too wide
			{kind: w, at: 14 * time.Second, tripped: true, trips: 1}, // 20, delivered first, slid out: 5..14
		}},
		{"cool-down on the clock, not event time", cfg, []step{
			{kind: w, at: time.Second}, {kind: w, at: time.Second},
			{kind: w, at: time.Second, tripped: true, trips: 1},
			{advance: 29 * time.Second, kind: w, at: time.Hour, tripped: true, trips: 1},
			{advance: time.Second, trips: 1, resets: 1},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, clk, cb := newTestBreaker(t, tc.cfg)
			for i, s := range tc.steps {
				clk.Advance(s.advance)
				if s.kind != 0 {
					ev := mapguard.Event{Kind: s.kind, Count: s.count, Goroutine: uint64(i)}
					if s.at != 0 {
						ev.Time = t0.Add(s.at)
					}
					b.Observe(ev)
				}
				if !s.skip {
					if got := b.Tripped(); got != s.tripped {
						t.Fatalf("step %d: Tripped() = %v, want %v", i, got, s.tripped)
					}
				}
				if trips, resets := cb.counts(); trips != s.trips || resets != s.resets {
					t.Fatalf("step %d: OnTrip called %d times, OnReset %d; want %d and %d", i, trips, resets, s.trips, s.resets)
				}
			}
		})
	}
}

func TestBreakerOnTripGetsCompletingEvent(t *testing.T) {
	b, _, cb := newTestBreaker(t, mapguard.BreakerConfig{
		Trip: 2, Window: time.Second, Cooldown: time.Second, Kinds: []mapguard.Kind{w},
	})
	b.Observe(mapguard.Event{Kind: w, Goroutine: 1})
	b.Observe(mapguard.Event{Kind: r, Goroutine: 2})
	b.Observe(mapguard.Event{Kind: w, Goroutine: 3, MapType: "map[string]int"})
	b.Observe(mapguard.Event{Kind: w, Goroutine: 4})
	if cb.trips != 1 || cb.last.Goroutine != 3 || cb.last.MapType != "map[string]int" {
		t.Fatalf("OnTrip called %d times, last with %+v; want once with goroutine 3's event", cb.trips, cb.last)
	}
}

func TestBreakerStats(t *testing.T) {
	b, clk, _ := newTestBreaker(t, mapguard.BreakerConfig{
		Trip: 2, Window: time.Second, Cooldown: 10 * time.Second, Kinds: []mapguard.Kind{w},
	})
	if st := b.Stats(); st != (mapguard.BreakerStats{}) {
		t.Fatalf("new breaker: %+v", st)
	}
	b.Observe(mapguard.Event{Kind: r})
	b.Observe(mapguard.Event{Kind: w, Count: 3})
	clk.Advance(time.Second)
	b.Observe(mapguard.Event{Kind: w})
	want := mapguard.BreakerStats{Tripped: true, Trips: 1, Counted: 4, Until: t0.Add(10 * time.Second)}
	if st := b.Stats(); st != want {
		t.Fatalf("after trip: %+v, want %+v", st, want)
	}
	clk.Advance(9 * time.Second)
	want = mapguard.BreakerStats{Trips: 1, Counted: 4}
	if st := b.Stats(); st != want {
		t.Fatalf("after cool-down: %+v, want %+v", st, want)
	}
}

// Callbacks may use the breaker: they run without its lock, and a
// transition that becomes due while one runs is performed after it
// returns, never nested.
func TestBreakerReentrantCallbacks(t *testing.T) {
	clk := newFakeClock()
	var (
		b     *mapguard.Breaker
		order []string
		depth int
	)
	enter := func(name string) {
		depth++
		if depth > 1 {
			t.Errorf("%s nested in another callback", name)
		}
		order = append(order, name)
	}
	b, err := mapguard.NewBreaker(mapguard.BreakerConfig{
		Trip: 2, Window: time.Second, Cooldown: time.Second, Now: clk.Now,
		OnTrip: func(ev mapguard.Event) {
			enter("trip")
			defer func() { depth-- }()
			if !b.Tripped() {
				t.Error("Tripped() = false in OnTrip")
			}
			// The cool-down passes while OnTrip runs: the breaker stays
			// tripped until OnTrip returns.
			clk.Advance(time.Hour)
			if !b.Tripped() {
				t.Error("Tripped() = false in OnTrip after the cool-down")
			}
			b.Observe(mapguard.Event{Kind: w}) // ignored: tripped
			_ = b.Stats()
		},
		OnReset: func() {
			enter("reset")
			defer func() { depth-- }()
			if b.Tripped() {
				t.Error("Tripped() = true in OnReset")
			}
			if len(order) < 4 {
				// Two events in OnReset make a trip due; it happens
				// after OnReset returns.
				b.Observe(mapguard.Event{Kind: w})
				b.Observe(mapguard.Event{Kind: w})
				if b.Tripped() {
					t.Error("Tripped() = true in OnReset")
				}
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	b.Observe(mapguard.Event{Kind: w})
	b.Observe(mapguard.Event{Kind: w})
	// One Observe ran: trip, (cool-down passed) reset, trip again, reset.
	if got, want := fmt.Sprint(order), "[trip reset trip reset]"; got != want {
		t.Fatalf("callbacks %s, want %s", got, want)
	}
	if st := b.Stats(); st.Tripped || st.Trips != 2 {
		t.Fatalf("stats %+v", st)
	}
}

// A panicking callback propagates to the caller and leaves the breaker
// consistent.
func TestBreakerCallbackPanic(t *testing.T) {
	clk := newFakeClock()
	var trips, resets int
	b, err := mapguard.NewBreaker(mapguard.BreakerConfig{
		Trip: 1, Cooldown: time.Second, Now: clk.Now,
		OnTrip:  func(mapguard.Event) { trips++; panic("trip") },
		OnReset: func() { resets++; panic("reset") },
	})
	if err != nil {
		t.Fatal(err)
	}
	mustPanic := func(what string, f func()) {
		t.Helper()
		defer func() {
			if recover() == nil {
				t.Fatalf("%s did not panic", what)
			}
		}()
		f()
	}
	mustPanic("Observe", func() { b.Observe(mapguard.Event{Kind: w}) })
	if !b.Tripped() || trips != 1 {
		t.Fatalf("after OnTrip panicked: Tripped() = %v, trips %d", b.Tripped(), trips)
	}
	clk.Advance(time.Second)
	mustPanic("Tripped", func() { b.Tripped() })
	if b.Tripped() || resets != 1 {
		t.Fatalf("after OnReset panicked: Tripped() = %v, resets %d", b.Tripped(), resets)
	}
	mustPanic("Observe", func() { b.Observe(mapguard.Event{Kind: w}) })
	if !b.Tripped() || trips != 2 {
		t.Fatalf("second trip: Tripped() = %v, trips %d", b.Tripped(), trips)
	}
}

// Many goroutines observe and poll while the clock moves: every trip and
// reset is reported exactly once, one callback at a time, alternating.
func TestBreakerConcurrent(t *testing.T) {
	clk := newFakeClock()
	var (
		trips, resets atomic.Int64
		inCallback    atomic.Int32
		tripped       atomic.Bool // what the callbacks have said so far
		bad           atomic.Int64
	)
	enter := func(wantTripped bool) {
		if inCallback.Add(1) != 1 {
			bad.Add(1) // concurrent callbacks
		}
		if tripped.Load() != wantTripped {
			bad.Add(1) // not alternating
		}
	}
	b, err := mapguard.NewBreaker(mapguard.BreakerConfig{
		Trip: 5, Window: time.Second, Cooldown: 10 * time.Millisecond, Now: clk.Now,
		OnTrip: func(mapguard.Event) {
			enter(false)
			tripped.Store(true)
			trips.Add(1)
			inCallback.Add(-1)
		},
		OnReset: func() {
			enter(true)
			tripped.Store(false)
			resets.Add(1)
			inCallback.Add(-1)
		},
	})
	if err != nil {
		t.Fatal(err)
	}

	const workers, iters = 8, 2000
	var wg sync.WaitGroup
	for i := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range iters {
				switch (i + j) % 4 {
				case 0, 1:
					b.Observe(mapguard.Event{Kind: w, Goroutine: uint64(i)})
				case 2:
					b.Tripped()
				case 3:
					clk.Advance(time.Millisecond)
				}
			}
		}()
	}
	wg.Wait()
	clk.Advance(time.Hour)
	if b.Tripped() {
		t.Fatal("tripped after the cool-down")
	}
	st := b.Stats()
	if n := bad.Load(); n != 0 {
		t.Fatalf("%d callbacks ran concurrently or out of order", n)
	}
	if trips.Load() == 0 || trips.Load() != resets.Load() || uint64(trips.Load()) != st.Trips {
		t.Fatalf("OnTrip %d, OnReset %d, Stats.Trips %d; want equal and > 0", trips.Load(), resets.Load(), st.Trips)
	}
	if want := uint64(workers * iters / 2); st.Counted != want {
		t.Fatalf("Counted %d, want %d", st.Counted, want)
	}
	t.Logf("%d trips", st.Trips)
}

// End to end through a Guard with the fake probe: events flow from Emit
// through the dispatcher to Observe.
func TestBreakerWithGuard(t *testing.T) {
	fake := mapguard.NewFake()
	g, err := mapguard.New(mapguard.Options{Probe: fake})
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer g.Close()

	clk := newFakeClock()
	tripped := make(chan mapguard.Event, 1)
	var resets atomic.Int32
	b, err := mapguard.NewBreaker(mapguard.BreakerConfig{
		Kinds: []mapguard.Kind{w}, Trip: 3, Window: 10 * time.Second, Cooldown: 30 * time.Second, Now: clk.Now,
		OnTrip:  func(ev mapguard.Event) { tripped <- ev },
		OnReset: func() { resets.Add(1) },
	})
	if err != nil {
		t.Fatal(err)
	}
	g.OnEvent(b.Observe)
	// Callbacks run in order: when this one sees an event, Observe, and
	// OnTrip within it, have returned.
	observed := make(chan mapguard.Event, 16)
	g.OnEvent(func(ev mapguard.Event) { observed <- ev })

	for i := range 5 {
		fake.Emit(mapguard.Event{Kind: r, Goroutine: uint64(100 + i)})
	}
	for i := range 3 {
		if !fake.Emit(mapguard.Event{Kind: w, Goroutine: uint64(i + 1)}) {
			t.Fatal("Emit dropped the event")
		}
	}
	select {
	case ev := <-tripped:
		if ev.Goroutine != 3 {
			t.Fatalf("tripped by %v, want the event of goroutine 3", ev)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("breaker did not trip; stats %+v", b.Stats())
	}
	for ev := range observed {
		if ev.Kind == w && ev.Goroutine == 3 {
			break
		}
	}
	if !b.Tripped() {
		t.Fatal("Tripped() = false after OnTrip")
	}
	clk.Advance(30 * time.Second)
	if b.Tripped() || resets.Load() != 1 {
		t.Fatalf("after the cool-down: Tripped() = %v, OnReset called %d times", b.Tripped(), resets.Load())
	}
	if st := b.Stats(); st.Trips != 1 || st.Counted != 3 {
		t.Fatalf("stats %+v", st)
	}
}

// A Breaker as a downgrade switch: three nil-map writes within ten seconds
// trip it, and the service serves a fallback for a minute. Reads do not
// count.
func ExampleBreaker() {
	fake := mapguard.NewFake() // a real service leaves Options.Probe nil
	g, err := mapguard.New(mapguard.Options{Probe: fake})
	if err != nil {
		panic(err)
	}
	if err := g.Start(context.Background()); err != nil {
		panic(err)
	}
	defer g.Close()

	tripped := make(chan struct{})
	b, err := mapguard.NewBreaker(mapguard.BreakerConfig{
		Kinds:    []mapguard.Kind{mapguard.NilMapWrite},
		Trip:     3,
		Window:   10 * time.Second,
		Cooldown: time.Minute,
		OnTrip: func(ev mapguard.Event) {
			fmt.Println("degrading after:", ev)
			close(tripped)
		},
		OnReset: func() { fmt.Println("back to normal") },
	})
	if err != nil {
		panic(err)
	}
	g.OnEvent(b.Observe)
	fmt.Println("tripped:", b.Tripped())

	site := mapguard.Frame{Function: "main.handle", File: "/src/app/main.go", Line: 42}
	fake.Emit(mapguard.Event{Kind: mapguard.NilMapRead, Goroutine: 6, Site: site})
	for gid := range uint64(3) {
		fake.Emit(mapguard.Event{Kind: mapguard.NilMapWrite, Goroutine: 7 + gid, Site: site, MapType: "map[string]int"})
	}
	<-tripped
	fmt.Println("tripped:", b.Tripped())
	// Output:
	// tripped: false
	// degrading after: nil-map-write at /src/app/main.go:42 (main.handle) in goroutine 9: map[string]int len=0
	// tripped: true
}
