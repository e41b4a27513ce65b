// Command testprog is a program that watches itself: the tests build it with
// several Go versions and build modes (stripped, PIE, -race, no cgo), run
// it as root, and check what it reports. It prints one JSON object.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"runtime"
	"time"

	"github.com/mapguard/mapguard"
	"github.com/mapguard/mapguard/internal/rt"
)

// Result is what testprog prints.
type Result struct {
	GoVersion    string
	Error        string `json:",omitempty"`
	NotSupported bool   `json:",omitempty"`
	Permission   bool   `json:",omitempty"`
	Layout       bool   `json:",omitempty"`
	Events       []Event
	Sites        int
	Inactive     []string
}

// Event is an event and what the program expected of it.
type Event struct {
	Kind, Function, File, MapType string
	Line, WantLine                int
	GoroutineOK                   bool
}

//lint:ignore U1000 a sink: what is assigned to it is not optimised away
var sink any

func main() {
	res := Result{GoVersion: runtime.Version()}
	defer func() {
		json.NewEncoder(os.Stdout).Encode(res)
	}()
	g, err := mapguard.New(mapguard.Options{
		GrowthThreshold: 4096,
		Detect:          append(mapguard.DefaultKinds(), mapguard.MissingKeyDelete, mapguard.NilMapDelete, mapguard.SharedWriters),
		Budget:          1,
	})
	if err != nil {
		res.Error = err.Error()
		return
	}
	if err := g.Start(context.Background()); err != nil {
		res.Error = err.Error()
		res.NotSupported = errors.Is(err, mapguard.ErrNotSupported)
		res.Permission = errors.Is(err, mapguard.ErrPermission)
		res.Layout = errors.Is(err, mapguard.ErrLayoutMismatch)
		return
	}
	defer g.Close()
	st := g.Stats()
	res.Sites = len(st.Sites)
	for _, in := range st.Inactive {
		res.Inactive = append(res.Inactive, in.Kind.String()+" "+in.Function+": "+in.Reason)
	}
	events := g.Events()

	for _, p := range provocations {
		var goid uint64
		var line int
		done := make(chan struct{})
		go func() {
			defer close(done)
			goid = rt.GoID()
			line = p.run()
		}()
		<-done
		// The kinds may come in any order (a slice, not a map: this
		// program's own map reads are watched too).
		got := make([]*mapguard.Event, len(p.kinds))
		timeout := time.After(5 * time.Second)
		for waiting := len(p.kinds); waiting > 0; {
			select {
			case ev := <-events:
				for i, kind := range p.kinds {
					if got[i] == nil && ev.Goroutine == goid && ev.Kind == kind {
						got[i] = &ev
						waiting--
					}
				}
			case <-timeout:
				for i, kind := range p.kinds {
					if got[i] == nil {
						res.Error = "no " + kind.String() + " event within 5s"
						return
					}
				}
			}
		}
		for _, ev := range got {
			res.Events = append(res.Events, Event{
				Kind: ev.Kind.String(), Function: ev.Site.Function, File: ev.Site.File,
				MapType: ev.MapType, Line: ev.Site.Line, WantLine: line, GoroutineOK: ev.Goroutine == goid,
			})
		}
	}
}

// provocations are run in order, each on a fresh goroutine, and must give
// these kinds of event, in any order.
var provocations = []struct {
	run   func() int
	kinds []mapguard.Kind
}{
	{nilWrite, []mapguard.Kind{mapguard.NilMapWrite}},
	{nestedRead, []mapguard.Kind{mapguard.MissingKeyRead, mapguard.NestedMapMiss}},
	{nilRead, []mapguard.Kind{mapguard.NilMapRead}},
	{commaOKThenPlain, []mapguard.Kind{mapguard.MissingKeyRead}},
	{unhashable, []mapguard.Kind{mapguard.UnhashableKey}},
	{grow, []mapguard.Kind{mapguard.MapGrowth}},
	{bloat, []mapguard.Kind{mapguard.MapBloat}},
	{missingDelete, []mapguard.Kind{mapguard.MissingKeyDelete}},
	{nilDelete, []mapguard.Kind{mapguard.NilMapDelete}},
	{sharedWrite, []mapguard.Kind{mapguard.SharedWriters}},
}

func nilWrite() (line int) {
	defer func() { recover() }()
	var m map[string]int
	line = here() + 1 // set before the panic: the recovered function returns it
	m["k"] = 1        // not m["k"]++: -race builds compile that to a read, then a write
	return line
}

func nestedRead() (line int) {
	users := map[string]map[int64]bool{"alice": {1: true}}
	line = here() + 1
	sink = users["bob"][1]
	return line
}

func nilRead() (line int) {
	var counts map[string]int
	line = here() + 1
	sink = counts["x"]
	return line
}

// commaOKThenPlain misses with a comma-ok read, which is no missing-key
// read, then with a plain one: the event must be the plain one's.
func commaOKThenPlain() (line int) {
	ids := map[int64]string{1: "a"}
	_, ok := ids[2]
	line = here() + 1
	sink = ids[3]
	sink = ok
	return line
}

func unhashable() (line int) {
	defer func() { recover() }()
	m := map[any]int{1: 1}
	line = here() + 1
	m[[]int{1}] = 2
	return line
}

var big map[int64]int64

func grow() (line int) {
	big = make(map[int64]int64)
	for i := int64(0); i < 20000; i++ {
		if i == 0 {
			line = here() + 2
		}
		big[i] = i // crosses 4096 entries at a table split
	}
	return line
}

func bloat() (line int) {
	line = here() + 1
	clear(big)
	return line
}

func missingDelete() (line int) {
	m := map[string]int{"a": 1}
	line = here() + 1
	delete(m, "b")
	return line
}

func nilDelete() (line int) {
	var m map[int64]bool
	line = here() + 1
	delete(m, 1)
	return line
}

var shared = map[int32]int{}

// sharedWrite writes shared right after another goroutine did.
func sharedWrite() (line int) {
	done := make(chan struct{})
	go func() { shared[1] = 1; close(done) }()
	<-done
	line = here() + 1
	shared[2] = 2
	return line
}

// here returns its caller's line.
func here() int {
	_, _, line, _ := runtime.Caller(1)
	return line
}
