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

var sink any

func main() {
	res := Result{GoVersion: runtime.Version()}
	defer func() {
		json.NewEncoder(os.Stdout).Encode(res)
	}()
	g, err := mapguard.New(mapguard.Options{})
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
	events := g.Events()

	for _, provoke := range []func() int{nilWrite, nestedRead} {
		var goid uint64
		var line int
		done := make(chan struct{})
		go func() {
			defer close(done)
			goid = rt.GoID()
			line = provoke()
		}()
		<-done
		select {
		case ev := <-events:
			res.Events = append(res.Events, Event{
				Kind: ev.Kind.String(), Function: ev.Site.Function, File: ev.Site.File,
				MapType: ev.MapType, Line: ev.Site.Line, WantLine: line, GoroutineOK: ev.Goroutine == goid,
			})
		case <-time.After(5 * time.Second):
			res.Error = "no event within 5s"
			return
		}
	}
	st := g.Stats()
	res.Sites = len(st.Sites)
	for _, in := range st.Inactive {
		res.Inactive = append(res.Inactive, in.Function+": "+in.Reason)
	}
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

// here returns its caller's line.
func here() int {
	_, _, line, _ := runtime.Caller(1)
	return line
}
