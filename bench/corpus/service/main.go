// Command service is the precision corpus's HTTP JSON service: a small order
// API with four seeded map bugs, each marked by a "seed:" comment naming the
// kinds that report it. The corpus harness (bench/corpus) runs it off and with
// a Guard, drives it with a loopback load generator, and checks that each seed
// is reported at its line.
//
//	service -addr 127.0.0.1:0 -mode default -events out.jsonl  # serve
//	service -crash -events out.jsonl                            # die of concurrent map writes
//
// It prints "ready ADDR" once it listens (and its Guard has started), and
// stops on SIGTERM or SIGINT.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/mapguard/mapguard/bench/corpus/record"
)

type item struct {
	SKU string `json:"sku"`
	Qty int    `json:"qty"`
}

type order struct {
	ID     uint64 `json:"id"`
	User   string `json:"user"`
	Items  []item `json:"items"`
	Coupon string `json:"coupon,omitempty"`
}

type receipt struct {
	ID        uint64             `json:"id"`
	Total     float64            `json:"total"`
	Lines     map[string]float64 `json:"lines"`
	Discounts map[string]float64 `json:"discounts,omitempty"` // nil unless a coupon applies
}

var prices = map[string]float64{"apple": 0.5, "pear": 0.75, "fig": 1.25, "kiwi": 0.3, "plum": 0.6}

var coupons = map[string]float64{"SPRING": 0.1, "VIP": 0.2}

// limits is a quota per region and plan; a region missing from it makes
// limits[region] a nil map.
var limits = map[string]map[string]int{
	"eu": {"free": 10, "pro": 100},
	"us": {"free": 20, "pro": 200},
}

var (
	mu      sync.Mutex
	perUser = map[string]int{}
	// receipts is the unbounded cache: every order's total, never evicted.
	receipts = map[uint64]float64{}
)

func remember(id uint64, total float64) {
	receipts[id] = total // seed: map-growth
}

func handleOrder(w http.ResponseWriter, r *http.Request) {
	var o order
	if err := json.NewDecoder(r.Body).Decode(&o); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	rc := receipt{ID: o.ID, Lines: make(map[string]float64, len(o.Items))}
	for _, it := range o.Items {
		p, ok := prices[it.SKU]
		if !ok {
			http.Error(w, "unknown sku "+it.SKU, http.StatusBadRequest)
			return
		}
		rc.Lines[it.SKU] += p * float64(it.Qty)
		rc.Total += p * float64(it.Qty)
	}
	if pct, ok := coupons[o.Coupon]; ok {
		rc.Discounts[o.Coupon] = pct * rc.Total // seed: nil-map-write
		rc.Total -= pct * rc.Total
	}
	mu.Lock()
	perUser[o.User]++
	remember(o.ID, rc.Total)
	mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(rc)
}

func handleLimit(w http.ResponseWriter, r *http.Request) {
	region, plan := r.URL.Query().Get("region"), r.URL.Query().Get("plan")
	quota := limits[region][plan] // seed: nested-map-miss nil-map-read
	w.Header().Set("Content-Type", "application/json")
	fmt.Fprintf(w, "{\"quota\":%d}\n", quota)
}

// handleGrow inserts n entries into the unbounded cache through remember, as
// many orders would.
func handleGrow(w http.ResponseWriter, r *http.Request) {
	n, _ := strconv.Atoi(r.URL.Query().Get("n"))
	mu.Lock()
	base := uint64(len(receipts)) + 1<<40
	for i := 0; i < n; i++ {
		remember(base+uint64(i), 1)
	}
	size := len(receipts)
	mu.Unlock()
	fmt.Fprintf(w, "{\"entries\":%d}\n", size)
}

// crash dies of "concurrent map writes": two goroutines write one map.
func crash() {
	m := map[int]int{}
	for g := 0; g < 2; g++ {
		go func() {
			for i := 0; ; i++ {
				m[i%1024] = i // seed: concurrent-misuse previous-crash
			}
		}()
	}
	select {}
}

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address")
	mode := flag.String("mode", record.Default, "off, default or deep")
	events := flag.String("events", "", "append the Guard's records (JSON lines) to this file")
	crashNow := flag.Bool("crash", false, "start the Guard, then die of concurrent map writes")
	toggle := flag.Duration("toggle", 0, "start a Guard of -mode, close it after this long, wait as long, and again (see record.Toggle)")
	flag.Parse()

	var requests atomic.Int64
	var stop func()
	if *toggle > 0 {
		stop = record.Toggle(*mode, *events, *toggle, requests.Load)
	} else {
		stop = record.Start(*mode, *events)
	}
	if *crashNow {
		crash()
	}
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/order", handleOrder)
	mux.HandleFunc("/limit", handleLimit)
	mux.HandleFunc("/grow", handleGrow)
	count := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		mux.ServeHTTP(w, r)
	})
	srv := &http.Server{Handler: count, ErrorLog: log.New(io.Discard, "", 0)}
	go srv.Serve(ln)
	fmt.Printf("ready %s\n", ln.Addr())

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	srv.Close()
	stop()
}
