package metricset

import (
	"context"
	"fmt"
	"testing"

	"github.com/mapguard/mapguard"
)

func startFake(t *testing.T, ops []mapguard.OpStat) (*mapguard.Guard, *mapguard.Fake) {
	t.Helper()
	fake := mapguard.NewFake()
	fake.SetOpStats(ops)
	g, err := mapguard.New(mapguard.Options{Probe: fake, OpStats: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	return g, fake
}

func find(samples []Sample, d *Desc, labels ...string) (float64, bool) {
	for _, s := range samples {
		if s.Desc == d && fmt.Sprint(s.Labels) == fmt.Sprint(labels) {
			return s.Value, true
		}
	}
	return 0, false
}

func TestCollectCountsEventsPerKind(t *testing.T) {
	g, fake := startFake(t, nil)
	seen := make(chan struct{}, 2)
	g.OnEvent(func(mapguard.Event) { seen <- struct{}{} })
	fake.Emit(mapguard.Event{Kind: mapguard.NilMapWrite})
	fake.Emit(mapguard.Event{Kind: mapguard.NilMapWrite})
	<-seen
	<-seen
	s := Collect(g, 0)
	if v, ok := find(s, Events, "nil-map-write"); !ok || v != 2 {
		t.Errorf("events{nil-map-write} = %v, %v; want 2", v, ok)
	}
	if v, ok := find(s, Events, "shared-writers"); !ok || v != 0 {
		t.Errorf("events{shared-writers} = %v, %v; want a 0 series", v, ok)
	}
	for _, stage := range []string{"kernel", "queue", "channel"} {
		if _, ok := find(s, Dropped, stage); !ok {
			t.Errorf("no dropped series for stage %s", stage)
		}
	}
}

func TestCollectBoundsSites(t *testing.T) {
	var ops []mapguard.OpStat
	var total uint64
	for i := 1; i <= 30; i++ {
		ops = append(ops, mapguard.OpStat{Op: mapguard.OpRead, Count: uint64(i),
			Site: mapguard.Frame{Function: "app.f", File: "/src/app.go", Line: i}})
		total += uint64(i)
	}
	g, _ := startFake(t, ops)
	s := Collect(g, 5)
	var series int
	var sum float64
	for _, x := range s {
		if x.Desc == Operations {
			series++
			sum += x.Value
		}
	}
	if series != 6 {
		t.Errorf("%d operation series, want 5 sites + other", series)
	}
	if sum != float64(total) {
		t.Errorf("operation series sum to %v, want %d", sum, total)
	}
	if v, ok := find(s, Operations, "read", "/src/app.go:30", "app.f"); !ok || v != 30 {
		t.Errorf("top site = %v, %v; want 30", v, ok)
	}
	if v, ok := find(s, Operations, "read", Other, Other); !ok || v != float64(total-30-29-28-27-26) {
		t.Errorf("other = %v, %v", v, ok)
	}
}

func TestDescsAreComplete(t *testing.T) {
	known := map[*Desc]bool{}
	for _, d := range Descs() {
		known[d] = true
	}
	g, _ := startFake(t, []mapguard.OpStat{{Op: mapguard.OpWrite, Count: 1}})
	for _, s := range Collect(g, 0) {
		if !known[s.Desc] {
			t.Errorf("%s is collected but not in Descs", s.Desc.Name)
		}
		if len(s.Labels) != len(s.Desc.Labels) {
			t.Errorf("%s: %d label values for %d labels", s.Desc.Name, len(s.Labels), len(s.Desc.Labels))
		}
	}
}
