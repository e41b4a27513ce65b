package mapguard

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"

	"github.com/mapguard/mapguard/decode"
	"github.com/mapguard/mapguard/internal/rt"
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
	// value. This is how m[a][b] looks when m[a] is missing.
	NilMapRead = decode.NilMapRead
	// MapGrowth: a map crossed Options.GrowthThreshold entries, or doubled
	// again after that; Site is the insert that grew it and Len its entries.
	// Maps never shrink, so this is how an unbounded cache shows.
	MapGrowth = decode.MapGrowth
	// MissingKeyRead: a single-value read (v := m[k]) of a key that is not
	// in a non-nil map, which silently returns the zero value. Comma-ok
	// reads are not reported, nor reads outside Options.MissingKeyScope.
	// The first read at a call site is an event; later ones there arrive
	// about once a second as one event whose Count is the number since.
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
)

// Peer is the other goroutine of a SharedWriters or ConcurrentMisuse event.
type Peer = decode.Peer

// OpStat is the number of operations of one kind (read, write, delete,
// iterate) at one call site, from Options.OpStats.
type OpStat = probe.OpStat

// DeepStats describes deep watching and its measured cost.
type DeepStats = probe.DeepStats

// Event is one detected misuse: what, when, where (Site is the user's
// file:line), on which goroutine and on which map.
type Event = decode.Event

// Frame is one resolved stack frame.
type Frame = decode.Frame

// SiteStats describes one probe site: where it is, whether it is attached,
// and its counters.
type SiteStats = probe.SiteStats

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
	// ErrClosed: the Guard was closed.
	ErrClosed = probe.ErrClosed
)

// DefaultKinds are the kinds watched when Options.Detect is empty: those
// whose probes sit only on paths that run when something is wrong or rarely
// (a miss, a nil map, a large map growing or emptied, a panic, a fatal
// error). Deep kinds (MissingKeyDelete, NilMapDelete, SharedWriters) are
// not among them.
func DefaultKinds() []Kind { return probe.DefaultKinds() }

// Options configures a Guard. The zero value is valid.
type Options struct {
	// Logger receives errors, V(1) warnings, V(4) lifecycle messages and
	// V(8) one line per event. The zero Logger discards.
	Logger logr.Logger
	// Detect is the set of kinds to watch; empty means DefaultKinds.
	Detect []Kind
	// BufferSize is how many events may wait between the kernel and
	// delivery, at each of its stages (kernel ring buffer, dispatch queue,
	// Events channel). Default 1024. What does not fit is counted in
	// Stats, never waited for.
	BufferSize int
	// StackDepth is how many frames Event.Stack holds, starting at the call
	// site; 0 (the default) reports the call site only. At most 16.
	StackDepth int
	// GrowthThreshold is the entry count at which a growing map is first
	// reported as MapGrowth, and again at each doubling. Default 1<<20.
	GrowthThreshold int
	// SiteRateLimit is how many hits per second one probe site may take
	// before it is detached for a back-off (5 s, doubling up to 5 min); the
	// BPF program wakes the Guard as soon as a site passes it.
	// Default 200; sites on instructions the kernel emulates, which cost
	// several times less, may take 20 times as many. Either way one site
	// stays under about 0.5% of a CPU on the project's VMs (200 hits of at
	// most 23 us, or 4000 of about 1 us). Negative disables the limit. See
	// Stats.Sites.
	SiteRateLimit int
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
	// Budget is the share of one CPU that deep watching may cost, on
	// average (default 0.01, 1%). Start measures what one probe hit costs on
	// this machine; the Guard then detaches the deep probes whenever they
	// have spent their budget and attaches them again once it has been
	// earned back (a duty cycle). Stats().Deep shows the measured cost, the
	// duty cycle and the estimated overhead; events from deep probes say
	// Sampled once the duty cycle has started.
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
	// means real uprobes on this process.
	Probe probe.Probe
}

// Stats is a snapshot of a Guard's counters.
type Stats struct {
	// Events counts delivered-or-dropped events per kind, as they left the
	// kernel.
	Events map[Kind]uint64
	// Dropped is the sum of the three drop counters below.
	Dropped uint64
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
	// CrashRecordsDamaged counts crash records of earlier processes that
	// failed a check at Start (a forged or corrupt entry in the pinned map):
	// each was logged and removed, and none is reported as PreviousCrash.
	CrashRecordsDamaged int
	// Deep describes deep watching and its cost; nil when it is off.
	Deep *DeepStats
}

// A Guard watches this process's map operations. Create it with New, then
// Start it. Its methods are safe for concurrent use.
type Guard struct {
	opts  Options
	log   logr.Logger
	probe probe.Probe

	mu         sync.Mutex
	started    bool
	closed     bool
	delivering bool       // the dispatcher runs; it closes events when it exits
	events     chan Event // created by the first call to Events
	stopCtx    func() bool

	queue     chan Event // reader -> dispatcher
	done      chan struct{}
	dispGoid  uint64
	callbacks atomic.Pointer[[]func(Event)]

	perKind        [256]atomic.Uint64
	droppedQueue   atomic.Uint64
	droppedChannel atomic.Uint64
	callbackPanics atomic.Uint64
}

// New returns a Guard configured by opts. It attaches nothing until Start.
// It returns an error if opts is invalid.
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
	for _, k := range opts.Detect {
		if k == PreviousCrash {
			return nil, fmt.Errorf("new guard: %s is not watched itself: it comes with %s", k, ConcurrentMisuse)
		}
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
		if seen[k] {
			return nil, fmt.Errorf("new guard: kind %s listed twice", k)
		}
		seen[k] = true
	}
	log := opts.Logger.WithName("mapguard")
	p := opts.Probe
	if p == nil {
		p = probe.NewUprobes(probe.UprobeConfig{
			Kinds:           opts.Detect,
			StackDepth:      opts.StackDepth,
			BufferSize:      opts.BufferSize,
			SiteRateLimit:   opts.SiteRateLimit,
			GrowthThreshold: opts.GrowthThreshold,
			MissingKeyScope: opts.MissingKeyScope,
			NoCrashRecord:   opts.NoCrashRecord,
			OpStats:         opts.OpStats,
			Budget:          opts.Budget,
			SharedWindow:    opts.SharedWindow,
			SharedExclude:   opts.SharedExclude,
			CaptureKeys:     opts.CaptureKeys,
			Logger:          log,
		})
	}
	return &Guard{opts: opts, log: log, probe: p}, nil
}

// Start attaches the probes and begins delivering events. It returns once
// the probes are live and verified by a canary event, or an error wrapping
// ErrNotSupported, ErrPermission, ErrLayoutMismatch or ErrClosed with
// nothing left running. Watching stops when ctx is done or Close is called.
// A Guard is started at most once.
func (g *Guard) Start(ctx context.Context) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return fmt.Errorf("start guard: %w", ErrClosed)
	}
	if g.started {
		return errors.New("start guard: already started")
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("start guard: %w", err)
	}

	g.queue = make(chan Event, g.opts.BufferSize)
	g.done = make(chan struct{})
	g.delivering = true
	goid := make(chan uint64)
	go g.dispatch(goid)
	g.dispGoid = <-goid

	fail := func(err error) error {
		g.probe.Close()
		close(g.queue)
		g.mu.Unlock() // the dispatcher takes g.mu on its way out
		<-g.done
		g.mu.Lock()
		return fmt.Errorf("start guard: %w", err)
	}
	if err := g.probe.Start(ctx, g.sink); err != nil {
		return fail(err)
	}
	if err := g.probe.Ignore(g.dispGoid); err != nil {
		return fail(fmt.Errorf("ignore dispatcher: %w", err))
	}
	g.started = true
	g.stopCtx = context.AfterFunc(ctx, func() { g.Close() })
	g.log.V(4).Info("guard started")
	return nil
}

// sink runs on the probe's reader goroutine and must not block.
func (g *Guard) sink(ev *Event) {
	g.perKind[ev.Kind].Add(1)
	select {
	case g.queue <- *ev:
	default:
		g.droppedQueue.Add(1)
	}
}

// dispatch delivers queued events to the Events channel and the callbacks,
// on a goroutine of its own that the probe ignores.
func (g *Guard) dispatch(goid chan<- uint64) {
	defer close(g.done)
	defer func() {
		g.mu.Lock()
		g.delivering = false
		if g.events != nil {
			close(g.events)
		}
		g.mu.Unlock()
	}()
	goid <- rt.GoID()
	for ev := range g.queue {
		g.mu.Lock()
		ch := g.events
		g.mu.Unlock()
		if ch != nil {
			select {
			case ch <- ev:
			default:
				g.droppedChannel.Add(1)
			}
		}
		if fns := g.callbacks.Load(); fns != nil {
			for _, fn := range *fns {
				g.call(fn, ev)
			}
		}
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
			close(g.events)
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
// any time, also before Start and after Close.
func (g *Guard) Stats() Stats {
	ps := g.probe.Stats()
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

		CrashRecordsDamaged: ps.CrashRecordsDamaged,
		Deep:                ps.Deep,
	}
	for _, k := range decode.Kinds() {
		if n := g.perKind[k].Load(); n > 0 {
			st.Events[k] = n
		}
	}
	st.Dropped = st.DroppedKernel + st.DroppedQueue + st.DroppedChannel
	return st
}

// OpStats returns the map operations counted per call site and kind since
// Start (while the deep probes were attached), with Options.OpStats; nil
// otherwise.
func (g *Guard) OpStats() []OpStat {
	if s, ok := g.probe.(probe.OpStatser); ok {
		return s.OpStats()
	}
	return nil
}

// Close detaches every probe and stops delivery. When it returns, no more
// events are sent and no callback runs (unless Close was called from a
// callback). The Events channel is closed. Close is idempotent and returns
// nil on every call after the first.
func (g *Guard) Close() error {
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return nil
	}
	g.closed = true
	started := g.started
	if g.stopCtx != nil {
		g.stopCtx()
	}
	g.mu.Unlock()

	err := g.probe.Close() // no more sink calls after this
	if started {
		close(g.queue)
		if rt.GoID() != g.dispGoid {
			<-g.done
		}
	}
	if !started {
		g.mu.Lock()
		if g.events != nil {
			close(g.events)
		}
		g.mu.Unlock()
	}
	g.log.V(4).Info("guard closed")
	if err != nil {
		return fmt.Errorf("close guard: %w", err)
	}
	return nil
}
