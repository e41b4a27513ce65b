package mapguard

import (
	"time"

	"github.com/mapguard/mapguard/probe"
)

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

// SiteStats describes one probe site: where it is, whether it is attached,
// and its counters.
type SiteStats struct {
	Kind     Kind   // for a deep site, the first deep kind it serves (0: operation statistics only)
	Deep     bool   // a deep site, under the budget
	Function string // runtime function, e.g. "runtime.mapassign_faststr"
	Offset   uint64 // from the function's entry
	Inst     string // instruction at the site
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
	// outside Options.MissingKeyScope.
	OutOfScope uint64
	// NotOwned counts events not reported because they are not the
	// program's: operations by the Go runtime on its own maps (e.g.
	// runtime.resolveTypeOff reads a nil map on every call, by design), and
	// nil-map reads in the standard library, which reads nil maps as empty
	// on purpose (net/http on every request).
	NotOwned uint64
	// Cost is what one hit of the site costs, as measured: the trap at its
	// instruction (BudgetStats.StepCost or EmulatedCost, times TrapScale)
	// plus the BPF program's run time there. TrapScale is what the trap
	// sampler measured this trap to cost over its calibration, once its
	// own samples were enough, else BudgetStats.TrapScale. Rate is its
	// hits per second while attached.
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

// BudgetStats describes the cost governor that keeps every probe within
// Options.Budget, with the costs it measured on this machine.
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
	// Sampler reports whether the trap sampler can run here. While the
	// traps are at least a tenth of the budget, a BPF program on the CPU's
	// timer interrupt (the scheduler's tick, which comes anyway) samples
	// the process's threads, until it has an estimate, then a fifth of
	// the time at most (its samples cost at most a tenth of each second's
	// budget: then it pauses until the next second); the samples that find a
	// thread in a probe's trap measure what the traps cost in place,
	// against the calibration on a function of the Guard's own. TrapScale
	// is that ratio (1 until measured, never less: the calibration is a
	// floor), and the governor books StepCost and EmulatedCost times
	// TrapScale. A trap whose own samples are enough is booked at a scale
	// of its own (SiteStats.TrapScale): the cost in place differs by site
	// (a rare hit in a program that trashes its caches between hits costs
	// several times a hot one's), and TrapScale is the other traps'.
	// What the samples cost (about 3 us each on a VM) is booked
	// as the Guard's own work. TrapSamples counts the samples found in a
	// trap. Without the sampler (its tracepoint not allowed), the
	// calibrated costs stand.
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
	// of a second or a little more, between two of the governor's runs),
	// the first second included: what Budget is meant to hold in every
	// second, not only on average. The first second under load can exceed
	// it (README: the budget).
	WorstSecond time.Duration
	// Sampled counts the sites being sampled now.
	Sampled int
}

// CallSiteStats counts one idiom kind (a missing-key read, a nil-map read)
// at one call site: these are statistics by default, not events.
type CallSiteStats struct {
	Kind Kind
	// Site is the user's frame that did the map operation; MapType the
	// map's type as the first occurrence read it.
	Site    Frame
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

// Inactive is a runtime function that has no probe, with the reason.
type Inactive struct {
	Kind     Kind
	Function string
	Reason   string
}

// OpStat is the number of operations of one kind (read, write, delete,
// iterate) at one call site, from Options.OpStats.
type OpStat struct {
	Op      Op
	Site    Frame
	MapType string
	Count   uint64
}

// Op is a kind of map operation, in OpStat.
type Op uint8

// The operations OpStat counts.
const (
	OpRead    = Op(probe.OpRead)
	OpWrite   = Op(probe.OpWrite)
	OpDelete  = Op(probe.OpDelete)
	OpIterate = Op(probe.OpIterate)
)

// String returns "read", "write", "delete" or "iterate".
func (o Op) String() string { return probe.Op(o).String() }

func siteStatsOf(s probe.SiteStats) SiteStats {
	return SiteStats{
		Kind:       Kind(s.Kind),
		Deep:       s.Deep,
		Function:   s.Function,
		Offset:     s.Offset,
		Inst:       s.Inst,
		Emulated:   s.Emulated,
		Armed:      s.Armed,
		Hits:       s.Hits,
		Events:     s.Events,
		Dropped:    s.Dropped,
		Filtered:   s.Filtered,
		Ignored:    s.Ignored,
		Aggregated: s.Aggregated,
		OutOfScope: s.OutOfScope,
		NotOwned:   s.NotOwned,
		Cost:       s.Cost,
		TrapScale:  s.TrapScale,
		Rate:       s.Rate,
		Sampled:    s.Sampled,
		Window:     s.Window,
		Period:     s.Period,
		Watched:    s.Watched,
	}
}

func budgetStatsOf(s probe.BudgetStats) BudgetStats {
	return BudgetStats{
		Budget:       s.Budget,
		StepCost:     s.StepCost,
		EmulatedCost: s.EmulatedCost,
		LinkCost:     s.LinkCost,
		Calibrations: s.Calibrations,
		Sampler:      s.Sampler,
		TrapScale:    s.TrapScale,
		TrapSamples:  s.TrapSamples,
		Spent:        s.Spent,
		Elapsed:      s.Elapsed,
		Overhead:     s.Overhead,
		Traps:        s.Traps,
		WorstSecond:  s.WorstSecond,
		Sampled:      s.Sampled,
	}
}

func callSiteStatsOf(s probe.CallSiteStats) CallSiteStats {
	return CallSiteStats{
		Kind:      Kind(s.Kind),
		Site:      Frame(s.Site),
		MapType:   s.MapType,
		CommaOK:   s.CommaOK,
		Count:     s.Count,
		Estimated: s.Estimated,
		First:     s.First,
		Last:      s.Last,
	}
}

func inactiveOf(s probe.Inactive) Inactive {
	return Inactive{
		Kind:     Kind(s.Kind),
		Function: s.Function,
		Reason:   s.Reason,
	}
}

func opStatOf(s probe.OpStat) OpStat {
	return OpStat{
		Op:      Op(s.Op),
		Site:    Frame(s.Site),
		MapType: s.MapType,
		Count:   s.Count,
	}
}
