// Package metricset maps a Guard's values to metric samples. It is the one
// place that says which figures mapguard exports and under which names: the
// Prometheus collector (contrib/mapguardprom) and the OpenTelemetry
// instruments (contrib/mapguardotel) both read it, so a figure added to
// Stats is exported by adding it here once.
//
// Names follow the Prometheus conventions (base units, _total for
// counters, _ratio for shares); the OpenTelemetry side uses the same names
// without the _total suffix, which its exporters add back.
package metricset

import (
	"cmp"
	"slices"
	"strconv"
	"strings"

	"github.com/mapguard/mapguard"
)

// Type is a metric's type.
type Type int

const (
	Counter Type = iota + 1 // only goes up while the Guard lives
	Gauge                   // a value now
)

// Desc describes one metric.
type Desc struct {
	Name   string // Prometheus name, e.g. "mapguard_events_total"
	Help   string
	Type   Type
	Unit   string   // UCUM unit for OpenTelemetry: "1", "s", "{event}"
	Labels []string // label names, in the order of Sample.Labels
}

// Sample is one value of a metric with its label values.
type Sample struct {
	Desc   *Desc
	Labels []string
	Value  float64
}

// Other is the label value of the series that sums the sites beyond the
// bound.
const Other = "other"

// DefaultMaxSites is the default bound on the sites exported one by one.
const DefaultMaxSites = 20

// The metrics. Every Desc here is exported by Collect, and listed by
// Descs; the README's table lists them too.
var (
	Events = &Desc{Name: "mapguard_events_total", Type: Counter, Unit: "{event}", Labels: []string{"kind"},
		Help: "Map misuse events detected, per kind, as they left the kernel (delivered or dropped)."}
	Dropped = &Desc{Name: "mapguard_dropped_events_total", Type: Counter, Unit: "{event}", Labels: []string{"stage"},
		Help: "Events lost, per stage: kernel (ring buffer full), queue (dispatch queue full), channel (Events channel full)."}
	CallbackPanics = &Desc{Name: "mapguard_callback_panics_total", Type: Counter, Unit: "{panic}",
		Help: "OnEvent callbacks that panicked and were recovered."}
	DroppedByKind = &Desc{Name: "mapguard_dropped_events_by_kind_total", Type: Counter, Unit: "{event}", Labels: []string{"kind"},
		Help: "Events lost at any stage, per kind (a kernel drop counts for its probe site's kind)."}
	ProbeSites = &Desc{Name: "mapguard_probe_sites", Type: Gauge, Unit: "{site}", Labels: []string{"state"},
		Help: "Probe sites per state: armed (attached), disarmed (detached for now, between the windows of a sampled site), sampled (over the budget: attached in short windows), inactive (runtime function not probed)."}
	ProbeHits = &Desc{Name: "mapguard_probe_hits_total", Type: Counter, Unit: "{hit}", Labels: []string{"function", "kind"},
		Help: "Traps taken per probed runtime function and kind (the top sites by hits, the rest as function=\"other\")."}
	ProbeSampled = &Desc{Name: "mapguard_probe_sampled", Type: Gauge, Unit: "{site}", Labels: []string{"function", "kind"},
		Help: "Probe sites being sampled because they cost more than the budget allows (same sites as mapguard_probe_hits_total)."}
	CallSites = &Desc{Name: "mapguard_call_site_occurrences_total", Type: Counter, Unit: "{occurrence}", Labels: []string{"kind", "site", "function"},
		Help: "Idioms counted per call site (missing-key and nil-map reads: statistics, not events), the top sites by count, the rest as site=\"other\". Scaled estimates while a site is sampled."}
	Operations = &Desc{Name: "mapguard_map_operations_total", Type: Counter, Unit: "{operation}", Labels: []string{"op", "site", "function"},
		Help: "Map operations per call site and op, with Options.OpStats (the top sites by count, the rest as site=\"other\"). Lower bounds while the deep sites are sampled."}
	CrashRecord = &Desc{Name: "mapguard_crash_record_armed", Type: Gauge, Unit: "1",
		Help: "1 if a crash record is pinned for this process, so that a fatal concurrent map misuse is reported after the restart."}
	Budget = &Desc{Name: "mapguard_budget_ratio", Type: Gauge, Unit: "1",
		Help: "Share of one CPU all probes may cost (Options.Budget)."}
	Overhead = &Desc{Name: "mapguard_overhead_ratio", Type: Gauge, Unit: "1",
		Help: "Share of one CPU the probes have cost since Start, as the governor accounts it."}
	Spent = &Desc{Name: "mapguard_cpu_seconds_total", Type: Counter, Unit: "s",
		Help: "CPU time the probes have cost: every hit at its site's measured cost, plus attaching, detaching, recalibrating and the Guard's own goroutines."}
	TrapCost = &Desc{Name: "mapguard_trap_cost_seconds", Type: Gauge, Unit: "s", Labels: []string{"instruction"},
		Help: "What one trap costs on this machine with an empty program, at a single-stepped or an emulated instruction, as last calibrated."}
	TrapScale = &Desc{Name: "mapguard_trap_scale_ratio", Type: Gauge, Unit: "1",
		Help: "What the traps cost in this process, measured by the trap sampler, over their calibrated cost, for the traps with no scale of their own; the governor books their calibrated cost times this (1 until measured)."}
)

// Descs lists every metric Collect may return.
func Descs() []*Desc {
	return []*Desc{Events, Dropped, DroppedByKind, CallbackPanics, ProbeSites, ProbeHits, ProbeSampled, CallSites, Operations,
		CrashRecord, Budget, Overhead, Spent, TrapCost, TrapScale}
}

// Source is what Collect reads: a *mapguard.Guard.
type Source interface {
	Stats() mapguard.Stats
	OpStats() []mapguard.OpStat
}

// Collect reads g once and returns its samples. Per-site metrics hold at
// most maxSites series each (DefaultMaxSites if maxSites <= 0), the sites
// with the highest counts, plus one "other" series for the rest.
//
// Collect lists every metric, one line each, in one place.
func Collect(g Source, maxSites int) []Sample {
	if maxSites <= 0 {
		maxSites = DefaultMaxSites
	}
	st := g.Stats()
	var out []Sample
	add := func(d *Desc, v float64, labels ...string) {
		out = append(out, Sample{Desc: d, Labels: labels, Value: v})
	}

	// Every kind, also at 0, so that rate() and alerts see the series
	// before the first event.
	for _, k := range mapguard.Kinds() {
		add(Events, float64(st.Events[k]), k.String())
	}
	add(Dropped, float64(st.DroppedKernel), "kernel")
	add(Dropped, float64(st.DroppedQueue), "queue")
	add(Dropped, float64(st.DroppedChannel), "channel")
	for _, k := range mapguard.Kinds() {
		add(DroppedByKind, float64(st.DroppedByKind[k]), k.String())
	}
	add(CallbackPanics, float64(st.CallbackPanics))

	var armed, disarmed, sampled int
	hits := map[[2]string]*[2]uint64{} // function, kind -> hits, sampled sites
	for _, s := range st.Sites {
		if s.Armed {
			armed++
		} else {
			disarmed++
		}
		if s.Sampled {
			sampled++
		}
		kind := "operations"
		if s.Kind != 0 {
			kind = s.Kind.String()
		}
		key := [2]string{s.Function, kind}
		if hits[key] == nil {
			hits[key] = new([2]uint64)
		}
		hits[key][0] += s.Hits
		if s.Sampled {
			hits[key][1]++
		}
	}
	add(ProbeSites, float64(armed), "armed")
	add(ProbeSites, float64(disarmed), "disarmed")
	add(ProbeSites, float64(sampled), "sampled")
	add(ProbeSites, float64(len(st.Inactive)), "inactive")
	type siteHits struct {
		key [2]string
		v   [2]uint64
	}
	var sh []siteHits
	for k, v := range hits {
		sh = append(sh, siteHits{k, *v})
	}
	top, rest := topN(sh, maxSites, func(s siteHits) uint64 { return s.v[0] }, func(s siteHits) string { return s.key[0] + "\x00" + s.key[1] })
	for _, s := range top {
		add(ProbeHits, float64(s.v[0]), s.key[0], s.key[1])
		add(ProbeSampled, float64(s.v[1]), s.key[0], s.key[1])
	}
	if len(rest) > 0 {
		var h, d uint64
		for _, s := range rest {
			h, d = h+s.v[0], d+s.v[1]
		}
		add(ProbeHits, float64(h), Other, Other)
		add(ProbeSampled, float64(d), Other, Other)
	}

	calls := map[[3]string]uint64{} // kind, file:line, function
	for _, c := range st.CallSites {
		calls[[3]string{c.Kind.String(), site(c.Site), c.Site.Function}] += c.Count
	}
	addTop(add, CallSites, calls, maxSites)
	ops := map[[3]string]uint64{} // op, file:line, function
	for _, o := range g.OpStats() {
		ops[[3]string{o.Op.String(), site(o.Site), o.Site.Function}] += o.Count
	}
	addTop(add, Operations, ops, maxSites)

	crash := 0.0
	if st.CrashRecord != "" {
		crash = 1
	}
	add(CrashRecord, crash)

	if b := st.Budget; b != nil {
		add(Budget, b.Budget)
		add(Overhead, b.Overhead)
		add(Spent, b.Spent.Seconds())
		add(TrapCost, b.StepCost.Seconds(), "single-stepped")
		add(TrapCost, b.EmulatedCost.Seconds(), "emulated")
		add(TrapScale, b.TrapScale)
	}
	return out
}

// addTop adds the maxSites highest counts of d, keyed by (class, site,
// function), and for the rest one (class, "other", "other") series per
// class.
func addTop(add func(*Desc, float64, ...string), d *Desc, counts map[[3]string]uint64, maxSites int) {
	top, rest := topN(mapCounts(counts), maxSites, func(o opCount) uint64 { return o.n }, func(o opCount) string { return o.key[0] + "\x00" + o.key[1] })
	for _, o := range top {
		add(d, float64(o.n), o.key[0], o.key[1], o.key[2])
	}
	other := map[string]uint64{} // per class
	for _, o := range rest {
		other[o.key[0]] += o.n
	}
	for _, class := range sortedKeys(other) {
		add(d, float64(other[class]), class, Other, Other)
	}
}

// opCount is a count with its three label values.
type opCount struct {
	key [3]string
	n   uint64
}

func mapCounts(m map[[3]string]uint64) []opCount {
	out := make([]opCount, 0, len(m))
	for k, n := range m {
		out = append(out, opCount{k, n})
	}
	return out
}

// site is a call site's label value: "file:line", or the function when
// the file is unknown.
func site(f mapguard.Frame) string {
	if f.File == "" {
		return f.Function
	}
	return f.File + ":" + strconv.Itoa(f.Line)
}

// topN splits xs into the n with the highest counts (ties broken by id, so
// the split is stable between scrapes) and the rest.
func topN[T any](xs []T, n int, count func(T) uint64, id func(T) string) (top, rest []T) {
	slices.SortFunc(xs, func(a, b T) int {
		if c := cmp.Compare(count(b), count(a)); c != 0 {
			return c
		}
		return cmp.Compare(id(a), id(b))
	})
	if len(xs) <= n {
		return xs, nil
	}
	return xs[:n], xs[n:]
}

func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}

// OTelName is the metric's OpenTelemetry name: dotted, without the
// _total suffix (OpenTelemetry's Prometheus exporter adds it back to
// counters), e.g. "mapguard.events".
func (d *Desc) OTelName() string {
	return "mapguard." + strings.TrimSuffix(strings.TrimPrefix(d.Name, "mapguard_"), "_total")
}
