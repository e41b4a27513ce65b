// Package probe defines what watches map operations for a Guard, and a fake
// of it for users' tests.
//
// A Probe watches the process's own Go map operations and hands each
// detected misuse to a Sink as a decode.Event. mapguard's own
// implementation, eBPF uprobes on the process's runtime map functions, is
// internal (internal/uprobe) and is what a Guard uses unless
// mapguard.Options.Probe says otherwise. Fake is driven by tests: Emit hands
// an event to the sink exactly as a real probe would, with no privileges and
// no kernel:
//
//	fake := mapguard.NewFake()
//	g, _ := mapguard.New(mapguard.Options{Probe: fake})
//	_ = g.Start(ctx)
//	fake.Emit(decode.Event{Kind: decode.NilMapWrite, MapType: "map[string]int"})
//
// Stats, SiteStats and BudgetStats describe a probe's counters; the Guard
// reports them in mapguard.Stats.
package probe
