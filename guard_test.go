package mapguard

import (
	"context"
	"errors"
	"runtime"
	"sync/atomic"
	"testing"
	"time"
)

func startFake(t *testing.T, opts Options) (*Guard, *Fake) {
	t.Helper()
	fake := NewFake()
	opts.Probe = fake
	g, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	return g, fake
}

func TestNewRejectsBadOptions(t *testing.T) {
	for name, opts := range map[string]Options{
		"depth":     {StackDepth: 17},
		"negdepth":  {StackDepth: -1},
		"buffer":    {BufferSize: -1},
		"kind":      {Detect: []Kind{Kind(99)}},
		"duplicate": {Detect: []Kind{NilMapRead, NilMapRead}},
	} {
		if _, err := New(opts); err == nil {
			t.Errorf("%s: New(%+v) succeeded", name, opts)
		}
	}
	if _, err := New(Options{}); err != nil {
		t.Fatalf("zero Options: %v", err)
	}
}

func TestEventsAndCallbacks(t *testing.T) {
	g, fake := startFake(t, Options{})
	ch := g.Events()
	got := make(chan Event, 10)
	g.OnEvent(func(ev Event) { got <- ev })
	g.OnEvent(func(ev Event) { panic("callback bug") })

	fake.Emit(Event{Kind: NilMapRead, Goroutine: 3})
	fake.Emit(Event{Kind: NilMapWrite, Goroutine: 4})
	for _, want := range []Kind{NilMapRead, NilMapWrite} {
		if ev := <-ch; ev.Kind != want {
			t.Fatalf("channel: %v, want %v", ev.Kind, want)
		}
		if ev := <-got; ev.Kind != want {
			t.Fatalf("callback: %v, want %v", ev.Kind, want)
		}
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	st := g.Stats()
	if st.Events[NilMapRead] != 1 || st.Events[NilMapWrite] != 1 || st.CallbackPanics != 2 || st.Dropped != 0 {
		t.Fatalf("stats %+v", st)
	}
	if _, ok := <-ch; ok {
		t.Fatal("Events channel not closed after Close")
	}
}

func TestDropsAreCounted(t *testing.T) {
	g, fake := startFake(t, Options{BufferSize: 4})
	ch := g.Events() // never read
	block, entered := make(chan struct{}), make(chan struct{}, 1)
	g.OnEvent(func(Event) {
		select {
		case entered <- struct{}{}:
		default:
		}
		<-block
	})

	const n = 100
	fake.Emit(Event{Kind: NilMapWrite})
	<-entered // the dispatcher holds the first event: the queue fills behind it
	for i := 1; i < n; i++ {
		fake.Emit(Event{Kind: NilMapWrite})
	}
	close(block)
	g.Close()
	st := g.Stats()
	delivered := uint64(len(ch))
	if st.Events[NilMapWrite] != n {
		t.Fatalf("events %d, want %d", st.Events[NilMapWrite], n)
	}
	// Every event is either on the channel or counted as dropped somewhere.
	if delivered+st.DroppedChannel+st.DroppedQueue != n || st.DroppedQueue == 0 || st.DroppedChannel == 0 {
		t.Fatalf("delivered %d + channel drops %d + queue drops %d != %d", delivered, st.DroppedChannel, st.DroppedQueue, n)
	}
}

// Events delivered before the first call to Events (a PreviousCrash right
// after Start) wait on the channel; those it had no room for count as
// channel drops once somebody asks for it, and never for a Guard used only
// through callbacks.
func TestEventsBeforeFirstCall(t *testing.T) {
	g, fake := startFake(t, Options{BufferSize: 4})
	seen := make(chan struct{}, 16)
	g.OnEvent(func(Event) { seen <- struct{}{} })
	for i := 0; i < 6; i++ {
		fake.Emit(Event{Kind: PreviousCrash, PID: 100 + i})
		<-seen // the channel send comes before the callbacks
	}
	if st := g.Stats(); st.DroppedChannel != 0 || st.Dropped != 0 {
		t.Fatalf("drops counted before anybody asked for the channel: %+v", st)
	}
	ch := g.Events()
	for i := 0; i < 4; i++ {
		if ev := <-ch; ev.Kind != PreviousCrash || ev.PID != 100+i {
			t.Fatalf("early event %d: %v", i, ev)
		}
	}
	if st := g.Stats(); st.DroppedChannel != 2 || st.DroppedByKind[PreviousCrash] != 2 {
		t.Fatalf("early drops: channel %d, by kind %v; want 2", st.DroppedChannel, st.DroppedByKind)
	}
}

func TestLifecycle(t *testing.T) {
	before := runtime.NumGoroutine()
	g, fake := startFake(t, Options{})
	if err := g.Start(context.Background()); err == nil {
		t.Fatal("second Start succeeded")
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	if err := g.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := g.Start(context.Background()); !errors.Is(err, ErrClosed) {
		t.Fatalf("Start after Close: %v, want ErrClosed", err)
	}
	if fake.Emit(Event{Kind: NilMapRead}) {
		t.Fatal("Emit after Close delivered")
	}
	if _, ok := <-g.Events(); ok {
		t.Fatal("Events after Close is not closed")
	}
	waitGoroutines(t, before)
}

func TestContextCancelCloses(t *testing.T) {
	fake := NewFake()
	g, _ := New(Options{Probe: fake})
	ctx, cancel := context.WithCancel(context.Background())
	if err := g.Start(ctx); err != nil {
		t.Fatal(err)
	}
	ch := g.Events()
	cancel()
	select {
	case _, ok := <-ch:
		if ok {
			t.Fatal("unexpected event")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Guard did not close when its context was cancelled")
	}
}

func TestCloseFromCallback(t *testing.T) {
	g, fake := startFake(t, Options{})
	closed := make(chan error, 1)
	g.OnEvent(func(Event) { closed <- g.Close() })
	fake.Emit(Event{Kind: NilMapRead})
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
}

// waitGoroutines waits for the goroutine count to fall back to n.
func waitGoroutines(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > n {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<16)
			t.Fatalf("%d goroutines, want %d:\n%s", runtime.NumGoroutine(), n, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// BenchmarkDelivery is the user-space path after decoding: the probe's sink,
// the dispatch queue, the dispatcher goroutine and one callback.
func BenchmarkDelivery(b *testing.B) {
	fake := NewFake()
	g, err := New(Options{Probe: fake, BufferSize: 1 << 16})
	if err != nil {
		b.Fatal(err)
	}
	if err := g.Start(context.Background()); err != nil {
		b.Fatal(err)
	}
	defer g.Close()
	var seen atomic.Int64
	g.OnEvent(func(Event) { seen.Add(1) })
	ev := Event{Kind: NilMapRead, Count: 1, Site: Frame{Function: "main.f", File: "/x.go", Line: 3}}
	b.ReportAllocs()
	n := 0
	for b.Loop() {
		fake.Emit(ev)
		n++
		for n-int(seen.Load()) > 1<<15 { // stay within the queue
			runtime.Gosched()
		}
	}
	for int(seen.Load()) < n-int(g.Stats().DroppedQueue) {
		runtime.Gosched()
	}
	b.ReportMetric(float64(n)/b.Elapsed().Seconds(), "events/s")
}

// The fake delivers events whatever goroutine id a test gives them, even
// the id of the Guard's own dispatcher, which the Guard asks it to ignore.
func TestFakeIgnoresNoMadeUpGoroutine(t *testing.T) {
	g, fake := startFake(t, Options{})
	got := make(chan Event, 1)
	g.OnEvent(func(ev Event) { got <- ev })
	if !fake.Ignored(g.dispGoid) {
		t.Fatal("the Guard did not ask the probe to ignore its dispatcher")
	}
	if !fake.Emit(Event{Kind: NilMapRead, Goroutine: g.dispGoid}) {
		t.Fatal("Emit dropped an event")
	}
	if ev := <-got; ev.Goroutine != g.dispGoid {
		t.Fatalf("event %v", ev)
	}
}
