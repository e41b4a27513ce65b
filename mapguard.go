package mapguard

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"

	"github.com/mapguard/mapguard/decode"
	"github.com/mapguard/mapguard/internal/rt"
	"github.com/mapguard/mapguard/probe"
)

// A Guard watches this process's map operations. Create it with New, then
// Start it. Its methods are safe for concurrent use.
//
// The Guard runs two kinds of goroutine of its own while started: its
// dispatcher ((*Guard).dispatch; (*Guard).feed too while events wait for
// the Events channel's reader) and the probe's reader and governor
// (functions of package github.com/mapguard/mapguard/internal/uprobe). Test suites
// that check for leaked goroutines (go.uber.org/goleak) around a Guard that
// lives for the whole test binary can ignore them with
// goleak.IgnoreAnyFunction on the names listed by GoroutineFunctions, or
// Close the Guard before the check: none is left after Close returns.
type Guard struct {
	opts Options
	log  logr.Logger

	mu          sync.Mutex
	probe       probe.Probe // the probe of the last Start attempt; nil before
	starting    bool        // a Start is in flight; Close cancels it
	cancelStart context.CancelFunc
	startDone   chan struct{} // closed when the Start in flight returns
	started     bool
	closed      bool
	delivering  bool       // the dispatcher runs
	events      chan Event // made by New: events wait there until the first Events call
	eventsUsed  bool       // Events was called
	eventsDone  bool       // events is closed
	// out holds the events the Events channel has no room for yet (it is
	// small: see queue), and a feeder goroutine moves them into it while
	// any wait. feedStop and feedDone are the last feeder's.
	out      *queue
	feedStop chan struct{}
	feedDone chan struct{}
	// Events the channel had no room for before anyone asked for it, per
	// kind: counted as channel drops once Events is called (a Guard used
	// only through callbacks drops nothing).
	earlyDropped [256]uint64
	stopCtx      func() bool

	queue     *queue // reader -> dispatcher
	deepQueue *queue // the same for deep kinds, so that they cannot crowd out the others
	done      chan struct{}
	dispGoid  uint64
	abandoned atomic.Bool // Close stopped waiting for a blocked callback
	callbacks atomic.Pointer[[]func(Event)]

	perKind        [256]atomic.Uint64
	droppedKind    [256]atomic.Uint64 // queue and channel drops, per kind
	droppedQueue   atomic.Uint64
	droppedChannel atomic.Uint64
	callbackPanics atomic.Uint64
}

// New returns a Guard configured by opts. It attaches nothing until Start.
// It returns an error if opts is invalid, or if it sets options of the
// eBPF probe together with a custom Probe (which cannot honour them).
func New(opts Options) (*Guard, error) {
	if opts.StackDepth < 0 || opts.StackDepth > decode.MaxFrames {
		return nil, fmt.Errorf("new guard: StackDepth %d out of range [0, %d]", opts.StackDepth, decode.MaxFrames)
	}
	if opts.GrowthThreshold < 0 {
		return nil, fmt.Errorf("new guard: negative GrowthThreshold %d", opts.GrowthThreshold)
	}
	if opts.Budget < 0 || opts.Budget > 1 {
		return nil, fmt.Errorf("new guard: Budget %v out of range [0, 1]", opts.Budget)
	}
	if opts.SharedWindow < 0 {
		return nil, fmt.Errorf("new guard: negative SharedWindow %v", opts.SharedWindow)
	}
	if opts.BufferSize < 0 {
		return nil, fmt.Errorf("new guard: negative BufferSize %d", opts.BufferSize)
	}
	if opts.BufferSize == 0 {
		opts.BufferSize = 1024
	}
	seen := map[Kind]bool{}
	for _, k := range opts.Detect {
		if !k.Valid() {
			return nil, fmt.Errorf("new guard: unknown kind %s", k)
		}
		if k == PreviousCrash {
			return nil, fmt.Errorf("new guard: %s is not watched itself: it comes with %s", k, ConcurrentMisuse)
		}
		if seen[k] {
			return nil, fmt.Errorf("new guard: kind %s listed twice", k)
		}
		seen[k] = true
	}
	if opts.DetectOnly && len(opts.Detect) == 0 {
		return nil, errors.New("new guard: DetectOnly with an empty Detect watches nothing")
	}
	if opts.Probe != nil {
		if set := opts.probeOptions(); len(set) > 0 {
			return nil, fmt.Errorf("new guard: %s configure the eBPF probe and have no effect with a custom Probe: configure that probe instead", strings.Join(set, ", "))
		}
	}
	ch := min(opts.BufferSize, eventsChanSize)
	return &Guard{
		opts:   opts,
		log:    opts.Logger.WithName("mapguard"),
		events: make(chan Event, ch),
		out:    newQueue(opts.BufferSize - ch),
	}, nil
}

// kinds is the set of kinds the built-in probe watches: DefaultKinds plus
// Detect, or Detect alone with DetectOnly.
// Start attaches the probes and begins delivering events. It returns once
// the probes are live and verified by a canary event, or an error with
// nothing left running. Every error wraps one of ErrNotSupported,
// ErrPermission, ErrResourceLimit, ErrLayoutMismatch, ErrBusy, ErrStarted,
// ErrClosed, or ctx's error (context.Canceled or
// context.DeadlineExceeded; Start checks ctx between its steps and returns
// promptly once it is done). A kind asked for that this build cannot watch
// (its runtime functions are there, but none has a shape the site finders
// can prove, as with -gcflags=all=-N -l for the read kinds) is refused with
// ErrNotSupported naming the kind, the function, the reason and the build,
// rather than left silently off.
//
// After a refusal (any error but ErrStarted and ErrClosed) the Guard is as
// New left it: Start may be called again, and begins afresh; the Events
// channel stays open and callbacks stay registered. Once Start has
// succeeded, watching stops when ctx is done or Close is called, and the
// Guard cannot be started again. Close during Start cancels it.
func (g *Guard) Start(ctx context.Context) error {
	g.mu.Lock()
	switch {
	case g.closed:
		g.mu.Unlock()
		return fmt.Errorf("start guard: %w", ErrClosed)
	case g.started || g.starting:
		g.mu.Unlock()
		return fmt.Errorf("start guard: %w", ErrStarted)
	}
	if err := ctx.Err(); err != nil {
		g.mu.Unlock()
		return fmt.Errorf("start guard: %w", err)
	}
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	g.starting, g.cancelStart, g.startDone = true, cancel, make(chan struct{})
	g.queue = newQueue(g.opts.BufferSize)
	g.deepQueue = newQueue(g.opts.BufferSize)
	g.done = make(chan struct{})
	g.delivering = true
	g.abandoned.Store(false)
	goid := make(chan uint64)
	go g.dispatch(g.queue, g.deepQueue, g.done, goid)
	g.dispGoid = <-goid
	p := g.newProbe()
	g.mu.Unlock()

	err := p.Start(sctx, g.sink)
	if err == nil {
		if err = p.Ignore(g.dispGoid); err != nil {
			p.Close()
			err = fmt.Errorf("ignore dispatcher: %w: %w", ErrNotSupported, err)
		}
	}

	g.mu.Lock()
	defer g.mu.Unlock()
	g.starting = false
	g.probe = p
	defer close(g.startDone)
	if err == nil && g.closed {
		// Close came while the probes were being attached.
		p.Close()
		err = ErrClosed
	}
	if err != nil {
		if g.closed && errors.Is(err, context.Canceled) && ctx.Err() == nil {
			err = ErrClosed // cancelled by Close, not by the caller
		}
		g.queue.close() // no more sink calls: the probe is torn down
		g.deepQueue.close()
		g.mu.Unlock() // the dispatcher takes g.mu on its way out
		<-g.done
		g.mu.Lock()
		g.log.V(4).Info("guard start refused", "error", err.Error())
		return fmt.Errorf("start guard: %w", err)
	}
	g.started = true
	g.stopCtx = context.AfterFunc(ctx, func() { g.Close() })
	g.log.V(4).Info("guard started")
	return nil
}

// sink runs on the probe's reader goroutine and must not block.
func (g *Guard) sink(pev *decode.Event) {
	ev := eventOf(pev)
	g.perKind[ev.Kind].Add(1)
	q := g.queue
	if decode.IsDeep(decode.Kind(ev.Kind)) {
		q = g.deepQueue
	}
	if !q.push(ev) {
		g.droppedQueue.Add(1)
		g.droppedKind[ev.Kind].Add(1)
	}
}

// dispatch delivers queued events to the Events channel and the callbacks,
// on a goroutine of its own that the probe ignores, the default kinds'
// queue first. It returns when both queues are closed and drained.
func (g *Guard) dispatch(queue, deep *queue, done chan<- struct{}, goid chan<- uint64) {
	defer close(done)
	defer func() {
		g.mu.Lock()
		g.delivering = false
		if g.closed {
			g.closeEventsLocked()
		}
		g.mu.Unlock()
	}()
	goid <- rt.GoID()
	// Once both queues have been empty for trimAfter, their rings go:
	// memory the host's collector would otherwise scan while nothing waits.
	// (At most once per trimAfter: a ring trimmed while events still
	// come is grown again once.)
	trim := time.NewTimer(time.Hour)
	trim.Stop()
	defer trim.Stop()
	armed := false
	for {
		ev, ok, done := queue.pop()
		if !ok {
			var deepDone bool
			ev, ok, deepDone = deep.pop()
			if !ok {
				if done && deepDone {
					queue.trim(0)
					deep.trim(0)
					return
				}
				if !armed && (queue.large() || deep.large()) {
					trim.Reset(trimAfter)
					armed = true
				}
				select {
				case <-queue.ready:
				case <-deep.ready:
				case <-trim.C:
					armed = false
					queue.trim(queueKeepSlots)
					deep.trim(queueKeepSlots)
				}
				continue
			}
		}
		if g.abandoned.Load() {
			continue // Close has returned: drain without delivering
		}
		g.mu.Lock()
		g.sendLocked(ev)
		g.mu.Unlock()
		if fns := g.callbacks.Load(); fns != nil {
			for _, fn := range *fns {
				if g.abandoned.Load() {
					break
				}
				g.call(fn, ev)
			}
		}
	}
}

// trimAfter is how long the dispatch queues stay empty before their
// rings are let go.
const trimAfter = time.Second

// eventsChanSize bounds the Events channel's own buffer; the rest of
// Options.BufferSize waits in Guard.out, taking memory only while it does.
const eventsChanSize = 32

// sendLocked puts ev on the Events channel, or behind the events already
// waiting for room there, and counts it as dropped if neither has room.
func (g *Guard) sendLocked(ev Event) {
	if g.eventsDone {
		return
	}
	if !g.eventsUsed || g.out.len() == 0 {
		select {
		case g.events <- ev:
			return
		default:
		}
	}
	if !g.eventsUsed {
		// Nobody has asked for the channel (a Guard used through OnEvent
		// only, or not yet): what its own buffer holds is kept for a
		// first call, no more.
		g.dropChannelLocked(ev.Kind)
		return
	}
	ok, start := g.out.pushFeed(ev)
	switch {
	case !ok:
		g.dropChannelLocked(ev.Kind)
	case start:
		g.feedStop, g.feedDone = make(chan struct{}), make(chan struct{})
		go g.feed(g.feedStop, g.feedDone)
	}
}

// feed moves the events waiting in g.out into the Events channel, in
// order, as the channel's reader makes room, until none waits or stop is
// closed. It never takes g.mu, and it runs no user code, so that
// closeEventsLocked can stop it and wait for it.
func (g *Guard) feed(stop <-chan struct{}, done chan<- struct{}) {
	defer close(done)
	for {
		ev, ok := g.out.peekFeed()
		if !ok {
			return
		}
		select {
		case g.events <- ev:
			g.out.remove()
		case <-stop:
			return
		}
	}
}

// dropChannelLocked counts an event the Events channel had no room for.
func (g *Guard) dropChannelLocked(k Kind) {
	if g.eventsUsed {
		g.droppedChannel.Add(1)
		g.droppedKind[k].Add(1)
	} else {
		g.earlyDropped[k]++
	}
}

// closeEventsLocked closes the Events channel once, after stopping the
// feeder: what it had not moved yet goes into the channel if there is
// room (a reader still gets it after the close), else counts as dropped.
func (g *Guard) closeEventsLocked() {
	if g.eventsDone {
		return
	}
	if g.feedStop != nil {
		close(g.feedStop)
		<-g.feedDone
		g.feedStop, g.feedDone = nil, nil
	}
	g.out.close()
	g.out.drain(func(ev Event) {
		select {
		case g.events <- ev:
		default:
			g.dropChannelLocked(ev.Kind)
		}
	})
	g.out.trim(0)
	close(g.events)
	g.eventsDone = true
}

func (g *Guard) call(fn func(Event), ev Event) {
	defer func() {
		if r := recover(); r != nil {
			g.callbackPanics.Add(1)
			g.log.Error(fmt.Errorf("%v", r), "OnEvent callback panicked", "kind", ev.Kind.String())
		}
	}()
	fn(ev)
}

// Events returns the channel events are sent on. Up to Options.BufferSize
// events wait for its reader (at most 32 in the channel's own buffer, the
// rest in a queue that takes memory only while they wait, moved into the
// channel as room is made); a send never blocks, and an event that does
// not fit is counted in Stats.DroppedChannel. It is closed when the Guard
// closes, with what waited in the queue moved in if it fits, else counted
// as dropped. It exists from New on, so that events delivered before the
// first call (a PreviousCrash right after Start, say) wait in it rather
// than being lost, as many as its own buffer holds (32, or BufferSize if
// less); those it had no room for before that call are counted as drops
// then (a Guard used only through OnEvent drops nothing).
func (g *Guard) Events() <-chan Event {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.eventsUsed {
		g.eventsUsed = true
		for k, n := range g.earlyDropped {
			if n > 0 {
				g.droppedChannel.Add(n)
				g.droppedKind[k].Add(n)
				g.earlyDropped[k] = 0
			}
		}
	}
	return g.events
}

// OnEvent registers fn to be called for every event, for circuit breakers
// and downgrade switches. Callbacks run one at a time, in registration
// order, on the Guard's dispatch goroutine (never on the goroutine that hit
// the probe), so a slow callback delays later events and may make them
// drop; a panicking one is recovered and counted. Map misuse inside a
// callback is not reported. Do not call Close from a callback and wait for
// it to return: Close from a callback does not wait for the dispatcher.
func (g *Guard) OnEvent(fn func(Event)) {
	if fn == nil {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	var fns []func(Event)
	if old := g.callbacks.Load(); old != nil {
		fns = append(fns, *old...)
	}
	fns = append(fns, fn)
	g.callbacks.Store(&fns)
}

// Stats returns a snapshot of the Guard's counters. It is safe to call at
// any time, also before Start and after Close; after a refused Start it
// describes that attempt (Inactive says which kinds had no site, and why).
// It never waits for the probes' attaches and detaches: while the probe's
// lock is held, the governor's figures (Budget, and each site's Armed,
// Rate, Cost, Watched and sampling) are those of its last account, at most
// about 100 ms old, and the counters are read from the kernel then. (Until
// Stats is first called nobody keeps that account fresh: a call that
// finds it older waits up to a millisecond for the lock, and reports it
// as it is if the lock stays held.)
func (g *Guard) Stats() Stats {
	g.mu.Lock()
	p := g.probe
	g.mu.Unlock()
	var ps probe.Stats
	if p != nil {
		ps = p.Stats()
	}
	st := Stats{
		Events:         make(map[Kind]uint64),
		DroppedKernel:  ps.Dropped,
		DroppedQueue:   g.droppedQueue.Load(),
		DroppedChannel: g.droppedChannel.Load(),
		CallbackPanics: g.callbackPanics.Load(),

		CrashRecord:      ps.CrashRecord,
		CrashRecordError: ps.CrashRecordError,

		CallSitesOverflow:   ps.CallSitesOverflow,
		CrashRecordsDamaged: ps.CrashRecordsDamaged,
	}
	for _, s := range ps.Sites {
		st.Sites = append(st.Sites, siteStatsOf(s))
	}
	for _, s := range ps.Inactive {
		st.Inactive = append(st.Inactive, inactiveOf(s))
	}
	for _, s := range ps.CallSites {
		st.CallSites = append(st.CallSites, callSiteStatsOf(s))
	}
	if ps.Budget != nil {
		b := budgetStatsOf(*ps.Budget)
		st.Budget = &b
	}
	st.DroppedByKind = make(map[Kind]uint64)
	for _, k := range Kinds() {
		if n := g.perKind[k].Load(); n > 0 {
			st.Events[k] = n
		}
		if n := g.droppedKind[k].Load(); n > 0 {
			st.DroppedByKind[k] = n
		}
	}
	for _, s := range st.Sites {
		if s.Dropped > 0 {
			st.DroppedByKind[s.Kind] += s.Dropped
		}
	}
	st.Dropped = st.DroppedKernel + st.DroppedQueue + st.DroppedChannel
	return st
}

// OpStats returns the map operations counted per call site and kind since
// Start (while the deep probes were attached), with Options.OpStats, or
// what a custom Probe that implements probe.OpStatser returns (the Fake
// does); nil otherwise.
func (g *Guard) OpStats() []OpStat {
	g.mu.Lock()
	p := g.probe
	g.mu.Unlock()
	if s, ok := p.(probe.OpStatser); ok {
		ops := s.OpStats()
		out := make([]OpStat, len(ops))
		for i, o := range ops {
			out[i] = opStatOf(o)
		}
		return out
	}
	return nil
}

// closeWait bounds how long Close waits for a callback that does not
// return.
const closeWait = time.Second

// Close detaches every probe and stops delivery. When it returns, no more
// events are sent, the Events channel is closed, and no callback runs,
// with two exceptions: Close called from a callback returns at once (the
// dispatcher finishes delivering what was queued before Close once that
// callback returns), and a callback still running one second after Close
// was called is left to finish on its own (it is logged; no callback is
// called after it). Close during Start cancels Start. Close is idempotent
// and returns nil on every call after the first.
func (g *Guard) Close() error {
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return nil
	}
	g.closed = true
	if g.starting {
		g.cancelStart()
		wait := g.startDone
		g.mu.Unlock()
		<-wait // Start sees closed and tears itself down
		g.mu.Lock()
	}
	started := g.started
	if g.stopCtx != nil {
		g.stopCtx()
	}
	p, queue, deepQueue, done := g.probe, g.queue, g.deepQueue, g.done
	g.mu.Unlock()

	var err error
	if started {
		err = p.Close() // no more sink calls after this
		queue.close()
		deepQueue.close()
		if rt.GoID() != g.dispGoid {
			select {
			case <-done:
			case <-time.After(closeWait):
				g.abandoned.Store(true)
				g.log.Error(nil, "an OnEvent callback has not returned; Close returns without it", "waited", closeWait)
			}
		}
	}
	g.mu.Lock()
	if !g.delivering || g.abandoned.Load() {
		g.closeEventsLocked()
	}
	g.mu.Unlock()
	g.log.V(4).Info("guard closed")
	if err != nil {
		return fmt.Errorf("close guard: %w", err)
	}
	return nil
}

// GoroutineFunctions names the functions at the top of the goroutines a
// started Guard runs, for leak checkers such as go.uber.org/goleak:
//
//	opts := []goleak.Option{}
//	for _, fn := range mapguard.GoroutineFunctions() {
//		opts = append(opts, goleak.IgnoreAnyFunction(fn))
//	}
//
// None of them is left once Close has returned.
func GoroutineFunctions() []string {
	return []string{
		"github.com/mapguard/mapguard.(*Guard).dispatch",
		"github.com/mapguard/mapguard.(*Guard).feed",
		"github.com/mapguard/mapguard/internal/uprobe.(*uprobes).run",
		"github.com/mapguard/mapguard/internal/uprobe.(*uprobes).runWaker",
		"github.com/mapguard/mapguard/internal/uprobe.(*uprobes).runDeep",
		// For about a second after Start (its calibration's links are
		// closed after Start's first second), and while the governor
		// attaches or detaches a sampled site's probe:
		"github.com/mapguard/mapguard/internal/uprobe.(*calibrating).run",
		"github.com/mapguard/mapguard/internal/uprobe.(*linkLane).holdEnded",
		"github.com/mapguard/mapguard/internal/uprobe.closeTimed",
		"github.com/mapguard/mapguard/internal/uprobe.(*uprobes).finishCalibration",
		"github.com/mapguard/mapguard/internal/uprobe.(*uprobes).detach",
		"github.com/mapguard/mapguard/internal/uprobe.(*uprobes).detachChain",
		"github.com/mapguard/mapguard/internal/uprobe.(*uprobes).attachAsync",
		// For up to a few seconds after Start (its search for the nested
		// reads in the program's code):
		"github.com/mapguard/mapguard/internal/uprobe.(*uprobes).scanNested",
	}
}
