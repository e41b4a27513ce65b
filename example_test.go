package mapguard_test

import (
	"context"
	"fmt"

	"github.com/mapguard/mapguard"
)

// A downgrade switch tested without privileges: the fake probe delivers an
// event exactly as the kernel would, and the callback reacts.
func Example_fakeProbe() {
	fake := mapguard.NewFake()
	g, err := mapguard.New(mapguard.Options{Probe: fake})
	if err != nil {
		panic(err)
	}
	if err := g.Start(context.Background()); err != nil {
		panic(err)
	}
	defer g.Close()

	degraded := make(chan mapguard.Event, 1)
	g.OnEvent(func(ev mapguard.Event) {
		if ev.Kind == mapguard.NilMapWrite {
			degraded <- ev
		}
	})

	fake.Emit(mapguard.Event{
		Kind:      mapguard.NilMapWrite,
		Goroutine: 7,
		Site:      mapguard.Frame{Function: "main.handle", File: "/src/app/main.go", Line: 42},
		MapType:   "map[string]int",
	})
	ev := <-degraded
	fmt.Println("downgraded after:", ev)
	// Output: downgraded after: nil-map-write at /src/app/main.go:42 (main.handle) in goroutine 7: map[string]int len=0
}

// Which code hammers which map, in a test: the fake returns the operation
// statistics a test sets, as Guard.OpStats does with Options.OpStats on a
// real probe.
func ExampleGuard_OpStats() {
	fake := mapguard.NewFake()
	fake.SetOpStats([]mapguard.OpStat{
		{Op: mapguard.OpWrite, Site: mapguard.Frame{Function: "app.(*Cache).Put", File: "/src/app/cache.go", Line: 88}, MapType: "map[string]*app.entry", Count: 120000},
		{Op: mapguard.OpRead, Site: mapguard.Frame{Function: "app.(*Cache).Get", File: "/src/app/cache.go", Line: 61}, MapType: "map[string]*app.entry", Count: 950000},
	})
	g, err := mapguard.New(mapguard.Options{Probe: fake, OpStats: true})
	if err != nil {
		panic(err)
	}
	if err := g.Start(context.Background()); err != nil {
		panic(err)
	}
	defer g.Close()
	for _, s := range g.OpStats() {
		fmt.Printf("%-5s %7d at %s:%d on %s\n", s.Op, s.Count, s.Site.File, s.Site.Line, s.MapType)
	}
	// Output:
	// write  120000 at /src/app/cache.go:88 on map[string]*app.entry
	// read   950000 at /src/app/cache.go:61 on map[string]*app.entry
}

// Key capture is opt-in and goes through a redaction function: here only a
// coarse class of the deleted key leaves it, never its bytes.
func ExampleOptions_captureKeys() {
	redact := func(prefix []byte) string {
		if len(prefix) > 0 && prefix[0] >= '0' && prefix[0] <= '9' {
			return "numeric key"
		}
		return fmt.Sprintf("key of %d+ bytes", len(prefix))
	}
	g, err := mapguard.New(mapguard.Options{
		Detect:      []mapguard.Kind{mapguard.MissingKeyDelete},
		CaptureKeys: redact,
	})
	if err != nil {
		panic(err)
	}
	_ = g // Start it as usual; delete events then carry Event.Key:
	fmt.Println(redact([]byte("4711")))
	fmt.Println(redact([]byte("session:9f3a")))
	// Output:
	// numeric key
	// key of 12+ bytes
}

// A service's health check can read the report of an earlier crash of the
// same program without a Guard (it needs root, as the Guard does).
func ExampleReadCrashReports() {
	reports, err := mapguard.ReadCrashReports("")
	if err != nil {
		fmt.Println("no crash records:", err)
		return
	}
	for _, r := range reports {
		fmt.Printf("pid %d died at %v: %s at %s\n", r.PID, r.Time, r.Detail, r.Site)
		if r.Peer != nil {
			fmt.Printf("  the other writer: goroutine %d at %s\n", r.Peer.Goroutine, r.Peer.Site)
		}
	}
}
