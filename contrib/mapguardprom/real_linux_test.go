package mapguardprom

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/mapguard/mapguard"
	"github.com/mapguard/mapguard/internal/testutil"
)

// demoService is a service that runs a real Guard and serves /metrics and
// /bug (a handler that writes to a nil map; net/http recovers the panic) on
// a loopback port.
func demoService(t *testing.T) (base string, g *mapguard.Guard) {
	t.Helper()
	testutil.RequirePrivileged(t)
	g, err := mapguard.New(mapguard.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	reg := prometheus.NewRegistry()
	reg.MustRegister(NewCollector(g, Options{}))
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/bug", func(w http.ResponseWriter, r *http.Request) {
		var visits map[string]int // nil: the bug
		visits[r.URL.Query().Get("user")]++
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: mux, ErrorLog: log.New(io.Discard, "", 0)} // the recovered panics
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return "http://" + ln.Addr().String(), g
}

func get(t *testing.T, u string) (string, error) {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

var nilWriteSeries = regexp.MustCompile(`(?m)^mapguard_events_total\{kind="nil-map-write"\} (\d+)$`)

// scrapeNilWrites reads the demo's /metrics until its nil-map-write counter
// reaches want (events reach the Guard within about 100 ms), and returns
// the exposition.
func scrapeNilWrites(t *testing.T, base string, want int) string {
	t.Helper()
	var body string
	for range 100 {
		var err error
		body, err = get(t, base+"/metrics")
		if err != nil {
			t.Fatal(err)
		}
		if m := nilWriteSeries.FindStringSubmatch(body); m != nil {
			if n, _ := strconv.Atoi(m[1]); n >= want {
				return body
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("/metrics never counted %d nil-map writes:\n%s", want, body)
	return ""
}

func TestMetricsCountProvokedNilMapWrite(t *testing.T) {
	base, _ := demoService(t)
	for range 3 {
		get(t, base+"/bug?user=bob") // the handler panics; the error is expected
	}
	body := scrapeNilWrites(t, base, 3)
	for _, l := range regexp.MustCompile(`(?m)^mapguard_(events_total\{kind="nil-map-write"\}|probe_sites|dropped_events_total).*$`).FindAllString(body, -1) {
		t.Log(l)
	}
}

// TestPrometheusServerScrapes runs Debian's prometheus against the demo
// service and finds the provoked events in its query API.
func TestPrometheusServerScrapes(t *testing.T) {
	bin, err := exec.LookPath("prometheus")
	if err != nil {
		if os.Getenv("MAPGUARD_REQUIRE_PRIVILEGED") == "1" {
			t.Fatal("no prometheus binary (apt-get install prometheus)")
		}
		t.Skip("no prometheus binary (apt-get install prometheus)")
	}
	base, _ := demoService(t)
	for range 2 {
		get(t, base+"/bug?user=bob")
	}
	scrapeNilWrites(t, base, 2)

	dir := t.TempDir()
	target := base[len("http://"):]
	cfg := fmt.Sprintf("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: demo\n    static_configs:\n      - targets: [%q]\n", target)
	if err := os.WriteFile(filepath.Join(dir, "prometheus.yml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	web := freePort(t)
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, bin,
		"--config.file="+filepath.Join(dir, "prometheus.yml"),
		"--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+web,
		"--log.level=warn")
	logs, err := os.Create(filepath.Join(dir, "prometheus.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		cmd.Wait()
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(dir, "prometheus.log"))
			t.Logf("prometheus log:\n%s", b)
		}
	})

	query := `mapguard_events_total{job="demo",kind="nil-map-write"}`
	var last string
	for range 120 { // scrapes every second; the first one comes after start-up
		time.Sleep(250 * time.Millisecond)
		body, err := get(t, "http://"+web+"/api/v1/query?query="+url.QueryEscape(query))
		if err != nil {
			continue // not listening yet
		}
		last = body
		var r struct {
			Status string
			Data   struct {
				Result []struct {
					Metric map[string]string
					Value  [2]any
				}
			}
		}
		if err := json.Unmarshal([]byte(body), &r); err != nil || r.Status != "success" || len(r.Data.Result) == 0 {
			continue
		}
		v, _ := strconv.ParseFloat(fmt.Sprint(r.Data.Result[0].Value[1]), 64)
		if v >= 2 {
			t.Logf("prometheus query %s: %s", query, body)
			return
		}
	}
	t.Fatalf("prometheus never stored 2 nil-map writes; last answer: %s", last)
}

func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}
