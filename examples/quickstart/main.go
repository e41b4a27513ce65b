// Command quickstart starts a Guard in its own process, provokes each kind of
// map misuse that can be shown without killing the demo, and prints the
// events. Run it as root:
//
//	go run ./examples/quickstart
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/mapguard/mapguard"
)

func main() {
	// A low growth threshold, so that the demo need not build a million
	// entries; the default is 1<<20.
	g, err := mapguard.New(mapguard.Options{StackDepth: 2, GrowthThreshold: 50000})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	start := time.Now()
	if err := g.Start(context.Background()); err != nil {
		fmt.Fprintln(os.Stderr, "mapguard could not start:", err)
		if errors.Is(err, mapguard.ErrPermission) {
			fmt.Fprintln(os.Stderr, "run it as root (uprobes need CAP_SYS_ADMIN)")
		}
		os.Exit(1)
	}
	fmt.Printf("mapguard started in %v\n", time.Since(start).Round(time.Millisecond))
	events := g.Events()

	// 1. A write to a nil map panics; net/http and many frameworks recover
	//    such panics per request, so nobody notices.
	func() {
		defer func() { recover() }()
		var counts map[string]int
		counts["requests"]++
	}()

	// 2. A nested lookup whose outer key is missing reads from a nil inner
	//    map and silently returns false.
	perms := map[string]map[string]bool{"alice": {"read": true}}
	if perms["bob"]["read"] {
		fmt.Println("unreachable")
	}

	// 3. A cache that is never evicted grows without bound. It is reported
	//    when it crosses the threshold, then at each doubling.
	cache := map[int]string{}
	for i := 0; i < 60000; i++ {
		cache[i] = "v"
	}

	for want := 3; want > 0; {
		select {
		case ev := <-events:
			fmt.Println(ev)
			for _, f := range ev.Stack {
				fmt.Println("    ", f)
			}
			want--
		case <-time.After(5 * time.Second):
			fmt.Fprintln(os.Stderr, "timed out waiting for events")
			os.Exit(1)
		}
	}

	st := g.Stats()
	fmt.Printf("\nevents: %v, dropped: %d\n", st.Events, st.Dropped)
	fmt.Println("probe sites (hits: traps taken; filtered: empty non-nil maps; not-own: the runtime's own maps, nil reads in the standard library):")
	for _, s := range st.Sites {
		cost := "single-stepped"
		if s.Emulated {
			cost = "emulated"
		}
		fmt.Printf("  %-14s %-30s +%#-5x %-28s %-14s armed=%-5v hits=%d filtered=%d not-own=%d\n",
			s.Kind, s.Function, s.Offset, s.Inst, cost, s.Armed, s.Hits, s.Filtered, s.NotOwned)
	}
	for _, in := range st.Inactive {
		fmt.Printf("  %-14s %-30s not probed: %s\n", in.Kind, in.Function, in.Reason)
	}
	start = time.Now()
	g.Close()
	fmt.Printf("closed in %v\n", time.Since(start).Round(time.Millisecond))
}
