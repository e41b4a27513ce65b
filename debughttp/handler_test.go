package debughttp_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mapguard/mapguard"
	"github.com/mapguard/mapguard/debughttp"
)

type setup struct {
	g    *mapguard.Guard
	fake *mapguard.Fake
	h    *debughttp.Handler
	srv  *httptest.Server

	dispatched chan struct{} // one per event, after the handler saw it
}

func newSetup(t *testing.T, opts debughttp.Options) *setup {
	t.Helper()
	fake := mapguard.NewFake()
	g, err := mapguard.New(mapguard.Options{Probe: fake})
	if err != nil {
		t.Fatal(err)
	}
	if opts.ReadCrashReports == nil {
		opts.ReadCrashReports = func() ([]mapguard.Event, error) { return nil, errors.New("no bpffs here") }
	}
	h := debughttp.New(g, opts)
	dispatched := make(chan struct{}, 1024)
	g.OnEvent(func(mapguard.Event) { dispatched <- struct{}{} })
	if err := g.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/debug/mapguard/", h)
	srv := httptest.NewServer(mux)
	t.Cleanup(func() {
		h.Close()
		srv.Close()
		g.Close()
	})
	return &setup{g, fake, h, srv, dispatched}
}

// emit delivers evs and waits until the Guard has dispatched them.
func (s *setup) emit(t *testing.T, evs ...mapguard.Event) {
	t.Helper()
	for _, ev := range evs {
		if !s.fake.Emit(ev) {
			t.Fatal("not delivered")
		}
	}
	for range evs {
		<-s.dispatched
	}
}

func getJSON(t *testing.T, url string, v any) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
}

var bugSite = mapguard.Frame{Function: "main.handle", File: "/src/app/main.go", Line: 42}

func TestDocuments(t *testing.T) {
	s := newSetup(t, debughttp.Options{MaxSites: 2})
	s.emit(t,
		mapguard.Event{Kind: mapguard.NilMapWrite, Site: bugSite, MapType: "map[string]int"},
		mapguard.Event{Kind: mapguard.NilMapWrite, Site: bugSite, MapType: "map[string]int"},
		mapguard.Event{Kind: mapguard.MissingKeyRead, Site: mapguard.Frame{Function: "main.get", File: "/src/app/get.go", Line: 7}, Count: 5},
		mapguard.Event{Kind: mapguard.NilMapRead, Site: mapguard.Frame{Function: "main.a", File: "/src/app/a.go", Line: 1}},
		mapguard.Event{Kind: mapguard.PreviousCrash, PID: 1234, Detail: "concurrent map writes", Site: bugSite},
	)
	base := s.srv.URL + "/debug/mapguard/"

	var st debughttp.Stats
	getJSON(t, base+"stats", &st)
	if st.Events["nil-map-write"] != 2 || st.Events["missing-key-read"] != 1 {
		t.Errorf("stats events = %v", st.Events)
	}
	if _, ok := st.Events["shared-writers"]; !ok {
		t.Errorf("stats lists no shared-writers count: %v", st.Events)
	}

	var sites debughttp.Sites
	getJSON(t, base+"sites", &sites)
	if len(sites.Calls) != 3 {
		t.Fatalf("sites: %d calls, want 2 and other: %+v", len(sites.Calls), sites.Calls)
	}
	if c := sites.Calls[0]; c.Kind != "missing-key-read" || c.Count != 5 {
		t.Errorf("top call site %+v, want missing-key-read with count 5", c)
	}
	if c := sites.Calls[1]; c.Kind != "nil-map-write" || c.Count != 2 || c.Site.Line != 42 || c.MapType != "map[string]int" {
		t.Errorf("second call site %+v", c)
	}
	if c := sites.Calls[2]; c.Site.Function != "other" || c.Count != 2 {
		t.Errorf("other %+v, want the two single events", c)
	}

	var cr debughttp.Crashes
	getJSON(t, base+"crashes", &cr)
	if len(cr.Reports) != 1 || cr.Reports[0].PID != 1234 || cr.Reports[0].Detail != "concurrent map writes" {
		t.Errorf("crashes %+v", cr.Reports)
	}
	if cr.Error != "no bpffs here" {
		t.Errorf("crashes error %q", cr.Error)
	}

	resp, err := http.Get(base)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") {
		t.Errorf("index: %s %s", resp.Status, resp.Header.Get("Content-Type"))
	}
	for _, c := range []struct {
		method, path string
		want         int
	}{
		{"GET", "nonsense", 404},
		{"POST", "stats", 405},
		{"DELETE", "crashes", 405},
		{"GET", "events?kind=no-such-kind", 400},
		{"GET", "events?since=yesterday", 400},
	} {
		req, _ := http.NewRequest(c.method, base+c.path, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != c.want {
			t.Errorf("%s %s: %d, want %d", c.method, c.path, resp.StatusCode, c.want)
		}
	}
}

// stream is an SSE client of the events endpoint.
type stream struct {
	resp   *http.Response
	events chan debughttp.Event
	named  chan string
}

func watch(t *testing.T, url string) *stream {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("GET %s: %s %s", url, resp.Status, resp.Header.Get("Content-Type"))
	}
	s := &stream{resp: resp, events: make(chan debughttp.Event, 100), named: make(chan string, 100)}
	t.Cleanup(func() { resp.Body.Close() })
	go func() {
		defer close(s.events)
		sc := bufio.NewScanner(resp.Body)
		name := ""
		for sc.Scan() {
			line := sc.Text()
			switch {
			case strings.HasPrefix(line, "event: "):
				name = line[len("event: "):]
				s.named <- name
			case strings.HasPrefix(line, "data: ") && name != "dropped":
				var ev debughttp.Event
				if err := json.Unmarshal([]byte(line[len("data: "):]), &ev); err != nil {
					t.Errorf("bad event %q: %v", line, err)
					return
				}
				s.events <- ev
			}
		}
	}()
	return s
}

func (s *stream) next(t *testing.T) debughttp.Event {
	t.Helper()
	ev, ok := <-s.events
	if !ok {
		t.Fatal("stream ended")
	}
	return ev
}

// waitWatchers waits until n streams are registered.
func waitWatchers(t *testing.T, base string, n int) {
	t.Helper()
	for range 200 {
		var st debughttp.Stats
		getJSON(t, base+"stats", &st)
		if st.Watchers == n {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("never %d watchers", n)
}

func TestConcurrentWatchersGetTheSameEvents(t *testing.T) {
	s := newSetup(t, debughttp.Options{})
	base := s.srv.URL + "/debug/mapguard/"
	all1 := watch(t, base+"events")
	all2 := watch(t, base+"events")
	writes := watch(t, base+"events?kind=nil-map-write,map-growth")
	waitWatchers(t, base, 3)

	evs := []mapguard.Event{
		{Kind: mapguard.NilMapWrite, Site: bugSite, Goroutine: 1},
		{Kind: mapguard.NilMapRead, Site: bugSite, Goroutine: 2},
		{Kind: mapguard.MapGrowth, Site: bugSite, Goroutine: 3, Len: 1 << 20},
	}
	s.emit(t, evs...)
	for _, w := range []*stream{all1, all2} {
		for _, want := range evs {
			if got := w.next(t); got.Kind != want.Kind.String() || got.Goroutine != want.Goroutine || got.Text != want.String() {
				t.Errorf("got %+v, want %v", got, want)
			}
		}
	}
	for _, g := range []uint64{1, 3} {
		if got := writes.next(t); got.Goroutine != g {
			t.Errorf("filtered stream: goroutine %d, want %d", got.Goroutine, g)
		}
	}
}

func TestSinceReplaysRecentEvents(t *testing.T) {
	s := newSetup(t, debughttp.Options{})
	base := s.srv.URL + "/debug/mapguard/"
	s.emit(t,
		mapguard.Event{Kind: mapguard.NilMapWrite, Time: time.Now().Add(-time.Hour), Goroutine: 1},
		mapguard.Event{Kind: mapguard.NilMapWrite, Time: time.Now().Add(-time.Second), Goroutine: 2},
		mapguard.Event{Kind: mapguard.NilMapRead, Time: time.Now().Add(-time.Second), Goroutine: 3},
	)
	w := watch(t, base+"events?since=1m&kind=nil-map-write")
	if ev := w.next(t); ev.Goroutine != 2 {
		t.Errorf("replayed goroutine %d, want 2 (1 is too old, 3 filtered)", ev.Goroutine)
	}
}

// blockingWriter is a ResponseWriter whose body writes block until
// released: a client that stopped reading.
type blockingWriter struct {
	header  http.Header
	release chan struct{}
	mu      sync.Mutex
	body    strings.Builder
	started chan struct{}
	once    sync.Once
}

func (b *blockingWriter) Header() http.Header { return b.header }
func (b *blockingWriter) WriteHeader(int)     {}
func (b *blockingWriter) Flush()              {}
func (b *blockingWriter) Write(p []byte) (int, error) {
	b.once.Do(func() { close(b.started) })
	<-b.release
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.body.Write(p)
}

func TestSlowWatcherIsDroppedAndNeverBlocks(t *testing.T) {
	s := newSetup(t, debughttp.Options{WatcherBuffer: 4})
	base := s.srv.URL + "/debug/mapguard/"
	fast := watch(t, base+"events")

	slow := &blockingWriter{header: http.Header{}, release: make(chan struct{}), started: make(chan struct{})}
	req := httptest.NewRequest("GET", "/debug/mapguard/events", nil)
	served := make(chan struct{})
	go func() { s.h.ServeHTTP(slow, req); close(served) }()
	<-slow.started // stuck writing its greeting
	waitWatchers(t, base, 2)

	// The fast watcher reads each event before the next one comes; the slow
	// one overflows its 4-event buffer. Every emit returns: the Guard's
	// dispatcher is never held up by the slow watcher.
	for i := range 50 {
		s.emit(t, mapguard.Event{Kind: mapguard.NilMapWrite, Goroutine: uint64(i + 1)})
		if ev := fast.next(t); ev.Goroutine != uint64(i+1) {
			t.Fatalf("fast watcher got goroutine %d, want %d", ev.Goroutine, i+1)
		}
	}

	var st debughttp.Stats
	getJSON(t, base+"stats", &st)
	if st.WatchersDropped != 1 || st.Watchers != 1 {
		t.Errorf("watchers %d, dropped %d; want 1 and 1", st.Watchers, st.WatchersDropped)
	}
	close(slow.release)
	<-served
	if !strings.Contains(slow.body.String(), "event: dropped") {
		t.Errorf("the slow stream did not end with a dropped message:\n%s", slow.body.String())
	}
	if st := s.g.Stats(); st.DroppedQueue != 0 {
		t.Errorf("the Guard dropped %d events", st.DroppedQueue)
	}
}

func TestCloseEndsStreams(t *testing.T) {
	s := newSetup(t, debughttp.Options{})
	w := watch(t, s.srv.URL+"/debug/mapguard/events")
	waitWatchers(t, s.srv.URL+"/debug/mapguard/", 1)
	s.h.Close()
	if _, ok := <-w.events; ok {
		t.Error("an event after Close")
	}
}
