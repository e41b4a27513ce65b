// Package mapguardotel exports a Guard to OpenTelemetry: its figures as
// asynchronous instruments observed in one Meter callback (the same
// figures, bounds and labels as the Prometheus collector, as attributes),
// and its events as log records with an event name, which a collector can
// forward.
//
//	reg, err := mapguardotel.RegisterMetrics(g, meterProvider.Meter("mapguard"), mapguardotel.Options{})
//	mapguardotel.EmitEvents(g, loggerProvider.Logger("mapguard"))
package mapguardotel

import (
	"context"
	"fmt"
	"strconv"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/log"
	"go.opentelemetry.io/otel/metric"

	"github.com/mapguard/mapguard"
	"github.com/mapguard/mapguard/internal/metricset"
)

// Options configures RegisterMetrics. The zero value is valid.
type Options struct {
	// MaxSites bounds the attribute sets of each per-site instrument: the
	// sites with the highest counts, plus one set for the rest with the
	// value "other". Default 20.
	MaxSites int
}

// RegisterMetrics creates one asynchronous instrument per figure on meter
// (counters as Float64ObservableCounter, gauges as Float64ObservableGauge)
// and one callback that reads g at each collection. Unregister the
// returned Registration to stop. It returns the meter's error if an
// instrument cannot be created.
func RegisterMetrics(g *mapguard.Guard, meter metric.Meter, opts Options) (metric.Registration, error) {
	insts := map[*metricset.Desc]metric.Float64Observable{}
	var list []metric.Observable
	for _, d := range metricset.Descs() {
		var inst metric.Float64Observable
		var err error
		switch d.Type {
		case metricset.Counter:
			inst, err = meter.Float64ObservableCounter(d.OTelName(), metric.WithDescription(d.Help), metric.WithUnit(d.Unit))
		default:
			inst, err = meter.Float64ObservableGauge(d.OTelName(), metric.WithDescription(d.Help), metric.WithUnit(d.Unit))
		}
		if err != nil {
			return nil, fmt.Errorf("create instrument %s: %w", d.OTelName(), err)
		}
		insts[d] = inst
		list = append(list, inst)
	}
	reg, err := meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		for _, s := range metricset.Collect(g, opts.MaxSites) {
			kvs := make([]attribute.KeyValue, len(s.Labels))
			for i, v := range s.Labels {
				kvs[i] = attribute.String(s.Desc.Labels[i], v)
			}
			o.ObserveFloat64(insts[s.Desc], s.Value, metric.WithAttributes(kvs...))
		}
		return nil
	}, list...)
	if err != nil {
		return nil, fmt.Errorf("register callback: %w", err)
	}
	return reg, nil
}

// EventName is the event name of the log records EmitEvents emits; the
// attribute mapguard.kind says which kind.
const EventName = "mapguard.map_misuse"

// EmitEvents registers an OnEvent callback on g that emits every event as
// a log record on logger, for the Guard's life: event name EventName, body
// the event's one-line text, severity ERROR for bugs (nil-map-write,
// unhashable-key, concurrent-misuse, previous-crash, shared-writers) and
// WARN for the rest, and attributes mapguard.kind, code.function.name,
// code.file.path, code.line.number, mapguard.goroutine, mapguard.map_type,
// mapguard.count and, when set, mapguard.detail, mapguard.pid and
// mapguard.key (only what Options.CaptureKeys returned). It runs on the
// Guard's dispatch goroutine, so logger should hand records to a batching
// processor, as the SDK's BatchProcessor does.
func EmitEvents(g *mapguard.Guard, logger log.Logger) {
	g.OnEvent(func(ev mapguard.Event) { logger.Emit(context.Background(), record(ev)) })
}

func record(ev mapguard.Event) log.Record {
	var r log.Record
	r.SetEventName(EventName)
	r.SetTimestamp(ev.Time)
	r.SetBody(attribute.StringValue(ev.String()))
	r.SetSeverity(log.SeverityWarn)
	r.SetSeverityText("WARN")
	switch ev.Kind {
	case mapguard.NilMapWrite, mapguard.UnhashableKey, mapguard.ConcurrentMisuse, mapguard.PreviousCrash, mapguard.SharedWriters:
		r.SetSeverity(log.SeverityError)
		r.SetSeverityText("ERROR")
	}
	r.AddAttributes(
		attribute.String("mapguard.kind", ev.Kind.String()),
		attribute.String("code.function.name", ev.Site.Function),
		attribute.String("code.file.path", ev.Site.File),
		attribute.Int("code.line.number", ev.Site.Line),
		attribute.String("mapguard.goroutine", strconv.FormatUint(ev.Goroutine, 10)),
		attribute.String("mapguard.map_type", ev.MapType),
		attribute.Int64("mapguard.count", int64(ev.Count)),
	)
	if ev.Detail != "" {
		r.AddAttributes(attribute.String("mapguard.detail", ev.Detail))
	}
	if ev.PID != 0 {
		r.AddAttributes(attribute.Int("mapguard.pid", ev.PID))
	}
	if ev.Key != "" {
		r.AddAttributes(attribute.String("mapguard.key", ev.Key))
	}
	return r
}
