package debughttp_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"runtime"
	"testing"

	"github.com/mapguard/mapguard"
	"github.com/mapguard/mapguard/debughttp"
	"github.com/mapguard/mapguard/internal/testutil"
)

//go:noinline
func writeNil() (line int) {
	defer func() { recover() }()
	var m map[string]int
	_, _, line, _ = runtime.Caller(0)
	m["x"] = 1 // line + 1
	return
}

// A real Guard's nil-map write reaches a stream with its call site.
func TestStreamsRealEvents(t *testing.T) {
	testutil.RequirePrivileged(t)
	g, err := mapguard.New(mapguard.Options{})
	if err != nil {
		t.Fatal(err)
	}
	h := debughttp.New(g, debughttp.Options{})
	if err := g.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/debug/mapguard/", h)
	srv := httptest.NewServer(mux)
	t.Cleanup(func() { h.Close(); srv.Close(); g.Close() })

	w := watch(t, srv.URL+"/debug/mapguard/events?kind=nil-map-write")
	waitWatchers(t, srv.URL+"/debug/mapguard/", 1)
	line := writeNil() + 1
	ev := w.next(t)
	if ev.Site.Line != line || ev.MapType != "map[string]int" {
		t.Errorf("got %+v, want a write at line %d", ev, line)
	}
	var st debughttp.Stats
	getJSON(t, srv.URL+"/debug/mapguard/stats", &st)
	if st.Events["nil-map-write"] < 1 || st.ProbeSites["armed"] == 0 {
		t.Errorf("stats %+v", st)
	}
}
