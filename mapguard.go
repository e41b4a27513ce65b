package mapguard

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"

	"github.com/mapguard/mapguard/decode"
	"github.com/mapguard/mapguard/internal/rt"
	"github.com/mapguard/mapguard/internal/uprobe"
	"github.com/mapguard/mapguard/probe"
)

// Kind is what an event reports; String gives its stable name.
type Kind = decode.Kind

// The kinds of map misuse mapguard reports.
const (
	// NilMapWrite: an assignment to a nil map. The runtime panics right
	// after; the panic may be recovered (net/http does so per request), and
	// the event arrives either way.
	NilMapWrite = decode.NilMapWrite
	// NilMapRead: a read from a nil map, which silently returns the zero
	// value. Often an idiom (a nil map reads as empty), so by default it is
	// a statistic (Stats.CallSites), not an event; listed in
	// Options.Detect, the first plain read at a call site is an event and
	// later ones arrive about once a second as one event whose Count is
	// the number since. A comma-ok read (v, ok := m[k]) of a nil map is
	// never an event.
	NilMapRead = decode.NilMapRead
	// MapGrowth: a map crossed Options.GrowthThreshold entries, or doubled
	// again after that; Site is the insert that grew it and Len its entries.
	// Maps never shrink, so this is how an unbounded cache shows.
	MapGrowth = decode.MapGrowth
	// MissingKeyRead: a single-value read (v := m[k]) of a key that is not
	// in a non-nil map, which silently returns the zero value. Usually an
	// idiom (zero means absent), so by default it is a statistic
	// (Stats.CallSites), not an event; listed in Options.Detect, the first
	// read at a call site is an event and later ones there arrive about
	// once a second as one event whose Count is the number since. Comma-ok
	// reads are not counted, nor reads outside Options.MissingKeyScope.
	MissingKeyRead = decode.MissingKeyRead
	// UnhashableKey: the "hash of unhashable type" panic, an interface key
	// holding a slice, map or func. Detail is the runtime's message.
	UnhashableKey = decode.UnhashableKey
	// MapBloat: a map of at least GrowthThreshold slots was emptied (its
	// last entry deleted, or clear(m)) and keeps its memory, since maps
	// never shrink. Capacity and Bytes say what it holds; copy the live
	// entries into a new map, or drop it, to give the memory back.
	MapBloat = decode.MapBloat
	// ConcurrentMisuse: the runtime's fatal "concurrent map writes" (or read
	// and write, iteration and write, clone and write). The process dies
	// right after, so this event is rarely delivered live; a crash record
	// keeps it, and the next Start reports it as PreviousCrash.
	ConcurrentMisuse = decode.ConcurrentMisuse
	// PreviousCrash: a ConcurrentMisuse that killed an earlier process of
	// this program (PID), delivered once by the next Guard to start.
	PreviousCrash = decode.PreviousCrash

	// Deep kinds probe every operation of a kind, so they are opt-in (list
	// them in Options.Detect) and kept within Options.Budget.

	// MissingKeyDelete: delete(m, k) of a key that is not there; the delete
	// did nothing. A delete of a present key is never reported.
	MissingKeyDelete = decode.MissingKeyDelete
	// NilMapDelete: delete on a nil map, a silent no-op.
	NilMapDelete = decode.NilMapDelete
	// SharedWriters: one map written by two goroutines within
	// Options.SharedWindow; Peer is the first. The precursor of "concurrent
	// map writes" — or a map correctly guarded by a mutex, which is a false
	// positive: list its type or site in Options.SharedExclude.
	SharedWriters = decode.SharedWriters

	// NestedMapMiss: m[a][b] where m[a] was missing (or m nil), so the
	// inner read is of a nil map: the silent zero value of a two-level
	// lookup, a classic bug (the code meant to create m[a] first, or to
	// check it). Site is the expression, MapType the inner map's type, Peer
	// the outer read. A default kind, with no probe of its own: the
	// kernel pairs a goroutine's miss with its nil-map read a few
	// instructions later, and the Guard checks that the outer map's
	// elements are maps of the inner type. The first occurrence at a call
	// site is an event; later ones arrive about once a second as one event
	// whose Count is the number since.
	NestedMapMiss = decode.NestedMapMiss
)

// Peer is the other goroutine of a SharedWriters or ConcurrentMisuse event.
type Peer = decode.Peer

// OpStat is the number of operations of one kind (read, write, delete,
// iterate) at one call site, from Options.OpStats.
type OpStat = probe.OpStat

// BudgetStats describes the cost governor that keeps every probe within
// Options.Budget, with the costs it measured on this machine.
type BudgetStats = probe.BudgetStats

// Event is one detected misuse: what, when, where (Site is the user's
// file:line), on which goroutine and on which map.
type Event = decode.Event

// Frame is one resolved stack frame.
type Frame = decode.Frame

// SiteStats describes one probe site: where it is, whether it is attached,
// and its counters.
type SiteStats = probe.SiteStats

// CallSiteStats counts one idiom kind (a missing-key read, a nil-map read)
// at one call site: these are statistics by default, not events.
type CallSiteStats = probe.CallSiteStats

// Inactive is a runtime function that has no probe, with the reason.
type Inactive = probe.Inactive

// Errors returned by Start. Test for them with errors.Is.
var (
	// ErrNotSupported: the OS, architecture, kernel or Go version cannot be
	// watched (mapguard needs Linux on amd64, kernel 5.15 or later, and Go
	// 1.25 or 1.26).
	ErrNotSupported = probe.ErrNotSupported
	// ErrPermission: the process lacks CAP_SYS_ADMIN (or CAP_BPF with
	// CAP_PERFMON, on kernels that accept them for uprobes).
	ErrPermission = probe.ErrPermission
	// ErrLayoutMismatch: the runtime layouts mapguard reads did not verify
	// in this process, so it refused to attach.
	ErrLayoutMismatch = probe.ErrLayoutMismatch
	// ErrResourceLimit: a resource limit of the process stopped the probes
	// from loading, most often RLIMIT_NOFILE (each probe site, BPF map and
	// program holds a file descriptor) or RLIMIT_MEMLOCK on kernels before
	// 5.11. The message names the limit; raise it and call Start again.
	ErrResourceLimit = probe.ErrResourceLimit
	// ErrBusy: the process was too busy (many runnable goroutines) for the
	// Guard's own goroutines to run within seconds, so its canary event
	// was recorded but not read; the layout is fine. Start may be retried.
	ErrBusy = probe.ErrBusy
	// ErrStarted: Start was called while the Guard was starting or running.
	ErrStarted = probe.ErrStarted
	// ErrClosed: the Guard was closed.
	ErrClosed = probe.ErrClosed
)

// DefaultKinds are the kinds always watched (unless Options.DetectOnly):
// those whose probes sit only on paths that run when something is wrong or
// rarely (a miss, a nil map, a large map growing or emptied, a panic, a
// fatal error). Among them MissingKeyRead and NilMapRead are statistics
// (Stats.CallSites) unless Options.Detect lists them. Deep kinds
// (MissingKeyDelete, NilMapDelete, SharedWriters) are not among them.
func DefaultKinds() []Kind { return uprobe.DefaultKinds() }

// Options configures a Guard. The zero value is valid.
type Options struct {
	// Logger receives errors, V(1) warnings, V(4) lifecycle messages and
	// V(8) one line per event. The zero Logger discards.
	Logger logr.Logger
	// Detect lists kinds to watch in addition to DefaultKinds, e.g. the
	// deep kinds. With DetectOnly, it is the exact set watched.
	Detect []Kind
	// DetectOnly makes Detect the exact set of kinds watched, without the
	// defaults.
	DetectOnly bool
	// BufferSize is how many events may wait between the kernel and
	// delivery, at each of its stages (kernel ring buffer, dispatch queue,
	// Events channel). Default 1024. What does not fit is counted in
	// Stats, never waited for.
	BufferSize int
	// StackDepth is how many frames Event.Stack holds, starting at the call
	// site; 0 (the default) reports the call site only. At most 16.
	StackDepth int
	// GrowthThreshold is the entry count at which a growing map is first
	// reported as MapGrowth, and again at each doubling; it is also the
	// capacity (in slots) from which an emptied map is reported as
	// MapBloat. Default 1<<20.
	GrowthThreshold int
	// MissingKeyScope lists the packages (import path prefixes, e.g.
	// "example.com/svc/internal") whose missing-key reads are reported.
	// Empty means the main module's packages: libraries read missing keys
	// on purpose, and the standard library is never reported.
	MissingKeyScope []string
	// NoCrashRecord turns off the crash record (a small BPF map pinned under
	// /sys/fs/bpf/mapguard) that carries a fatal ConcurrentMisuse over to
	// the next Start of the program as PreviousCrash. Without the
	// privileges to keep it (see the README), Start logs that once at V(0)
	// and runs on without it.
	NoCrashRecord bool
	// OpStats counts map operations per call site and kind, for the "which
	// code hammers which map" question; read them with Guard.OpStats. Deep
	// watching, like the deep kinds.
	OpStats bool
	// Budget is the share of one CPU that all of mapguard's probes may
	// cost, on average (default 0.01, 1%). Start measures what a trap costs
	// on this machine, at the two kinds of instruction a probe sits on,
	// and the kernel measures what the BPF program adds at each site; a
	// governor books every hit at its site's cost. Under budget every
	// occurrence is counted. When the budget is spent (a storm of misses,
	// a hot path under deep watching), the costliest sites are sampled:
	// attached for a short window each second (less often only if even
	// that would break the budget), with counts scaled by the time
	// attached and events marked Sampled. Stats().Budget and
	// Stats().Sites show the costs, the rates and what is sampled.
	Budget float64
	// SharedWindow is how close two writes of one map by different
	// goroutines must be to report SharedWriters (default 100 ms).
	SharedWindow time.Duration
	// SharedExclude drops SharedWriters events whose map type equals an
	// entry (e.g. "map[string]int") or whose site's function starts with one
	// (e.g. "example.com/svc/cache."), for maps guarded by a mutex.
	SharedExclude []string
	// CaptureKeys, if set, is the redaction function that sees the first 16
	// bytes of the key of a delete event inside the process; its result is
	// Event.Key. Nil (the default) keeps key bytes in the kernel: delete
	// events carry a salted hash of the key and its length only.
	CaptureKeys func(prefix []byte) string
	// Probe replaces the eBPF probe, e.g. with a probe.Fake in tests. Nil
	// means real uprobes on this process. The options above that configure
	// the eBPF probe (all but Logger, BufferSize and OpStats) cannot be
	// honoured by another probe, so New rejects them together with Probe.
	Probe probe.Probe
}

// Stats is a snapshot of a Guard's counters.
type Stats struct {
	// Events counts delivered-or-dropped events per kind, as they left the
	// kernel.
	Events map[Kind]uint64
	// Dropped is the sum of the three drop counters below, and
	// DroppedByKind the same drops per kind (a kernel drop counts for the
	// kind of its probe site). Deep kinds have a kernel ring buffer of
	// their own, so a flood of them never drops a default kind's event.
	Dropped       uint64
	DroppedByKind map[Kind]uint64
	// DroppedKernel counts events lost because the kernel ring buffer was
	// full.
	DroppedKernel uint64
	// DroppedQueue counts events lost because the dispatch queue was full
	// (callbacks too slow).
	DroppedQueue uint64
	// DroppedChannel counts events not sent on Events because its buffer
	// was full.
	DroppedChannel uint64
	// CallbackPanics counts OnEvent callbacks that panicked (and were
	// recovered).
	CallbackPanics uint64
	// Sites lists the probe sites, attached or not, with their hit counts.
	Sites []SiteStats
	// Inactive lists the runtime functions that were not probed, and why.
	Inactive []Inactive
	// CrashRecord is where this process's crash record is pinned ("" if
	// none); CrashRecordError says why there is none when one was wanted.
	CrashRecord      string
	CrashRecordError string
	// Budget describes the cost governor and what it measured; nil before
	// Start.
	Budget *BudgetStats
	// CallSites counts missing-key and nil-map reads per call site, most
	// counted first: by default these idioms are statistics, not events
	// (list the kind in Options.Detect for events). CallSitesOverflow
	// counts occurrences beyond the table's 4096 call sites.
	CallSites         []CallSiteStats
	CallSitesOverflow uint64
	// CrashRecordsDamaged counts crash records of earlier processes that
	// failed a check at Start (a forged or corrupt entry in the pinned map):
	// each was logged and removed, and none is reported as PreviousCrash.
	CrashRecordsDamaged int
}

// A Guard watches this process's map operations. Create it with New, then
// Start it. Its methods are safe for concurrent use.
//
// The Guard runs two kinds of goroutine of its own while started: its
// dispatcher ((*Guard).dispatch) and the probe's reader and governor
// (functions of package github.com/mapguard/mapguard/probe). Test suites
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
	events      chan Event // created by the first call to Events
	eventsDone  bool       // events is closed
	stopCtx     func() bool

	queue     chan Event // reader -> dispatcher
	deepQueue chan Event // the same for deep kinds, so that they cannot crowd out the others
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

// probeOptions are the options that configure the eBPF probe; a custom
// Options.Probe cannot honour them, so New rejects them with one.
func (o *Options) probeOptions() []string {
	var set []string
	add := func(name string, isSet bool) {
		if isSet {
			set = append(set, name)
		}
	}
	add("Detect", len(o.Detect) > 0)
	add("DetectOnly", o.DetectOnly)
	add("StackDepth", o.StackDepth != 0)
	add("GrowthThreshold", o.GrowthThreshold != 0)
	add("MissingKeyScope", len(o.MissingKeyScope) > 0)
	add("NoCrashRecord", o.NoCrashRecord)
	add("Budget", o.Budget != 0)
	add("SharedWindow", o.SharedWindow != 0)
	add("SharedExclude", len(o.SharedExclude) > 0)
	add("CaptureKeys", o.CaptureKeys != nil)
	return set
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
	return &Guard{opts: opts, log: opts.Logger.WithName("mapguard")}, nil
}

// kinds is the set of kinds the built-in probe watches: DefaultKinds plus
// Detect, or Detect alone with DetectOnly.
func (o *Options) kinds() []Kind {
	if o.DetectOnly {
		return o.Detect
	}
	kinds := DefaultKinds()
	for _, k := range o.Detect {
		if !slices.Contains(kinds, k) {
			kinds = append(kinds, k)
		}
	}
	return kinds
}

// statistics are the watched kinds counted per call site without events:
// the idioms among the defaults, unless Detect lists them.
func (o *Options) statistics() []Kind {
	var stats []Kind
	for _, k := range o.kinds() {
		if decode.IsStatistic(k) && !slices.Contains(o.Detect, k) {
			stats = append(stats, k)
		}
	}
	return stats
}

// newProbe returns the probe for one Start attempt: Options.Probe, or a new
// eBPF probe (a refused attempt leaves nothing behind, so a later attempt
// starts afresh).
func (g *Guard) newProbe() probe.Probe {
	if g.opts.Probe != nil {
		return g.opts.Probe
	}
	o := &g.opts
	return uprobe.New(uprobe.Config{
		Kinds:           o.kinds(),
		Statistics:      o.statistics(),
		StackDepth:      o.StackDepth,
		BufferSize:      o.BufferSize,
		GrowthThreshold: o.GrowthThreshold,
		MissingKeyScope: o.MissingKeyScope,
		NoCrashRecord:   o.NoCrashRecord,
		OpStats:         o.OpStats,
		Budget:          o.Budget,
		SharedWindow:    o.SharedWindow,
		SharedExclude:   o.SharedExclude,
		CaptureKeys:     o.CaptureKeys,
		Logger:          g.log,
	})
}

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
	g.queue = make(chan Event, g.opts.BufferSize)
	g.deepQueue = make(chan Event, g.opts.BufferSize)
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
		close(g.queue) // no more sink calls: the probe is torn down
		close(g.deepQueue)
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
func (g *Guard) sink(ev *Event) {
	g.perKind[ev.Kind].Add(1)
	q := g.queue
	if decode.IsDeep(ev.Kind) {
		q = g.deepQueue
	}
	select {
	case q <- *ev:
	default:
		g.droppedQueue.Add(1)
		g.droppedKind[ev.Kind].Add(1)
	}
}

// dispatch delivers queued events to the Events channel and the callbacks,
// on a goroutine of its own that the probe ignores, the default kinds'
// queue first. It returns when both queues are closed and drained.
func (g *Guard) dispatch(queue, deep <-chan Event, done chan<- struct{}, goid chan<- uint64) {
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
	for queue != nil || deep != nil {
		var (
			ev Event
			ok bool
		)
		select {
		case ev, ok = <-queue:
			if !ok {
				queue = nil
				continue
			}
		default:
			select {
			case ev, ok = <-queue:
				if !ok {
					queue = nil
					continue
				}
			case ev, ok = <-deep:
				if !ok {
					deep = nil
					continue
				}
			}
		}
		if g.abandoned.Load() {
			continue // Close has returned: drain without delivering
		}
		g.mu.Lock()
		if g.events != nil && !g.eventsDone {
			select {
			case g.events <- ev:
			default:
				g.droppedChannel.Add(1)
				g.droppedKind[ev.Kind].Add(1)
			}
		}
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

// closeEventsLocked closes the Events channel once.
func (g *Guard) closeEventsLocked() {
	if g.events != nil && !g.eventsDone {
		close(g.events)
		g.eventsDone = true
	}
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

// Events returns the channel events are sent on. The channel is created on
// the first call and holds Options.BufferSize events; a send never blocks,
// and an event that does not fit is counted in Stats.DroppedChannel. It is
// closed when the Guard closes. Events that arrived before the first call
// are not sent.
func (g *Guard) Events() <-chan Event {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.events == nil {
		g.events = make(chan Event, g.opts.BufferSize)
		if g.closed && !g.delivering {
			g.closeEventsLocked()
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
		Sites:          ps.Sites,
		Inactive:       ps.Inactive,

		CrashRecord:      ps.CrashRecord,
		CrashRecordError: ps.CrashRecordError,
		Budget:           ps.Budget,
		CallSites:        ps.CallSites,

		CallSitesOverflow:   ps.CallSitesOverflow,
		CrashRecordsDamaged: ps.CrashRecordsDamaged,
	}
	st.DroppedByKind = make(map[Kind]uint64)
	for _, k := range decode.Kinds() {
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
		return s.OpStats()
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
		close(queue)
		close(deepQueue)
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
		"github.com/mapguard/mapguard/probe.(*uprobes).run",
		"github.com/mapguard/mapguard/probe.(*uprobes).runWaker",
		"github.com/mapguard/mapguard/probe.(*uprobes).runDeep",
	}
}
