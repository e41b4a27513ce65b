package mapguardotel

import (
	"context"
	"sync"
	"testing"

	"go.opentelemetry.io/otel/attribute"
	sdklog "go.opentelemetry.io/otel/sdk/log"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/mapguard/mapguard"
	"github.com/mapguard/mapguard/internal/metricset"
)

func fakeGuard(t *testing.T) (*mapguard.Guard, *mapguard.Fake) {
	t.Helper()
	fake := mapguard.NewFake()
	g, err := mapguard.New(mapguard.Options{Probe: fake})
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	return g, fake
}

func TestMetricsObserveTheGuard(t *testing.T) {
	g, fake := fakeGuard(t)
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	reg, err := RegisterMetrics(g, mp.Meter("mapguard"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Unregister()
	seen := make(chan struct{}, 2)
	g.OnEvent(func(mapguard.Event) { seen <- struct{}{} })
	fake.Emit(mapguard.Event{Kind: mapguard.NilMapWrite})
	fake.Emit(mapguard.Event{Kind: mapguard.NilMapWrite})
	<-seen
	<-seen

	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	var writes float64 = -1
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			names[m.Name] = true
			if m.Name != "mapguard.events" {
				continue
			}
			sum, ok := m.Data.(metricdata.Sum[float64])
			if !ok || !sum.IsMonotonic {
				t.Fatalf("mapguard.events is %T, want a monotonic sum", m.Data)
			}
			for _, dp := range sum.DataPoints {
				if v, _ := dp.Attributes.Value("kind"); v.AsString() == "nil-map-write" {
					writes = dp.Value
				}
			}
		}
	}
	if writes != 2 {
		t.Errorf("mapguard.events{kind=nil-map-write} = %v, want 2", writes)
	}
	for _, smp := range metricset.Collect(g, 0) {
		if !names[smp.Desc.OTelName()] {
			t.Errorf("no %s", smp.Desc.OTelName())
		}
	}
}

// memExporter keeps exported log records.
type memExporter struct {
	mu      sync.Mutex
	records []sdklog.Record
}

func (e *memExporter) Export(_ context.Context, rs []sdklog.Record) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, r := range rs {
		e.records = append(e.records, r.Clone())
	}
	return nil
}
func (e *memExporter) Shutdown(context.Context) error   { return nil }
func (e *memExporter) ForceFlush(context.Context) error { return nil }

func TestEventsBecomeLogRecords(t *testing.T) {
	g, fake := fakeGuard(t)
	exp := &memExporter{}
	lp := sdklog.NewLoggerProvider(sdklog.WithProcessor(sdklog.NewSimpleProcessor(exp)))
	EmitEvents(g, lp.Logger("mapguard"))
	seen := make(chan struct{}, 1)
	g.OnEvent(func(mapguard.Event) { seen <- struct{}{} })
	fake.Emit(mapguard.Event{Kind: mapguard.NilMapWrite, Goroutine: 7, MapType: "map[string]int",
		Site: mapguard.Frame{Function: "main.handle", File: "/src/app/main.go", Line: 42}})
	<-seen // EmitEvents' callback ran first

	exp.mu.Lock()
	defer exp.mu.Unlock()
	if len(exp.records) != 1 {
		t.Fatalf("%d records, want 1", len(exp.records))
	}
	r := exp.records[0]
	if r.EventName() != EventName || r.SeverityText() != "ERROR" {
		t.Errorf("event name %q severity %q", r.EventName(), r.SeverityText())
	}
	attrs := map[string]string{}
	r.WalkAttributes(func(kv attribute.KeyValue) bool {
		attrs[string(kv.Key)] = kv.Value.Emit()
		return true
	})
	for k, want := range map[string]string{"mapguard.kind": "nil-map-write", "code.line.number": "42", "code.file.path": "/src/app/main.go", "mapguard.goroutine": "7"} {
		if attrs[k] != want {
			t.Errorf("%s = %q, want %q (all: %v)", k, attrs[k], want, attrs)
		}
	}
	if _, ok := attrs["mapguard.key"]; ok {
		t.Error("a key attribute without CaptureKeys")
	}
}
