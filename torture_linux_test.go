//go:build linux && amd64

package mapguard_test

import (
	"context"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mapguard/mapguard"
	"github.com/mapguard/mapguard/internal/testutil"
)

type bigValue [160]byte // over 128 bytes: the generic map paths

// torture runs mixed map operations over every key shape the runtime
// specialises, with fresh goroutines that grow their stacks and garbage for
// the GC, until stop is closed. Each worker also commits a nil-map write
// every so often and counts it in misuses.
func torture(stop <-chan struct{}, workers int, misuses *atomic.Uint64) *sync.WaitGroup {
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			i32 := map[int32]int{}
			i64 := map[int64]int{}
			str := map[string]int{}
			ptr := map[*int]int{}
			pts := map[point]bigValue{}
			keys := make([]*int, 64)
			for i := range keys {
				keys[i] = new(int)
			}
			var garbage [][]byte
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				k := i % 512
				i32[int32(k)]++
				i64[int64(k)] += i32[int32(k/2)]
				s := string(rune('a'+k%26)) + string(rune('a'+w))
				str[s] = i
				_ = str[s+"x"] // a miss
				ptr[keys[k%64]]++
				pts[point{k, w}] = bigValue{byte(i)}
				//lint:ignore S1033 the lookup and the delete are both map operations under test
				if _, ok := pts[point{k + 1, w}]; ok {
					delete(pts, point{k + 1, w})
				}
				delete(i64, int64(k/3))
				for range str {
					break
				}
				if i%64 == 0 {
					var fresh sync.WaitGroup
					fresh.Add(1)
					go func() { defer fresh.Done(); growAndRead(k % 48) }()
					fresh.Wait()
					garbage = append(garbage, make([]byte, 4096))
					if len(garbage) > 256 {
						garbage = nil
					}
				}
				if i%997 == 0 {
					growAndWrite(0) // a recovered nil-map write
					misuses.Add(1)
				}
			}
		}(w)
	}
	return &wg
}

// growAndRead grows the stack, then reads a non-empty map.
//
//go:noinline
func growAndRead(depth int) int {
	var pad [256]byte
	if depth > 0 {
		return growAndRead(depth-1) + int(pad[depth%256])
	}
	m := map[int64]int{1: 1}
	return m[int64(pad[0])]
}

// TestRealTorture starts and closes a Guard over and over while map-heavy
// load runs: no crash, no goroutine, file descriptor or memory growth across
// cycles, and every site's counters add up.
func TestRealTorture(t *testing.T) {
	testutil.RequirePrivileged(t)
	cycles := 6
	if testing.Short() {
		cycles = 2
	}
	var misuses atomic.Uint64
	stop := make(chan struct{})
	wg := torture(stop, 4, &misuses)
	defer func() { close(stop); wg.Wait() }()

	var (
		goroutines, fds int
		heap            uint64
	)
	for c := 0; c < cycles; c++ {
		g, err := mapguard.New(mapguard.Options{BufferSize: 4096, Budget: 1})
		if err != nil {
			t.Fatal(err)
		}
		beforeStart := misuses.Load()
		if err := g.Start(context.Background()); err != nil {
			t.Fatalf("cycle %d: Start: %v", c, err)
		}
		afterStart := misuses.Load()
		time.Sleep(400 * time.Millisecond)
		beforeClose := misuses.Load()
		if err := g.Close(); err != nil {
			t.Fatal(err)
		}
		afterClose := misuses.Load()
		st := g.Stats()
		for _, s := range st.Sites {
			if s.Hits != s.Events+s.Dropped+s.Filtered+s.Ignored+s.Aggregated {
				t.Errorf("cycle %d: %s: hits %d != events %d + dropped %d + filtered %d + ignored %d + aggregated %d",
					c, s.Function, s.Hits, s.Events, s.Dropped, s.Filtered, s.Ignored, s.Aggregated)
			}
		}
		// Every misuse between Start's return and the call to Close is
		// reported; those during Start or Close may be. Nothing is dropped.
		writes := st.Events[mapguard.NilMapWrite]
		if lo, hi := beforeClose-afterStart, afterClose-beforeStart; writes < lo || writes > hi || st.Dropped != 0 {
			t.Errorf("cycle %d: %d nil-map-write events (%d dropped), want between %d and %d", c, writes, st.Dropped, lo, hi)
		}

		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		if c == 1 {
			goroutines, fds, heap = runtime.NumGoroutine(), testutil.OpenFDs(t), ms.HeapInuse
		}
		if c > 1 {
			if n := runtime.NumGoroutine(); n > goroutines+4 {
				t.Errorf("cycle %d: %d goroutines, %d after cycle 1", c, n, goroutines)
			}
			if n := testutil.OpenFDs(t); n > fds {
				t.Errorf("cycle %d: %d fds, %d after cycle 1", c, n, fds)
			}
			if ms.HeapInuse > heap+32<<20 {
				t.Errorf("cycle %d: heap in use %d MiB, %d MiB after cycle 1", c, ms.HeapInuse>>20, heap>>20)
			}
		}
		t.Logf("cycle %d: %d nil-map writes while watched, %d events, %d sites, heap %d MiB, %d goroutines",
			c, beforeClose-afterStart, writes, len(st.Sites), ms.HeapInuse>>20, runtime.NumGoroutine())
	}
}
