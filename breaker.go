package mapguard

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// MaxBreakerTrip is the largest BreakerConfig.Trip. A Breaker keeps one
// 8-byte timestamp per unit of Trip.
const MaxBreakerTrip = 1 << 16

// BreakerConfig configures a Breaker. Trip, Window (when Trip > 1) and
// Cooldown are required; everything else may be left zero.
type BreakerConfig struct {
	// Kinds are the kinds of event that count. Empty means every kind.
	Kinds []Kind
	// Trip is how many events within Window trip the breaker, at least 1
	// and at most MaxBreakerTrip. An event stands for Event.Count
	// occurrences (1 if Count is 0), and each occurrence counts.
	Trip int
	// Window is the span of event time within which Trip events trip the
	// breaker: it trips when the last Trip counted events happened no more
	// than Window apart. It must be positive when Trip > 1; when Trip is 1
	// it has no effect (but must not be negative).
	Window time.Duration
	// Cooldown is how long the breaker stays tripped, measured on Now from
	// the moment it tripped. It must be positive.
	Cooldown time.Duration
	// OnTrip, if not nil, is called when the breaker trips, with the event
	// that completed the count.
	OnTrip func(Event)
	// OnReset, if not nil, is called when the breaker resets after the
	// cool-down.
	OnReset func()
	// Now is the clock; nil means time.Now. Tests inject a fake clock. It
	// must be safe for concurrent use, and must not call the Breaker.
	Now func() time.Time
}

// BreakerStats is a snapshot of a Breaker's state and counters.
type BreakerStats struct {
	// Tripped is what Tripped would return.
	Tripped bool
	// Trips is how many times the breaker has tripped.
	Trips uint64
	// Counted is how many occurrences of the configured kinds were
	// observed (weighted by Event.Count), including those during a
	// cool-down, which do not count towards a trip.
	Counted uint64
	// Until is when the current cool-down ends, by the Breaker's clock;
	// zero when the breaker is not tripped.
	Until time.Time
}

// A Breaker is a circuit breaker driven by events: it trips when
// BreakerConfig.Trip events of the chosen kinds happen within
// BreakerConfig.Window, stays tripped for BreakerConfig.Cooldown, and then
// resets. Feed it with Observe, typically as a Guard callback:
//
//	b, err := mapguard.NewBreaker(mapguard.BreakerConfig{
//		Kinds:    []mapguard.Kind{mapguard.NilMapWrite},
//		Trip:     3,
//		Window:   10 * time.Second,
//		Cooldown: time.Minute,
//	})
//	if err != nil { ... }
//	g.OnEvent(b.Observe)
//	...
//	if b.Tripped() { serve the fallback }
//
// # Time
//
// The window is measured on event time (Event.Time, or Now when that is
// zero, as it is for events a test emits without one), so that the delay
// and batching of delivery, about 100 ms, neither squeezes events into a
// window nor spreads them out of one. Events may arrive slightly out of
// order; the breaker looks at the earliest and latest of the last Trip
// events delivered. The cool-down is measured on the Breaker's clock,
// from the moment the breaker tripped, because it is about how long the
// service stays in its fallback. Events observed while the breaker is
// tripped are ignored; after a reset, Trip new events are needed to trip
// it again.
//
// # Reset
//
// A Breaker has no goroutine or timer. When the cool-down has passed, the
// next call to Observe, Tripped or Stats resets it and calls OnReset before
// returning. So Tripped never reports true after the cool-down (unless
// OnTrip is still running), and only when OnReset is called depends on
// when the breaker is next used.
//
// # Callbacks
//
// OnTrip and OnReset are called without the Breaker's lock held, so they
// may call its methods. Each is called exactly once per trip or reset, and
// never concurrently: the calls alternate, starting with OnTrip. A callback
// runs on the goroutine whose call caused the transition; if another
// callback is running at that moment, the transition waits and the
// goroutine running that callback performs it after the callback returns.
// The breaker stays tripped at least until OnTrip returns. With
// g.OnEvent(b.Observe), OnTrip runs on the Guard's dispatch goroutine,
// while OnReset usually runs in a Tripped call on a request path: keep
// both short. A panic in a callback propagates to the caller and leaves
// the Breaker consistent.
//
// # Concurrency
//
// A Breaker's methods are safe for concurrent use. Tripped is a single
// atomic load when the breaker is not tripped, and adds one call to the
// clock when it is, so that it can be called on every request. Memory is
// bounded: the Breaker keeps the times of the last Trip events only.
//
// Create a Breaker with NewBreaker; the zero Breaker is not usable.
type Breaker struct {
	trip     int
	window   int64 // nanoseconds
	cooldown time.Duration
	allKinds bool
	kinds    [256]bool
	onTrip   func(Event)
	onReset  func()
	now      func() time.Time

	// until is the end of the current cool-down, nil when not tripped. It
	// is written under mu and read without it by Tripped.
	until atomic.Pointer[time.Time]

	mu      sync.Mutex
	busy    bool    // a callback is running; transitions wait for it
	times   []int64 // ring of the last event times, unix nanoseconds
	head    int     // index of the oldest entry in times
	n       int     // entries in times
	last    Event   // the newest event in times
	trips   uint64
	counted uint64
}

// NewBreaker returns a Breaker configured by cfg, not tripped. It returns
// an error if cfg is invalid.
func NewBreaker(cfg BreakerConfig) (*Breaker, error) {
	switch {
	case cfg.Trip < 1 || cfg.Trip > MaxBreakerTrip:
		return nil, fmt.Errorf("new breaker: Trip %d out of range [1, %d]", cfg.Trip, MaxBreakerTrip)
	case cfg.Trip > 1 && cfg.Window <= 0:
		return nil, fmt.Errorf("new breaker: Window %v must be positive when Trip > 1", cfg.Window)
	case cfg.Window < 0:
		return nil, fmt.Errorf("new breaker: negative Window %v", cfg.Window)
	case cfg.Cooldown <= 0:
		return nil, fmt.Errorf("new breaker: Cooldown %v must be positive", cfg.Cooldown)
	}
	b := &Breaker{
		trip:     cfg.Trip,
		window:   int64(cfg.Window),
		cooldown: cfg.Cooldown,
		allKinds: len(cfg.Kinds) == 0,
		onTrip:   cfg.OnTrip,
		onReset:  cfg.OnReset,
		now:      cfg.Now,
		times:    make([]int64, cfg.Trip),
	}
	for _, k := range cfg.Kinds {
		if !k.Valid() {
			return nil, fmt.Errorf("new breaker: unknown kind %s", k)
		}
		if b.kinds[k] {
			return nil, fmt.Errorf("new breaker: kind %s listed twice", k)
		}
		b.kinds[k] = true
	}
	if b.now == nil {
		b.now = time.Now
	}
	return b, nil
}

// Observe counts ev if its kind is one of BreakerConfig.Kinds, and trips
// the breaker, calling OnTrip, if that completes Trip events within
// Window. It first resets the breaker if the cool-down has passed. Its
// signature fits Guard.OnEvent.
func (b *Breaker) Observe(ev Event) {
	if !b.allKinds && !b.kinds[ev.Kind] {
		return
	}
	occ := ev.Count
	if occ == 0 {
		occ = 1
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.counted += occ
	b.advance() // reset first if the cool-down has passed
	if b.until.Load() != nil {
		return // tripped: the event does not count towards the next trip
	}
	t := ev.Time
	if t.IsZero() {
		t = b.now()
	}
	ns := t.UnixNano()
	for range min(occ, uint64(b.trip)) {
		b.push(ns)
	}
	b.last = ev
	b.advance()
}

// Tripped reports whether the breaker is tripped. It first resets the
// breaker, calling OnReset, if the cool-down has passed.
func (b *Breaker) Tripped() bool {
	u := b.until.Load()
	if u == nil {
		return false
	}
	if b.now().Before(*u) {
		return true
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.advance()
	return b.until.Load() != nil
}

// Stats returns a snapshot of the breaker's state and counters. It first
// resets the breaker, calling OnReset, if the cool-down has passed.
func (b *Breaker) Stats() BreakerStats {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.advance()
	st := BreakerStats{Trips: b.trips, Counted: b.counted}
	if u := b.until.Load(); u != nil {
		st.Tripped, st.Until = true, *u
	}
	return st
}

// push appends an event time to the ring, evicting the oldest entry when
// it is full. b.mu is held.
func (b *Breaker) push(ns int64) {
	if b.n < b.trip {
		b.times[(b.head+b.n)%b.trip] = ns
		b.n++
		return
	}
	b.times[b.head] = ns
	b.head = (b.head + 1) % b.trip
}

// due reports whether the ring holds Trip event times no more than Window
// apart. b.mu is held.
func (b *Breaker) due() bool {
	if b.n < b.trip {
		return false
	}
	lo, hi := b.times[0], b.times[0]
	for _, t := range b.times[1:] {
		lo, hi = min(lo, t), max(hi, t)
	}
	return hi-lo <= b.window // always true when Trip is 1
}

// advance performs the transitions that are due, one at a time, calling
// each callback with b.mu released. It is called and returns with b.mu
// held, also when a callback panics. While a callback runs (b.busy), other
// goroutines only record events; the goroutine running the callback picks
// up whatever became due when it returns.
func (b *Breaker) advance() {
	for !b.busy {
		var call func()
		if u := b.until.Load(); u != nil {
			if b.now().Before(*u) {
				return
			}
			b.until.Store(nil)
			if b.onReset == nil {
				continue
			}
			call = b.onReset
		} else if b.due() {
			ev := b.last
			until := b.now().Add(b.cooldown)
			b.until.Store(&until)
			b.trips++
			b.head, b.n = 0, 0
			if b.onTrip == nil {
				continue
			}
			call = func() { b.onTrip(ev) }
		} else {
			return
		}
		b.busy = true
		b.mu.Unlock()
		func() {
			defer func() {
				b.mu.Lock()
				b.busy = false
			}()
			call()
		}()
	}
}
