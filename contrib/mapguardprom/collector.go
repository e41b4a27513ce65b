// Package mapguardprom exports a Guard's figures to Prometheus: a
// prometheus.Collector in the style of client_golang's own collectors,
// which reads the Guard at each scrape and caches nothing.
//
//	prometheus.MustRegister(mapguardprom.NewCollector(g, mapguardprom.Options{}))
//
// The metrics (events per kind, drops per stage, probe sites, operations
// per call site, the crash record and the deep-watching budget) are listed
// in the README's table. Per-site series are bounded by Options.MaxSites.
package mapguardprom

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/mapguard/mapguard"
	"github.com/mapguard/mapguard/internal/metricset"
)

// Options configures NewCollector. The zero value is valid.
type Options struct {
	// MaxSites bounds the series of each per-site metric: the sites with
	// the highest counts get a series each, the others are summed into one
	// series labelled "other". Default 20.
	MaxSites int
}

// Collector is a prometheus.Collector over a Guard. It is safe for
// concurrent use, as the Guard is.
type Collector struct {
	g        metricset.Source
	maxSites int
	descs    map[*metricset.Desc]*prometheus.Desc
}

// NewCollector returns a Collector that reads g at every scrape. g may be
// started later, or fail to start: its counters are then zero.
func NewCollector(g *mapguard.Guard, opts Options) *Collector {
	c := &Collector{g: g, maxSites: opts.MaxSites, descs: map[*metricset.Desc]*prometheus.Desc{}}
	for _, d := range metricset.Descs() {
		c.descs[d] = prometheus.NewDesc(d.Name, d.Help, d.Labels, nil)
	}
	return c
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range c.descs {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	for _, s := range metricset.Collect(c.g, c.maxSites) {
		t := prometheus.GaugeValue
		if s.Desc.Type == metricset.Counter {
			t = prometheus.CounterValue
		}
		ch <- prometheus.MustNewConstMetric(c.descs[s.Desc], t, s.Value, s.Labels...)
	}
}
