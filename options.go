package mapguard

import (
	"slices"
	"time"

	"github.com/go-logr/logr"

	"github.com/mapguard/mapguard/decode"
	"github.com/mapguard/mapguard/internal/uprobe"
	"github.com/mapguard/mapguard/probe"
)

// DefaultKinds are the kinds always watched (unless Options.DetectOnly):
// those whose probes sit only on paths that run when something is wrong or
// rarely (a miss, a nil map, a large map growing or emptied, a panic, a
// fatal error). Among them MissingKeyRead and NilMapRead are statistics
// (Stats.CallSites) unless Options.Detect lists them. Deep kinds
// (MissingKeyDelete, NilMapDelete, SharedWriters) are not among them.
func DefaultKinds() []Kind { return kindsOf(uprobe.DefaultKinds()) }

func kindsOf(ks []decode.Kind) []Kind {
	out := make([]Kind, len(ks))
	for i, k := range ks {
		out[i] = Kind(k)
	}
	return out
}

func decodeKinds(ks []Kind) []decode.Kind {
	out := make([]decode.Kind, len(ks))
	for i, k := range ks {
		out[i] = decode.Kind(k)
	}
	return out
}

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
	// Stats, never waited for. The dispatch queue and the Events
	// channel's backlog take memory only while events wait in them.
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
	// Probe replaces the eBPF probe, e.g. with a Fake in tests. Nil
	// means real uprobes on this process. The options above that configure
	// the eBPF probe (all but Logger, BufferSize and OpStats) cannot be
	// honoured by another probe, so New rejects them together with Probe.
	Probe probe.Probe
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
		if decode.IsStatistic(decode.Kind(k)) && !slices.Contains(o.Detect, k) {
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
		Kinds:           decodeKinds(o.kinds()),
		Statistics:      decodeKinds(o.statistics()),
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
