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
	"time"

	"github.com/mapguard/mapguard"
	"github.com/mapguard/mapguard/decode"
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
	ProbeSites = &Desc{Name: "mapguard_probe_sites", Type: Gauge, Unit: "{site}", Labels: []string{"state"},
		Help: "Probe sites per state: armed (attached), disarmed (detached by the rate limit or the deep budget), inactive (runtime function not probed)."}
	ProbeHits = &Desc{Name: "mapguard_probe_hits_total", Type: Counter, Unit: "{hit}", Labels: []string{"function", "kind"},
		Help: "Traps taken per probed runtime function and kind (the top sites by hits, the rest as function=\"other\")."}
	ProbeDisarms = &Desc{Name: "mapguard_probe_disarms_total", Type: Counter, Unit: "{disarm}", Labels: []string{"function", "kind"},
		Help: "Times a probe site was detached for exceeding its rate limit (same sites as mapguard_probe_hits_total)."}
	Operations = &Desc{Name: "mapguard_map_operations_total", Type: Counter, Unit: "{operation}", Labels: []string{"op", "site", "function"},
		Help: "Map operations per call site and op, with Options.OpStats (the top sites by count, the rest as site=\"other\"). Lower bounds while the deep duty cycle runs."}
	CrashRecord = &Desc{Name: "mapguard_crash_record_armed", Type: Gauge, Unit: "1",
		Help: "1 if a crash record is pinned for this process, so that a fatal concurrent map misuse is reported after the restart."}
	DeepBudget = &Desc{Name: "mapguard_deep_budget_ratio", Type: Gauge, Unit: "1",
		Help: "Share of one CPU deep watching may cost (Options.Budget)."}
	DeepDutyCycle = &Desc{Name: "mapguard_deep_duty_cycle_ratio", Type: Gauge, Unit: "1",
		Help: "Share of the time since Start the deep probes were attached."}
	DeepOverhead = &Desc{Name: "mapguard_deep_overhead_ratio", Type: Gauge, Unit: "1",
		Help: "Estimated share of one CPU deep watching has cost since Start."}
	DeepSpent = &Desc{Name: "mapguard_deep_cpu_seconds_total", Type: Counter, Unit: "s",
		Help: "CPU time deep watching has cost: hits times the measured hit cost, plus attaching and detaching."}
	DeepHits = &Desc{Name: "mapguard_deep_hits_total", Type: Counter, Unit: "{hit}",
		Help: "Deep probe hits."}
	DeepHitCost = &Desc{Name: "mapguard_deep_hit_cost_seconds", Type: Gauge, Unit: "s",
		Help: "Cost of one deep probe hit, measured at Start."}
	DeepDetaches = &Desc{Name: "mapguard_deep_detaches_total", Type: Counter, Unit: "{detach}",
		Help: "Times the budget governor detached the deep probes."}
)

// Descs lists every metric Collect may return.
func Descs() []*Desc {
	return []*Desc{Events, Dropped, CallbackPanics, ProbeSites, ProbeHits, ProbeDisarms, Operations,
		CrashRecord, DeepBudget, DeepDutyCycle, DeepOverhead, DeepSpent, DeepHits, DeepHitCost, DeepDetaches}
}

// Source is what Collect reads: a *mapguard.Guard.
type Source interface {
	Stats() mapguard.Stats
	OpStats() []mapguard.OpStat
}

// Collect reads g once and returns its samples. Per-site metrics hold at
// most maxSites series each (DefaultMaxSites if maxSites <= 0), the sites
// with the highest counts, plus one "other" series for the rest.
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
	for _, k := range decode.Kinds() {
		add(Events, float64(st.Events[k]), k.String())
	}
	add(Dropped, float64(st.DroppedKernel), "kernel")
	add(Dropped, float64(st.DroppedQueue), "queue")
	add(Dropped, float64(st.DroppedChannel), "channel")
	add(CallbackPanics, float64(st.CallbackPanics))

	var armed, disarmed int
	hits := map[[2]string]*[2]uint64{} // function, kind -> hits, disarms
	for _, s := range st.Sites {
		if s.Armed {
			armed++
		} else {
			disarmed++
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
		hits[key][1] += uint64(s.Disarms)
	}
	add(ProbeSites, float64(armed), "armed")
	add(ProbeSites, float64(disarmed), "disarmed")
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
		add(ProbeDisarms, float64(s.v[1]), s.key[0], s.key[1])
	}
	if len(rest) > 0 {
		var h, d uint64
		for _, s := range rest {
			h, d = h+s.v[0], d+s.v[1]
		}
		add(ProbeHits, float64(h), Other, Other)
		add(ProbeDisarms, float64(d), Other, Other)
	}

	ops := map[[3]string]uint64{} // op, file:line, function
	for _, o := range g.OpStats() {
		ops[[3]string{o.Op.String(), site(o.Site), o.Site.Function}] += o.Count
	}
	type opCount struct {
		key [3]string
		n   uint64
	}
	var oc []opCount
	for k, n := range ops {
		oc = append(oc, opCount{k, n})
	}
	topOps, restOps := topN(oc, maxSites, func(o opCount) uint64 { return o.n }, func(o opCount) string { return o.key[0] + "\x00" + o.key[1] })
	for _, o := range topOps {
		add(Operations, float64(o.n), o.key[0], o.key[1], o.key[2])
	}
	other := map[string]uint64{} // per op
	for _, o := range restOps {
		other[o.key[0]] += o.n
	}
	for _, op := range sortedKeys(other) {
		add(Operations, float64(other[op]), op, Other, Other)
	}

	crash := 0.0
	if st.CrashRecord != "" {
		crash = 1
	}
	add(CrashRecord, crash)

	if d := st.Deep; d != nil {
		add(DeepBudget, d.Budget)
		add(DeepDutyCycle, d.DutyCycle)
		add(DeepOverhead, d.Overhead)
		add(DeepSpent, (time.Duration(d.Hits)*d.HitCost + d.Governor).Seconds())
		add(DeepHits, float64(d.Hits))
		add(DeepHitCost, d.HitCost.Seconds())
		add(DeepDetaches, float64(d.Detaches))
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
