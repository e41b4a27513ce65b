package mapguardprom

import (
	"context"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/mapguard/mapguard"
)

func fakeGuard(t *testing.T) (*mapguard.Guard, *mapguard.Fake) {
	t.Helper()
	fake := mapguard.NewFake()
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

// emit delivers evs through the fake and waits until the Guard has counted
// them (a callback runs after the count).
func emit(t *testing.T, g *mapguard.Guard, fake *mapguard.Fake, evs ...mapguard.Event) {
	t.Helper()
	done := make(chan struct{}, len(evs))
	g.OnEvent(func(mapguard.Event) { done <- struct{}{} })
	for _, ev := range evs {
		if !fake.Emit(ev) {
			t.Fatal("fake did not deliver")
		}
	}
	for range evs {
		<-done
	}
}

func TestCollectorCountsEvents(t *testing.T) {
	g, fake := fakeGuard(t)
	c := NewCollector(g, Options{})
	emit(t, g, fake, mapguard.Event{Kind: mapguard.NilMapWrite}, mapguard.Event{Kind: mapguard.NilMapWrite}, mapguard.Event{Kind: mapguard.MapGrowth})

	want := `
# HELP mapguard_events_total Map misuse events detected, per kind, as they left the kernel (delivered or dropped).
# TYPE mapguard_events_total counter
mapguard_events_total{kind="concurrent-misuse"} 0
mapguard_events_total{kind="map-bloat"} 0
mapguard_events_total{kind="map-growth"} 1
mapguard_events_total{kind="missing-key-delete"} 0
mapguard_events_total{kind="missing-key-read"} 0
mapguard_events_total{kind="nested-map-miss"} 0
mapguard_events_total{kind="nil-map-delete"} 0
mapguard_events_total{kind="nil-map-read"} 0
mapguard_events_total{kind="nil-map-write"} 2
mapguard_events_total{kind="previous-crash"} 0
mapguard_events_total{kind="shared-writers"} 0
mapguard_events_total{kind="unhashable-key"} 0
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want), "mapguard_events_total"); err != nil {
		t.Error(err)
	}
}

func TestCollectorFollowsConventions(t *testing.T) {
	g, fake := fakeGuard(t)
	fake.SetOpStats([]mapguard.OpStat{{Op: mapguard.OpRead, Count: 3, Site: mapguard.Frame{Function: "app.f", File: "/a.go", Line: 1}}})
	c := NewCollector(g, Options{})
	problems, err := testutil.CollectAndLint(c)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("%s: %s", p.Metric, p.Text)
	}
	// Describe and Collect agree: a registry rejects a collector whose
	// metrics were not described.
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(c)
	if _, err := reg.Gather(); err != nil {
		t.Fatal(err)
	}
}

func TestCollectorBoundsSites(t *testing.T) {
	g, fake := fakeGuard(t)
	var ops []mapguard.OpStat
	for i := 1; i <= 50; i++ {
		ops = append(ops, mapguard.OpStat{Op: mapguard.OpWrite, Count: uint64(i), Site: mapguard.Frame{Function: "app.f", File: "/a.go", Line: i}})
	}
	fake.SetOpStats(ops)
	n := testutil.CollectAndCount(NewCollector(g, Options{MaxSites: 7}), "mapguard_map_operations_total")
	if n != 8 {
		t.Errorf("%d series, want 7 sites + other", n)
	}
}
