package mapguard

import (
	"context"
	"sync"

	"github.com/mapguard/mapguard/decode"
	"github.com/mapguard/mapguard/probe"
)

// Fake is a probe.Probe for unit tests of code that uses a Guard: set it as
// Options.Probe, and Emit delivers an event exactly as the kernel path
// would (through the Guard's queue to Events and the OnEvent callbacks).
// Nothing is attached; it needs no privileges and works on every OS. The
// zero value is ready to use.
type Fake struct {
	mu      sync.Mutex
	sink    probe.Sink
	closed  bool
	started bool
	ignored map[uint64]bool
	dropped uint64
	scratch decode.Event // the event handed to the sink; reused, so Emit does not allocate
	ops     []probe.OpStat
}

// NewFake returns a Fake.
func NewFake() *Fake { return new(Fake) }

// Start implements probe.Probe.
func (f *Fake) Start(ctx context.Context, sink probe.Sink) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return probe.ErrClosed
	}
	f.sink, f.started = sink, true
	return nil
}

// Emit delivers ev to the sink, on the calling goroutine, as if a probe had
// fired. Before Start or after Close the event is counted as dropped and
// Emit reports false. ev.Goroutine is not checked against Ignore: events a
// test makes up carry made-up goroutine ids.
func (f *Fake) Emit(ev Event) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.started || f.closed {
		f.dropped++
		return false
	}
	if ev.Count == 0 {
		ev.Count = 1
	}
	f.scratch = ev.toDecode()
	f.sink(&f.scratch)
	return true
}

// Ignore implements probe.Probe. The fake only records the ids; see Ignored.
func (f *Fake) Ignore(goid uint64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.ignored == nil {
		f.ignored = make(map[uint64]bool)
	}
	f.ignored[goid] = true
	return nil
}

// Ignored reports whether Ignore was called with goid: the Guard ignores its
// own dispatcher goroutine.
func (f *Fake) Ignored(goid uint64) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.ignored[goid]
}

// Stats implements probe.Probe. The fake has no sites; Dropped counts events
// Emit could not deliver.
func (f *Fake) Stats() probe.Stats {
	f.mu.Lock()
	defer f.mu.Unlock()
	return probe.Stats{Dropped: f.dropped}
}

// SetOpStats sets what OpStats returns, for tests of code that reads
// operation statistics.
func (f *Fake) SetOpStats(ops []OpStat) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.ops = f.ops[:0]
	for _, o := range ops {
		f.ops = append(f.ops, probe.OpStat{Op: probe.Op(o.Op), Site: decode.Frame(o.Site), MapType: o.MapType, Count: o.Count})
	}
}

// OpStats implements probe.OpStatser: what SetOpStats set.
func (f *Fake) OpStats() []probe.OpStat {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]probe.OpStat(nil), f.ops...)
}

// Close implements probe.Probe.
func (f *Fake) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
	return nil
}
