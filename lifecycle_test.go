package mapguard

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/mapguard/mapguard/probe"
)

// scriptedProbe is a probe.Probe whose Start returns what the test says:
// a refusal, success (then it behaves like a Fake), or it blocks
// until its context is done.
type scriptedProbe struct {
	*Fake
	mu     sync.Mutex
	refuse []error // returned by successive Starts; nil: succeed
	block  bool    // Start waits for ctx
	starts int
}

func (p *scriptedProbe) Start(ctx context.Context, sink probe.Sink) error {
	p.mu.Lock()
	p.starts++
	var err error
	if len(p.refuse) > 0 {
		err, p.refuse = p.refuse[0], p.refuse[1:]
	}
	block := p.block
	p.mu.Unlock()
	if block {
		<-ctx.Done()
		return fmt.Errorf("start probe: %w", ctx.Err())
	}
	if err != nil {
		return err
	}
	return p.Fake.Start(ctx, sink)
}

func newScripted(t *testing.T, p *scriptedProbe) *Guard {
	t.Helper()
	p.Fake = NewFake()
	g, err := New(Options{Probe: p})
	if err != nil {
		t.Fatal(err)
	}
	return g
}

// Every typed refusal leaves the Guard usable: Events and Close never
// panic, nothing keeps running, and Start may be tried again.
func TestRefusedStartLeavesNothing(t *testing.T) {
	for _, refusal := range []error{ErrNotSupported, ErrPermission, ErrResourceLimit, ErrLayoutMismatch} {
		t.Run(refusal.Error(), func(t *testing.T) {
			before := runtime.NumGoroutine()
			p := &scriptedProbe{refuse: []error{fmt.Errorf("start probe: %w", refusal)}}
			g := newScripted(t, p)
			events := g.Events()
			if err := g.Start(context.Background()); !errors.Is(err, refusal) {
				t.Fatalf("Start = %v, want %v", err, refusal)
			}
			waitGoroutines(t, before)
			select {
			case _, ok := <-events:
				t.Fatalf("Events delivered or closed (ok=%v) after a refused Start", ok)
			default:
			}
			st := g.Stats()
			if st.Dropped != 0 || len(st.Events) != 0 {
				t.Fatalf("Stats after a refused Start: %+v", st)
			}
			if err := g.Close(); err != nil {
				t.Fatal(err)
			}
			if _, ok := <-events; ok {
				t.Fatal("Events not closed by Close")
			}
			if _, ok := <-g.Events(); ok {
				t.Fatal("Events after Close not closed")
			}
			if err := g.Close(); err != nil {
				t.Fatal(err)
			}
			if err := g.Start(context.Background()); !errors.Is(err, ErrClosed) {
				t.Fatalf("Start after Close = %v, want ErrClosed", err)
			}
			waitGoroutines(t, before)
		})
	}
}

// A refused Start may be retried; the Events channel and callbacks from
// before the refusal keep working.
func TestStartRetryAfterRefusal(t *testing.T) {
	p := &scriptedProbe{refuse: []error{fmt.Errorf("start probe: %w", ErrPermission)}}
	g := newScripted(t, p)
	defer g.Close()
	events := g.Events()
	called := make(chan Event, 1)
	g.OnEvent(func(ev Event) { called <- ev })
	if err := g.Start(context.Background()); !errors.Is(err, ErrPermission) {
		t.Fatalf("first Start = %v", err)
	}
	if err := g.Start(context.Background()); err != nil {
		t.Fatalf("second Start = %v", err)
	}
	if err := g.Start(context.Background()); !errors.Is(err, ErrStarted) {
		t.Fatalf("third Start = %v, want ErrStarted", err)
	}
	p.Emit(Event{Kind: NilMapWrite, Goroutine: 7})
	if ev := <-events; ev.Kind != NilMapWrite {
		t.Fatalf("event %v", ev)
	}
	if ev := <-called; ev.Goroutine != 7 {
		t.Fatalf("callback %v", ev)
	}
}

func TestStartCancelledContext(t *testing.T) {
	g := newScripted(t, &scriptedProbe{})
	defer g.Close()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := g.Start(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Start(cancelled) = %v", err)
	}
	if err := g.Start(context.Background()); err != nil {
		t.Fatalf("Start after a cancelled Start = %v", err)
	}
}

// Close while Start is attaching cancels Start, which returns ErrClosed.
func TestCloseDuringStart(t *testing.T) {
	before := runtime.NumGoroutine()
	p := &scriptedProbe{block: true}
	g := newScripted(t, p)
	events := g.Events()
	started := make(chan error, 1)
	go func() { started <- g.Start(context.Background()) }()
	for {
		p.mu.Lock()
		n := p.starts
		p.mu.Unlock()
		if n > 0 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-started; !errors.Is(err, ErrClosed) {
		t.Fatalf("Start = %v, want ErrClosed", err)
	}
	if _, ok := <-events; ok {
		t.Fatal("Events open after Close")
	}
	waitGoroutines(t, before)
}

// Close and Start racing from many goroutines never panic, and leave
// nothing running.
func TestCloseRacesStart(t *testing.T) {
	before := runtime.NumGoroutine()
	for i := 0; i < 200; i++ {
		g := newScripted(t, &scriptedProbe{})
		ch := g.Events()
		var wg sync.WaitGroup
		for j := 0; j < 3; j++ {
			wg.Add(2)
			go func() { defer wg.Done(); g.Start(context.Background()) }()
			go func() { defer wg.Done(); g.Close() }()
		}
		wg.Wait()
		g.Close()
		if _, ok := <-ch; ok {
			t.Fatal("Events open after Close")
		}
	}
	waitGoroutines(t, before)
}

// A callback that never returns does not hold Close forever; no callback
// runs after Close returned, and Events is closed.
func TestCloseWithBlockedCallback(t *testing.T) {
	g, fake := startFake(t, Options{})
	events := g.Events()
	release := make(chan struct{})
	entered := make(chan struct{}, 1)
	calls := 0
	g.OnEvent(func(Event) {
		calls++
		entered <- struct{}{}
		<-release
	})
	fake.Emit(Event{Kind: NilMapWrite})
	fake.Emit(Event{Kind: NilMapWrite})
	<-entered
	closed := make(chan error, 1)
	go func() { closed <- g.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Close blocked on a callback")
	}
	for range events {
	}
	close(release)
	<-g.done // the dispatcher drains and returns
	if calls != 1 {
		t.Fatalf("%d callback calls, want 1 (none after Close)", calls)
	}
}

func TestNewRejectsProbeOptions(t *testing.T) {
	for name, opts := range map[string]Options{
		"Detect":          {Detect: []Kind{SharedWriters}},
		"StackDepth":      {StackDepth: 4},
		"MissingKeyScope": {MissingKeyScope: []string{"x"}},
		"Budget":          {Budget: 0.5},
		"CaptureKeys":     {CaptureKeys: func([]byte) string { return "" }},
	} {
		opts.Probe = NewFake()
		if _, err := New(opts); err == nil {
			t.Errorf("%s with a custom Probe: New succeeded", name)
		}
	}
	for name, opts := range map[string]Options{
		"BufferSize": {BufferSize: 8},
		"OpStats":    {OpStats: true},
		"empty":      {MissingKeyScope: []string{}},
	} {
		opts.Probe = NewFake()
		if _, err := New(opts); err != nil {
			t.Errorf("%s with a custom Probe: %v", name, err)
		}
	}
}

func TestDetectAddsToDefaults(t *testing.T) {
	for _, c := range []struct {
		opts Options
		want []Kind
	}{
		{Options{}, DefaultKinds()},
		{Options{Detect: []Kind{SharedWriters}}, append(DefaultKinds(), SharedWriters)},
		{Options{Detect: []Kind{NilMapWrite}}, DefaultKinds()},
		{Options{Detect: []Kind{SharedWriters}, DetectOnly: true}, []Kind{SharedWriters}},
	} {
		if got := c.opts.kinds(); !slices.Equal(got, c.want) {
			t.Errorf("kinds(%v, only=%v) = %v, want %v", c.opts.Detect, c.opts.DetectOnly, got, c.want)
		}
	}
	if _, err := New(Options{DetectOnly: true}); err == nil {
		t.Error("DetectOnly with no kinds: New succeeded")
	}
}
