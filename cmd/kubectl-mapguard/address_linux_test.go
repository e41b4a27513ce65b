package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

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

// syncBuffer is a bytes.Buffer safe to read while run writes it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// serveRealGuard runs a real Guard with the debug handler on a loopback
// port: the service kubectl-mapguard --address reads.
func serveRealGuard(t *testing.T) (address string, h *debughttp.Handler) {
	t.Helper()
	testutil.RequirePrivileged(t)
	g, err := mapguard.New(mapguard.Options{})
	if err != nil {
		t.Fatal(err)
	}
	h = debughttp.New(g, debughttp.Options{})
	if err := g.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/debug/mapguard/", h)
	srv := httptest.NewServer(mux)
	t.Cleanup(func() { h.Close(); srv.Close(); g.Close() })
	return strings.TrimPrefix(srv.URL, "http://"), h
}

func runOK(t *testing.T, args ...string) string {
	t.Helper()
	var out, errOut bytes.Buffer
	if code := run(context.Background(), args, &out, &errOut); code != 0 {
		t.Fatalf("%q: exit %d: %s", args, code, errOut.String())
	}
	return out.String()
}

func TestAddressModeAgainstRealGuard(t *testing.T) {
	addr, _ := serveRealGuard(t)

	// watch: started first, prints the write provoked after it connected.
	var out, errOut syncBuffer
	done := make(chan int)
	go func() {
		done <- run(context.Background(), []string{"watch", "--address", addr, "--kind", "nil-map-write", "--count", "1"}, &out, &errOut)
	}()
	for i := 0; ; i++ {
		var st debughttp.Stats
		if err := json.Unmarshal([]byte(runOK(t, "stats", "--address", addr, "-o", "json")), &st); err != nil {
			t.Fatal(err)
		}
		if st.Watchers == 1 {
			break
		}
		if i == 500 {
			t.Fatal("watch never connected: " + errOut.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	line := writeNil() + 1
	if code := <-done; code != 0 {
		t.Fatalf("watch: exit %d: %s", code, errOut.String())
	}
	t.Logf("watch:\n%s", out.String())
	want := "address_linux_test.go:" + strconv.Itoa(line)
	if !strings.Contains(out.String(), "nil-map-write") || !strings.Contains(out.String(), want) || !strings.Contains(out.String(), "map[string]int") {
		t.Errorf("watch printed %q; want the nil-map-write at %s", out.String(), want)
	}

	// stats: what the Guard holds.
	stats := runOK(t, "stats", "--address", addr)
	t.Logf("stats:\n%s", stats)
	if !regexpMatch(`(?m)^nil-map-write\s+1$`, stats) || !strings.Contains(stats, "probe sites:") {
		t.Errorf("stats text:\n%s", stats)
	}

	// sites: the call site with its count.
	sites := runOK(t, "sites", "--address", addr, "--kind", "nil-map-write")
	t.Logf("sites:\n%s", sites)
	if !regexpMatch(`(?m)^nil-map-write\s+1\s+.*`+want, sites) {
		t.Errorf("sites text:\n%s", sites)
	}

	// crashes: none in this process; the JSON says so too.
	crashes := runOK(t, "crashes", "--address", addr)
	t.Logf("crashes:\n%s", crashes)
	var cr debughttp.Crashes
	if err := json.Unmarshal([]byte(runOK(t, "crashes", "--address", addr, "-o", "json")), &cr); err != nil {
		t.Fatal(err)
	}
	for _, r := range cr.Reports {
		if r.PID == os.Getpid() {
			t.Errorf("a crash report of this live process: %+v", r)
		}
	}

	// watch --since replays the write.
	replay := runOK(t, "watch", "--address", addr, "--since", "1m", "--count", "1", "-o", "json")
	var ev debughttp.Event
	if err := json.Unmarshal([]byte(replay), &ev); err != nil || ev.Kind != "nil-map-write" || ev.Site.Line != line {
		t.Errorf("watch --since: %v %q", err, replay)
	}
}
