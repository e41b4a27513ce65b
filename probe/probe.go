package probe

import (
	"context"
	"errors"
	"time"

	"github.com/mapguard/mapguard/decode"
)

// Errors returned by Start. Package mapguard re-exports them.
var (
	// ErrNotSupported: the OS, architecture, kernel or Go version cannot be
	// watched.
	ErrNotSupported = errors.New("not supported")
	// ErrPermission: the process lacks the capabilities to load BPF programs
	// or create uprobes (CAP_SYS_ADMIN, or CAP_BPF with CAP_PERFMON on
	// kernels that still accept them).
	ErrPermission = errors.New("missing privileges")
	// ErrLayoutMismatch: the runtime structures did not verify in this
	// process, or the canary event did not come back as expected.
	ErrLayoutMismatch = errors.New("runtime layout mismatch")
	// ErrClosed: the probe was closed.
	ErrClosed = errors.New("probe closed")
)

// Sink receives events. It is called from one goroutine at a time and must
// not block; ev is only valid during the call.
type Sink func(ev *decode.Event)

// Probe watches map operations and reports them to a Sink.
type Probe interface {
	// Start attaches and begins delivering events to sink. It returns once
	// the probe is live and verified, or an error with nothing left running.
	// A Probe is started at most once.
	Start(ctx context.Context, sink Sink) error
	// Ignore stops events from the goroutine with the given id, for the
	// caller's own goroutines.
	Ignore(goid uint64) error
	// Stats returns a snapshot of the probe's counters.
	Stats() Stats
	// Close detaches everything. It is idempotent.
	Close() error
}

// Stats is a snapshot of a probe's counters.
type Stats struct {
	// Sites lists every probe site that was chosen.
	Sites []SiteStats
	// Inactive lists the functions that were not probed, and why.
	Inactive []Inactive
	// Dropped counts records lost in the kernel because the ring buffer was
	// full.
	Dropped uint64
	// CrashRecord is where this process's crash record is pinned, "" if
	// there is none; CrashRecordError says why not, if it was wanted.
	CrashRecord      string
	CrashRecordError string
	// CrashRecordsDamaged counts crash records of earlier processes that
	// failed a check at Start (forged, corrupt): removed and not reported.
	CrashRecordsDamaged int
	// Deep describes deep watching; nil when it is off.
	Deep *DeepStats
}

// DeepStats describes deep watching and its cost.
type DeepStats struct {
	// HitCost is one hit of a deep probe, measured at Start on this machine
	// (a probe at an emulated instruction of a calibration function).
	HitCost time.Duration
	// Budget is the share of one CPU deep watching may cost.
	Budget float64
	// Watched is how long the deep probes were attached, of Elapsed since
	// Start; DutyCycle is their ratio.
	Watched, Elapsed time.Duration
	DutyCycle        float64
	// Hits counts deep probe hits. Governor is the time spent attaching and
	// detaching the deep probes, also charged to the budget. Overhead =
	// (Hits x HitCost + Governor) / Elapsed, the estimated share of one CPU
	// spent.
	Hits     uint64
	Governor time.Duration
	Overhead float64
	// Detaches counts how often the governor detached the deep probes to
	// stay within the budget; RearmAt is when they will be attached again
	// (zero while attached). Burst is the most CPU time they may spend at
	// once. The governor keeps Hits x HitCost + Governor at most Burst +
	// Budget x (time since Start), counted up to RearmAt while detached.
	Detaches int
	RearmAt  time.Time
	Burst    time.Duration
}

// SiteStats describes one probe site.
type SiteStats struct {
	Kind     decode.Kind // for a deep site, the first deep kind it serves (0: operation statistics only)
	Deep     bool        // a deep site, under the budget
	Function string      // runtime function, e.g. "runtime.mapassign_faststr"
	Offset   uint64      // from the function's entry
	Inst     string      // instruction at the site
	// Emulated sites cost about 1 us a hit on the project's test VMs;
	// single-stepped ones 6 to 23 us.
	Emulated bool
	Armed    bool   // attached now
	Hits     uint64 // traps taken
	Events   uint64 // records submitted
	Dropped  uint64 // records lost to a full ring buffer
	Filtered uint64 // hits that were not an anomaly (an empty, non-nil map)
	Ignored  uint64 // hits from ignored goroutines
	// Aggregated counts hits folded into a per-call-site count (reported
	// about once a second) rather than an event of their own.
	Aggregated uint64
	// OutOfScope counts events not reported because their call site is
	// outside UprobeConfig.MissingKeyScope.
	OutOfScope uint64
	// NotOwned counts events not reported because they are not the
	// program's: operations by the Go runtime on its own maps (e.g.
	// runtime.resolveTypeOff reads a nil map on every call, by design), and
	// nil-map reads in the standard library, which reads nil maps as empty
	// on purpose (net/http on every request).
	NotOwned uint64
	// Disarms counts how often the site was detached for exceeding its rate
	// limit; RearmAt is when a disarmed site will be attached again.
	Disarms int
	RearmAt time.Time
}

// OpStatser is implemented by probes that count operations per call site.
type OpStatser interface {
	OpStats() []OpStat
}

// Inactive is a function that has no probe, with the reason.
type Inactive struct {
	Kind     decode.Kind
	Function string
	Reason   string
}
