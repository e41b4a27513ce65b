// Command downgrade is an HTTP service that watches its own maps and
// switches itself to a degraded mode after repeated nil-map writes.
//
// A handler bug writes to a nil map on some requests. net/http recovers the
// panic per request, so the bug is invisible in the service's own metrics;
// mapguard sees every one of them and feeds them to a mapguard.Breaker.
// After -trip of them within -window the breaker trips, and the service
// stops calling the buggy code path and serves a fallback instead, until
// -cooldown has passed and the breaker resets.
//
// Operators see it too: a debug listener (-debug-addr, loopback by default,
// like net/http/pprof's) serves /metrics (the Prometheus collector of
// contrib/mapguardprom) and /debug/mapguard/ (package debughttp, which
// kubectl-mapguard reads). The example is a module of its own so that the
// Prometheus client stays out of mapguard's core module. Run it as root,
// from this directory:
//
//	go run .            # serve on 127.0.0.1:8080, debug on 127.0.0.1:6060
//	go run . -demo      # send requests to itself, print what happens and the metrics, exit
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/mapguard/mapguard"
	"github.com/mapguard/mapguard/contrib/mapguardprom"
	"github.com/mapguard/mapguard/debughttp"
)

// main wires the demo service together in one place (Guard, breaker, handlers, metrics).
func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "listen address")
	debugAddr := flag.String("debug-addr", "127.0.0.1:6060", "debug listen address (/metrics, /debug/mapguard/); keep it off public interfaces")
	trip := flag.Int("trip", 3, "nil-map writes within -window that trip the breaker")
	window := flag.Duration("window", 10*time.Second, "window for -trip")
	cooldown := flag.Duration("cooldown", 30*time.Second, "how long to stay degraded")
	demo := flag.Bool("demo", false, "send requests to itself on a loopback port, print, and exit")
	flag.Parse()

	// The breaker is the downgrade switch: it trips after -trip nil-map
	// writes within -window, and resets -cooldown later.
	b, err := mapguard.NewBreaker(mapguard.BreakerConfig{
		Kinds:    []mapguard.Kind{mapguard.NilMapWrite},
		Trip:     *trip,
		Window:   *window,
		Cooldown: *cooldown,
		OnTrip: func(ev mapguard.Event) {
			log.Printf("downgraded for %v: %d nil-map writes within %v, last %v", *cooldown, *trip, *window, ev)
		},
		OnReset: func() { log.Print("restored: serving live stats again") },
	})
	if err != nil {
		log.Fatal(err)
	}

	g, err := mapguard.New(mapguard.Options{})
	if err != nil {
		log.Fatal(err)
	}
	// The debug mux: one line per integration. The handler is created
	// before Start, so that it sees the report of an earlier crash.
	reg := prometheus.NewRegistry()
	reg.MustRegister(mapguardprom.NewCollector(g, mapguardprom.Options{}), collectors.NewGoCollector())
	debug := debughttp.New(g, debughttp.Options{})
	debugMux := http.NewServeMux()
	debugMux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	debugMux.Handle("/debug/mapguard/", debug)

	if err := g.Start(context.Background()); err != nil {
		// The service runs on without the breaker: mapguard never takes
		// the host down with it.
		log.Printf("mapguard off: %v", err)
	}
	defer g.Close()
	g.OnEvent(b.Observe)

	mux := http.NewServeMux()
	mux.HandleFunc("/stats", func(w http.ResponseWriter, r *http.Request) {
		if b.Tripped() {
			fmt.Fprintln(w, "degraded: cached stats")
			return
		}
		fmt.Fprintln(w, "stats:", computeStats(r.URL.Query().Get("user")))
	})
	srv := &http.Server{Handler: mux, ErrorLog: log.New(io.Discard, "", 0)}

	debugSrv := &http.Server{Handler: debugMux}
	debugSrv.RegisterOnShutdown(debug.Close) // ends the event streams

	listen, debugListen := *addr, *debugAddr
	if *demo {
		listen, debugListen = "127.0.0.1:0", "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		log.Fatal(err)
	}
	debugLn, err := net.Listen("tcp", debugListen)
	if err != nil {
		log.Fatal(err)
	}
	go debugSrv.Serve(debugLn)
	defer debugSrv.Shutdown(context.Background())
	if !*demo {
		log.Printf("serving on http://%s/stats?user=alice (user=bob hits the bug)", ln.Addr())
		log.Printf("debug: http://%s/metrics and http://%[1]s/debug/mapguard/", debugLn.Addr())
		log.Fatal(srv.Serve(ln))
	}
	go srv.Serve(ln)
	defer srv.Close()
	runDemo("http://"+ln.Addr().String(), "http://"+debugLn.Addr().String(), b)
}

// computeStats has the bug: users without a profile get a nil inner map,
// and the write to it panics.
func computeStats(user string) int {
	profiles := map[string]map[string]int{"alice": {"visits": 1}}
	profile := profiles[user] // nil for unknown users
	profile["visits"]++       // panics for unknown users; net/http recovers
	return profile["visits"]
}

func runDemo(base, debugBase string, b *mapguard.Breaker) {
	for i, user := range []string{"alice", "bob", "bob", "bob", "alice", "bob"} {
		resp, err := http.Get(base + "/stats?user=" + user)
		status := "connection reset (handler panicked)"
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			status = fmt.Sprintf("%d %q", resp.StatusCode, body)
		}
		fmt.Printf("request %d user=%-5s -> %s\n", i+1, user, status)
		time.Sleep(300 * time.Millisecond) // events reach the callback within about 100 ms
	}
	if !b.Tripped() {
		fmt.Println("the breaker did not trip")
		os.Exit(1)
	}
	fmt.Println("the service is degraded and still serving")

	fmt.Printf("\n$ curl -s %s/metrics | grep -E '^mapguard_(events_total\\{kind=\"nil-map-write\"|dropped|probe_sites)'\n", debugBase)
	metrics := get(debugBase + "/metrics")
	found := false
	for _, l := range strings.Split(metrics, "\n") {
		if strings.HasPrefix(l, `mapguard_events_total{kind="nil-map-write"}`) || strings.HasPrefix(l, "mapguard_dropped") || strings.HasPrefix(l, "mapguard_probe_sites") {
			fmt.Println(l)
			found = found || strings.HasPrefix(l, `mapguard_events_total{kind="nil-map-write"}`) && !strings.HasSuffix(l, " 0")
		}
	}
	if !found {
		fmt.Println("/metrics did not count the nil-map writes")
		os.Exit(1)
	}
	fmt.Printf("\n$ curl -s %s/debug/mapguard/sites  (the call sites, first lines)\n", debugBase)
	sites := strings.Split(get(debugBase+"/debug/mapguard/sites"), "\n")
	fmt.Println(strings.Join(sites[:min(len(sites), 14)], "\n"))
}

func get(u string) string {
	resp, err := http.Get(u)
	if err != nil {
		log.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		log.Fatal(err)
	}
	return string(b)
}
