package probe

import (
	"context"
	"errors"
	"fmt"
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
	// ErrResourceLimit: a resource limit (RLIMIT_NOFILE, RLIMIT_MEMLOCK)
	// stopped the probe from loading.
	ErrResourceLimit = errors.New("resource limit")
	// ErrBusy: the process was too busy for the probe's own goroutines to
	// run in time (the canary event was recorded but not read).
	ErrBusy = errors.New("process too busy")
	// ErrStarted: Start was called on a probe that is starting or running.
	ErrStarted = errors.New("already started")
	// ErrClosed: the probe was closed.
	ErrClosed = errors.New("closed")
)

// Sink receives events. It must not block, and must be safe to call from
// several goroutines at once (the eBPF probe delivers deep events from a
// reader of their own); ev is only valid during the call.
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
	// Budget describes the cost governor; nil before Start.
	Budget *BudgetStats
	// CallSites counts, per call site, the kinds that are idioms as often
	// as bugs (missing-key and nil-map reads), most counted first;
	// CallSitesOverflow the occurrences beyond the table's 4096 call sites.
	CallSites         []CallSiteStats
	CallSitesOverflow uint64
	// CrashRecordsDamaged counts crash records of earlier processes that
	// failed a check at Start (forged, corrupt): removed and not reported.
	CrashRecordsDamaged int
}

// BudgetStats describes the cost governor, which keeps every probe site
// within one CPU budget.
type BudgetStats struct {
	// Budget is the share of one CPU the probes may cost, on average.
	Budget float64
	// StepCost and EmulatedCost are what one trap costs with an empty BPF
	// program, at an instruction the kernel single-steps and at one it
	// emulates, as last measured on this machine (in Start, then every
	// minute); Calibrations counts the measurements.
	// LinkCost is the CPU time of attaching and detaching one probe link,
	// the whole process's (the attaching thread's, and what the cycle
	// costs the others). While Calibrations is 0 (not calibrated yet: the
	// first calibration failed), the costs are assumed high, 50 us for
	// every trap, so that the budget is not under-counted meanwhile.
	StepCost, EmulatedCost, LinkCost time.Duration
	Calibrations                     int
	// Sampler reports whether the trap sampler can run here: while the
	// traps are at least a tenth of the budget, a BPF program on the CPU's
	// timer interrupt samples the process's threads (its samples cost at
	// most a tenth of the budget), for a while (a fifth of the time at
	// most), and the samples that find one in a probe's trap measure what
	// the traps cost in place. TrapScale
	// is that cost over the calibrated one (1 until measured, never less:
	// the calibration is a floor); the governor books StepCost and
	// EmulatedCost times TrapScale, and the samples' own cost as the
	// Guard's work. A trap whose own samples are enough has a scale of its
	// own (SiteStats.TrapScale): TrapScale is the others'. TrapSamples
	// counts the samples found in a trap.
	Sampler     bool
	TrapScale   float64
	TrapSamples uint64
	// Spent is the CPU time the probes cost since Start, as accounted:
	// each hit at its site's cost (SiteStats.Cost), plus attaching,
	// detaching, recalibrating and the Guard's own goroutines (reading,
	// decoding and delivering events, running the governor; measured on
	// their threads). Start's first calibration and Stats calls are not
	// in it. Overhead is Spent / Elapsed.
	Spent, Elapsed time.Duration
	Overhead       float64
	// Traps is the part of Spent that the probes' hits cost; the rest is
	// the Guard's own work (links, recalibrations, its goroutines).
	Traps time.Duration
	// WorstSecond is the most of Spent in one second since Start (a window
	// of a second or a little more, between two of the governor's runs):
	// what the budget's "every second" is checked against.
	WorstSecond time.Duration
	// Sampled counts the sites being sampled now.
	Sampled int
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
	// Cost is what one hit of the site costs, as measured: the trap at its
	// instruction (BudgetStats.StepCost or EmulatedCost, times TrapScale)
	// plus the BPF program's run time there. TrapScale is the trap's own
	// scale once the trap sampler measured it, else BudgetStats.TrapScale.
	// Rate is its hits per second while attached.
	Cost      time.Duration
	TrapScale float64
	Rate      float64
	// Sampled: the site costs more than the budget allows, so it is
	// attached for Window once every Period, and its counts are estimates
	// (scaled by the time attached). Watched is how long it was attached
	// since Start.
	Sampled        bool
	Window, Period time.Duration
	Watched        time.Duration
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

// CallSiteStats counts the occurrences of one kind at one call site: how
// idioms (a read of a missing key where the zero value means absent, a read
// of a nil map) are reported by default, as statistics rather than events.
type CallSiteStats struct {
	Kind decode.Kind
	// Site is the user's frame that did the map operation; MapType the
	// map's type as the first occurrence read it.
	Site    decode.Frame
	MapType string
	// CommaOK: the reads are comma-ok reads (v, ok := m[k]), which say
	// themselves whether the key was there.
	CommaOK bool
	// Count is the occurrences since Start. Estimated: some were counted
	// while the site was sampled (see SiteStats.Sampled), and scaled.
	Count     uint64
	Estimated bool
	// First and Last are when the first occurrence happened and when the
	// count last grew (to the aggregation interval, about a second).
	First, Last time.Time
}

// Op is a kind of map operation, for operation statistics.
type Op uint8

const (
	OpRead Op = iota + 1
	OpWrite
	OpDelete
	OpIterate
)

func (o Op) String() string {
	switch o {
	case OpRead:
		return "read"
	case OpWrite:
		return "write"
	case OpDelete:
		return "delete"
	case OpIterate:
		return "iterate"
	}
	return "op(" + fmt.Sprint(uint8(o)) + ")"
}

// OpStat is the number of operations of one kind at one call site.
type OpStat struct {
	Op      Op
	Site    decode.Frame
	MapType string
	Count   uint64
}
