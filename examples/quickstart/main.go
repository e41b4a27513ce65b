// Command quickstart starts a Guard in its own process, provokes each kind of
// map misuse, and prints the events. The one misuse that kills a process,
// concurrent map writes, happens in a child copy of this program first: its
// report survives the crash and comes back as a previous-crash event when
// this process starts its Guard. Run it as root:
//
//	go run ./examples/quickstart
//
// With -no-crash the child is skipped.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"time"

	"github.com/mapguard/mapguard"
)

//lint:ignore U1000 a sink: what is assigned to it is not optimised away
var sink int

// main is long on purpose: a demo read top to bottom, one provocation per kind, in order.
func main() {
	if os.Getenv("QUICKSTART_RACE_CHILD") == "1" {
		raceChild()
		return
	}
	noCrash := flag.Bool("no-crash", false, "skip the child process that dies of concurrent map writes")
	flag.Parse()

	// Events: what a maintainer would act on. Missing-key and nil-map
	// reads are idioms as often as bugs: they are counted per call site
	// (Stats().CallSites) and printed at the end.
	want := []mapguard.Kind{
		mapguard.NilMapWrite, mapguard.NestedMapMiss,
		mapguard.MapGrowth, mapguard.MapBloat, mapguard.UnhashableKey,
	}
	if !*noCrash {
		fmt.Println("running a child copy of this program that races two map writers...")
		if err := crashChild(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		want = append(want, mapguard.PreviousCrash)
	}

	// A low growth threshold, so that the demo need not build a million
	// entries; the default is 1<<20. It is also the capacity from which an
	// emptied map counts as bloat.
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
	fmt.Printf("mapguard started in %v\n\n", time.Since(start).Round(time.Millisecond))
	events := g.Events()

	// 1. A write to a nil map panics; net/http and many frameworks recover
	//    such panics per request, so nobody notices.
	func() {
		defer func() { recover() }()
		var counts map[string]int
		counts["requests"]++
	}()

	// 2. A nested lookup whose outer key is missing reads from a nil inner
	//    map and silently returns false: a nested-map miss.
	perms := map[string]map[string]bool{"alice": {"read": true}}
	if perms["bob"]["read"] {
		fmt.Println("unreachable")
	}

	// 3. Lookups of keys that are not there return a silent zero, and a
	//    nil map reads as empty: often on purpose, so these are counted per
	//    call site, not reported one by one. (Under the default budget,
	//    1% of a CPU, a hundred traps are counted exactly; a storm of them
	//    would be sampled, its counts scaled estimates.)
	prices := map[string]int{"apple": 3}
	var discounts map[string]int
	for i := 0; i < 50; i++ {
		sink += prices["pear"]
		sink += discounts["pear"]
	}

	// 4. A cache that is never evicted grows without bound. It is reported
	//    when it crosses the threshold, then at each doubling.
	cache := map[int]string{}
	for i := 0; i < 60000; i++ {
		cache[i] = "v"
	}

	// 5. Emptying it does not give the memory back: maps never shrink.
	for k := range cache {
		delete(cache, k)
	}

	// 6. An interface key holding a slice panics.
	func() {
		defer func() { recover() }()
		seen := map[any]bool{}
		seen[[]string{"a"}] = true
	}()

	seen := map[mapguard.Kind]bool{}
	timeout := time.After(5 * time.Second)
	for missing := len(want); missing > 0; {
		select {
		case ev := <-events:
			fmt.Println(ev)
			for _, f := range ev.Stack {
				fmt.Println("    ", f)
			}
			// Comma-ok: a plain seen[k] of a kind not yet seen would itself
			// be a missing-key read.
			if _, dup := seen[ev.Kind]; !dup && slices.Contains(want, ev.Kind) {
				seen[ev.Kind] = true
				missing--
			}
		case <-timeout:
			fmt.Fprintln(os.Stderr, "timed out waiting for events; seen:", seen)
			printSites(g.Stats())
			os.Exit(1)
		}
	}
	// Let a second of aggregated counts arrive.
	deadline := time.After(1500 * time.Millisecond)
drain:
	for {
		select {
		case ev := <-events:
			fmt.Println(ev)
		case <-deadline:
			break drain
		}
	}

	st := g.Stats()
	fmt.Printf("\nevents: %v, dropped: %d, crash record: %s\n", st.Events, st.Dropped, st.CrashRecord)
	fmt.Println("idioms counted per call site (statistics, not events):")
	var misses, nilReads uint64
	for _, c := range st.CallSites {
		if !strings.HasSuffix(c.Site.File, "quickstart/main.go") {
			continue
		}
		fmt.Printf("  %-17s %s: %d (%s, comma-ok %v)\n", c.Kind, c.Site, c.Count, c.MapType, c.CommaOK)
		switch c.Kind {
		case mapguard.MissingKeyRead:
			misses += c.Count
		case mapguard.NilMapRead:
			nilReads += c.Count
		}
	}
	if misses < 50 || nilReads < 50 {
		fmt.Fprintf(os.Stderr, "counted %d missing-key and %d nil-map reads, want 50 each\n", misses, nilReads)
		printSites(st)
		os.Exit(1)
	}
	printSites(st)
	start = time.Now()
	g.Close()
	fmt.Printf("closed in %v\n", time.Since(start).Round(time.Millisecond))
}

// printSites prints what each probe site took.
func printSites(st mapguard.Stats) {
	fmt.Println("probe sites (hits: traps taken; filtered: not an anomaly; agg: counted per call site; not-own: the runtime's own maps and the standard library):")
	for _, s := range st.Sites {
		cost := "single-stepped"
		if s.Emulated {
			cost = "emulated"
		}
		fmt.Printf("  %-17s %-37s +%#-5x %-28s %-14s armed=%-5v sampled=%-5v cost=%v hits=%d filtered=%d agg=%d not-own=%d\n",
			s.Kind, s.Function, s.Offset, s.Inst, cost, s.Armed, s.Sampled, s.Cost.Round(10*time.Nanosecond), s.Hits, s.Filtered, s.Aggregated, s.NotOwned)
	}
	for _, in := range st.Inactive {
		fmt.Printf("  %-17s %-37s not probed: %s\n", in.Kind, in.Function, in.Reason)
	}
}

// crashChild runs this program as a child that dies of concurrent map
// writes. Detecting the race is up to the runtime and best effort, so it
// tries a few times.
func crashChild() error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	for attempt := 0; attempt < 5; attempt++ {
		cmd := exec.Command(exe)
		cmd.Env = append(os.Environ(), "QUICKSTART_RACE_CHILD=1")
		var out strings.Builder
		cmd.Stderr = &out
		err := cmd.Run()
		if first, _, _ := strings.Cut(out.String(), "\n"); strings.HasPrefix(first, "fatal error: concurrent map") {
			fmt.Printf("child %d died: %q, %v\n\n", cmd.Process.Pid, first, err)
			return nil
		}
		if strings.HasPrefix(out.String(), "start: ") {
			return fmt.Errorf("child: %s", out.String())
		}
	}
	return errors.New("the child did not die of a concurrent map misuse")
}

// raceChild watches itself and races two writers on one map until the
// runtime kills it.
func raceChild() {
	g, err := mapguard.New(mapguard.Options{})
	if err == nil {
		err = g.Start(context.Background())
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "start:", err)
		os.Exit(3)
	}
	m := map[int]int{}
	for w := 0; w < 2; w++ {
		go func() {
			for i := 0; ; i++ {
				m[i%100] = i
			}
		}()
	}
	time.Sleep(10 * time.Second)
	os.Exit(4)
}
