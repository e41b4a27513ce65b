//go:build linux && amd64

package mapguard_test

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"

	"github.com/mapguard/mapguard"
	"github.com/mapguard/mapguard/internal/testutil"
)

// Deletes of missing keys in every mapdelete variant and map shape, and
// deletes on nil maps.
func TestRealDeleteKinds(t *testing.T) {
	g := startReal(t, mapguard.Options{
		DetectOnly: true, Detect: []mapguard.Kind{mapguard.MissingKeyDelete, mapguard.NilMapDelete},
		Budget: 1,
	})
	events := g.Events()
	large := func() map[int64]bool {
		m := make(map[int64]bool)
		for i := int64(0); i < 300; i++ {
			m[i] = true
		}
		return m
	}
	for _, c := range []struct {
		name, mapType string
		kind          mapguard.Kind
		keyLen        int
		run           func() (line int)
	}{
		{"string small", "map[string]int", mapguard.MissingKeyDelete, 4, func() (line int) {
			m := map[string]int{"a": 1}
			line = here() + 1
			delete(m, "nope")
			return
		}},
		{"string empty", "map[string]int", mapguard.MissingKeyDelete, 4, func() (line int) {
			m := map[string]int{}
			line = here() + 1
			delete(m, "nope")
			return
		}},
		{"int64 large", "map[int64]bool", mapguard.MissingKeyDelete, 8, func() (line int) {
			m := large()
			line = here() + 1
			delete(m, -1)
			return
		}},
		{"int32", "map[int32]string", mapguard.MissingKeyDelete, 4, func() (line int) {
			m := map[int32]string{1: "x"}
			line = here() + 1
			delete(m, 2)
			return
		}},
		{"struct", "map[mapguard_test.missKey]int", mapguard.MissingKeyDelete, 24, func() (line int) {
			m := map[missKey]int{{a: 1}: 1}
			line = here() + 1
			delete(m, missKey{a: 2})
			return
		}},
		{"nil string", "map[string]int", mapguard.NilMapDelete, 4, func() (line int) {
			var m map[string]int
			line = here() + 1
			delete(m, "nope")
			return
		}},
		{"nil struct", "map[mapguard_test.missKey]int", mapguard.NilMapDelete, 24, func() (line int) {
			var m map[missKey]int
			line = here() + 1
			delete(m, missKey{})
			return
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			goid, line := provoke(c.run)
			ev := await(t, events, func(ev mapguard.Event) bool { return ev.Goroutine == goid })
			checkEvent(t, ev, c.kind, "deep_linux_test.go", line, goid, c.mapType)
			if ev.KeyLen != c.keyLen || ev.KeyHash == 0 || ev.Key != "" {
				t.Errorf("key len %d hash %#x key %q, want len %d, a hash and no key", ev.KeyLen, ev.KeyHash, ev.Key, c.keyLen)
			}
			t.Log(ev)
		})
	}
}

// Deletes of present keys are never reported; every missing one is, once.
func TestRealDeleteCounts(t *testing.T) {
	g := startReal(t, mapguard.Options{DetectOnly: true, Detect: []mapguard.Kind{mapguard.MissingKeyDelete}, Budget: 1})
	events := g.Events()
	const n = 200
	goid, _ := provoke(func() int {
		m := make(map[int64]int)
		for i := int64(0); i < 2*n; i++ {
			m[i] = 1
		}
		for i := int64(0); i < 2*n; i++ {
			delete(m, i) // present
			if i%2 == 0 {
				delete(m, i) // gone now
			}
		}
		return 0
	})
	got := 0
	timeout := time.After(3 * time.Second)
	for got < n {
		select {
		case ev := <-events:
			if ev.Goroutine == goid {
				if ev.Kind != mapguard.MissingKeyDelete {
					t.Fatalf("unexpected %v", ev)
				}
				got++
			}
		case <-timeout:
			t.Fatalf("%d missing-key deletes reported, want %d; %s", got, n, governorState(g))
		}
	}
	select {
	case ev := <-events:
		if ev.Goroutine == goid {
			t.Errorf("more than %d events: %v", n, ev)
		}
	case <-time.After(300 * time.Millisecond):
	}
}

func TestRealSharedWriters(t *testing.T) {
	g := startReal(t, mapguard.Options{DetectOnly: true, Detect: []mapguard.Kind{mapguard.SharedWriters}, Budget: 1})
	events := g.Events()
	var mu sync.Mutex
	m := map[string]int{}
	var line1, line2 int
	goid1, _ := provoke(func() int {
		mu.Lock()
		line1 = here() + 1
		m["a"] = 1
		mu.Unlock()
		return 0
	})
	goid2, _ := provoke(func() int {
		mu.Lock()
		line2 = here() + 1
		m["b"] = 2
		mu.Unlock()
		return 0
	})
	ev := await(t, events, func(ev mapguard.Event) bool { return ev.Kind == mapguard.SharedWriters })
	checkEvent(t, ev, mapguard.SharedWriters, "deep_linux_test.go", line2, goid2, "map[string]int")
	if ev.Peer == nil || ev.Peer.Goroutine != goid1 || ev.Peer.Site.Line != line1 {
		t.Errorf("peer %+v, want goroutine %d at line %d", ev.Peer, goid1, line1)
	}
	t.Log(ev)

	// Excluded by map type: no event.
	g2 := startReal(t, mapguard.Options{DetectOnly: true, Detect: []mapguard.Kind{mapguard.SharedWriters}, Budget: 1,
		SharedExclude: []string{"map[int]bool"}})
	ex := map[int]bool{}
	provoke(func() int { mu.Lock(); ex[1] = true; mu.Unlock(); return 0 })
	provoke(func() int { mu.Lock(); ex[2] = true; mu.Unlock(); return 0 })
	deadline := time.After(500 * time.Millisecond)
	for {
		select {
		case ev := <-g2.Events():
			if ev.MapType == "map[int]bool" {
				t.Fatalf("excluded map reported: %v", ev)
			}
			continue
		case <-deadline:
		}
		break
	}
}

func TestRealOpStats(t *testing.T) {
	g := startReal(t, mapguard.Options{OpStats: true, Budget: 1})
	m := map[string]int{"a": 1}
	lines := map[string]int{}
	provoke(func() int {
		lines["read"] = here() + 2
		for i := 0; i < 100; i++ {
			sink = m["a"]
		}
		lines["write"] = here() + 2
		for i := 0; i < 50; i++ {
			m["b"] = i
		}
		lines["delete"] = here() + 2
		for i := 0; i < 20; i++ {
			delete(m, "b")
		}
		lines["iterate"] = here() + 2
		for i := 0; i < 5; i++ {
			for range m {
			}
		}
		return 0
	})
	want := map[string]uint64{"read": 100, "write": 50, "delete": 20, "iterate": 5}
	got := map[string]uint64{}
	for _, s := range g.OpStats() {
		if strings.HasSuffix(s.Site.File, "/deep_linux_test.go") && s.Site.Line == lines[s.Op.String()] {
			got[s.Op.String()] += s.Count
			if s.MapType != "map[string]int" {
				t.Errorf("%s at line %d: map type %q", s.Op, s.Site.Line, s.MapType)
			}
		}
	}
	for op, n := range want {
		if got[op] != n {
			t.Errorf("%s: %d at line %d, want %d", op, got[op], lines[op], n)
		}
	}
}

// A canary secret deleted as a missing key must not appear in any event,
// log line or stats unless key capture is on, and then only as the
// redaction function returns it.
func TestRealKeyCapture(t *testing.T) {
	testutil.RequirePrivileged(t)
	const secret = "canary-secret-7f3a9c"
	run := func(t *testing.T, capture func([]byte) string) (mapguard.Event, string) {
		var logs bytes.Buffer
		var logMu sync.Mutex
		log := funcr.New(func(prefix, args string) {
			logMu.Lock()
			defer logMu.Unlock()
			fmt.Fprintln(&logs, prefix, args)
		}, funcr.Options{Verbosity: 10})
		g, err := mapguard.New(mapguard.Options{Logger: log, DetectOnly: true, Detect: []mapguard.Kind{mapguard.MissingKeyDelete},
			Budget: 1, CaptureKeys: capture})
		if err != nil {
			t.Fatal(err)
		}
		if err := g.Start(context.Background()); err != nil {
			t.Fatal(err)
		}
		defer g.Close()
		events := g.Events()
		var seen []string
		g.OnEvent(func(ev mapguard.Event) { seen = append(seen, fmt.Sprintf("%v %+v", ev, ev)) })
		m := map[string]int{"x": 1}
		goid, _ := provoke(func() int { delete(m, secret); return 0 })
		ev := await(t, events, func(ev mapguard.Event) bool { return ev.Goroutine == goid })
		time.Sleep(100 * time.Millisecond)
		logMu.Lock()
		all := fmt.Sprintf("%v %+v %+v %s %s", ev, ev, g.Stats(), logs.String(), strings.Join(seen, " "))
		logMu.Unlock()
		return ev, all
	}
	t.Run("off", func(t *testing.T) {
		ev, all := run(t, nil)
		if ev.Key != "" || ev.KeyLen != len(secret) || ev.KeyHash == 0 {
			t.Errorf("key %q len %d hash %#x", ev.Key, ev.KeyLen, ev.KeyHash)
		}
		if strings.Contains(all, "canary") || strings.Contains(all, "7f3a") {
			t.Errorf("the secret leaked: %s", all)
		}
	})
	t.Run("redacted", func(t *testing.T) {
		var got []byte
		ev, all := run(t, func(prefix []byte) string {
			got = append([]byte(nil), prefix...)
			return fmt.Sprintf("<redacted %d bytes>", len(prefix))
		})
		if string(got) != secret[:16] {
			t.Errorf("redaction function saw %q, want the first 16 bytes", got)
		}
		if ev.Key != "<redacted 16 bytes>" {
			t.Errorf("key %q", ev.Key)
		}
		if strings.Contains(all, "canary") || strings.Contains(all, "7f3a") {
			t.Errorf("the secret leaked past the redaction function: %s", all)
		}
	})
}

// A hot loop of map writes with deep watching on and a small budget: the
// governor samples the deep sites to keep their cost within the budget, and
// events still arrive, marked Sampled. (The CPU the probes really cost, over
// a long run, is measured by BenchmarkBudget, not asserted here.)
func TestRealBudget(t *testing.T) {
	const budget = 0.005
	g := startReal(t, mapguard.Options{DetectOnly: true, Detect: []mapguard.Kind{mapguard.MissingKeyDelete}, OpStats: true, Budget: budget})
	// A callback sees every event the queue takes (the Events channel
	// would keep only the first BufferSize, from before sampling began).
	var sampledEvents atomic.Int64
	g.OnEvent(func(ev mapguard.Event) {
		if ev.Kind == mapguard.MissingKeyDelete && ev.Sampled {
			sampledEvents.Add(1)
		}
	})
	deadline := time.Now().Add(3 * time.Second)
	m := map[int]int{}
	n := 0
	for time.Now().Before(deadline) {
		for i := 0; i < 1000; i++ {
			m[i&63] = i
			delete(m, -1) // a missing-key delete
			n++
		}
	}
	st := g.Stats()
	b := st.Budget
	if b == nil {
		t.Fatal("no budget stats")
	}
	t.Logf("%d iterations; budget %+v; %d events", n, *b, st.Events[mapguard.MissingKeyDelete])
	if b.Sampled == 0 {
		t.Errorf("the governor sampled no site under a hot loop")
	}
	if b.EmulatedCost <= 0 || b.EmulatedCost > time.Millisecond || b.StepCost <= b.EmulatedCost {
		t.Errorf("calibrated costs: emulated %v, single-stepped %v", b.EmulatedCost, b.StepCost)
	}
	for _, s := range st.Sites {
		if s.Deep && s.Hits > 0 && s.Cost < b.EmulatedCost {
			t.Errorf("site %s costs %v a hit, less than its trap %v", s.Function, s.Cost, b.EmulatedCost)
		}
	}
	waitFor(t, func() bool { return sampledEvents.Load() > 0 }, "an event marked Sampled (%d events)", st.Events[mapguard.MissingKeyDelete])
	if len(g.OpStats()) == 0 {
		t.Error("no operations counted")
	}
}

// A flood of deep events (missing-key deletes) never drops a default
// kind's event: deep kinds have their own kernel ring buffer and dispatch
// queue, and every drop is counted per kind.
func TestRealDeepCannotCrowdOut(t *testing.T) {
	g := startReal(t, mapguard.Options{Detect: []mapguard.Kind{mapguard.MissingKeyDelete}, Budget: 1, BufferSize: 128})
	var writes atomic.Int64
	g.OnEvent(func(ev mapguard.Event) {
		if ev.Kind == mapguard.NilMapWrite && strings.HasSuffix(ev.Site.File, "deep_linux_test.go") {
			writes.Add(1)
		}
		time.Sleep(100 * time.Microsecond) // a slow consumer
	})
	stop := make(chan struct{})
	flooded := make(chan struct{})
	go func() {
		defer close(flooded)
		m := map[int]int{1: 1}
		for {
			select {
			case <-stop:
				return
			default:
			}
			for i := 0; i < 1000; i++ {
				delete(m, -1) // a missing-key delete: a deep event each
			}
		}
	}()
	const n = 50
	for i := 0; i < n; i++ {
		func() {
			defer func() { recover() }()
			var m map[string]int
			m["k"] = i // a nil-map write
		}()
		time.Sleep(2 * time.Millisecond)
	}
	close(stop)
	<-flooded
	deadline := time.Now().Add(10 * time.Second)
	for writes.Load() < n && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	st := g.Stats()
	if writes.Load() != n {
		for _, s := range st.Sites {
			if s.Kind == mapguard.NilMapWrite && s.Hits > 0 {
				t.Logf("%+v", s)
			}
		}
		t.Errorf("%d of %d nil-map writes delivered", writes.Load(), n)
	}
	t.Logf("drops by kind: %v; events: %v", st.DroppedByKind, st.Events)
	if st.DroppedByKind[mapguard.NilMapWrite] != 0 {
		t.Errorf("%d nil-map writes dropped under a deep flood", st.DroppedByKind[mapguard.NilMapWrite])
	}
	if st.DroppedByKind[mapguard.MissingKeyDelete] == 0 {
		t.Errorf("the flood dropped nothing: the test did not flood")
	}
	var sum uint64
	for _, n := range st.DroppedByKind {
		sum += n
	}
	if sum != st.Dropped {
		t.Errorf("drops by kind sum to %d, Dropped is %d", sum, st.Dropped)
	}
}

//go:noinline
func privateMapWrites(n int) int {
	m := map[int]int{} // small and not escaping: on this goroutine's stack
	for i := 0; i < n; i++ {
		m[i] = i
	}
	return len(m)
}

// Goroutines that run one after another, each with a private map, are
// not shared writers even when their maps share an address (small maps
// that do not escape live on the stack): a map's identity includes its
// random hash seed.
func TestRealSharedWritersAddressReuse(t *testing.T) {
	g := startReal(t, mapguard.Options{DetectOnly: true, Detect: []mapguard.Kind{mapguard.SharedWriters}, Budget: 1})
	events := g.Events()
	for i := 0; i < 50; i++ {
		provoke(func() int { return privateMapWrites(4) })
	}
	deadline := time.After(time.Second)
	for {
		select {
		case ev := <-events:
			if strings.Contains(ev.Site.Function, "privateMapWrites") {
				t.Fatalf("private maps reported as shared: %v", ev)
			}
			continue
		case <-deadline:
		}
		break
	}
}
