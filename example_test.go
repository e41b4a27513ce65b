package mapguard_test

import (
	"context"
	"fmt"

	"github.com/mapguard/mapguard"
	"github.com/mapguard/mapguard/probe"
)

// A downgrade switch tested without privileges: the fake probe delivers an
// event exactly as the kernel would, and the callback reacts.
func Example_fakeProbe() {
	fake := probe.NewFake()
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
