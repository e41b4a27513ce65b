//go:build linux && amd64

package mapguard_test

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/mapguard/mapguard"
	"github.com/mapguard/mapguard/internal/testutil"
)

// mapHeavy is a healthy map workload: reads that hit and miss, writes and
// deletes on non-empty maps with string and integer keys.
func mapHeavy(b *testing.B) {
	strs := make(map[string]int, 1024)
	ints := make(map[int64]int, 1024)
	keys := make([]string, 1024)
	for i := range keys {
		keys[i] = "key-" + strconv.Itoa(i)
		strs[keys[i]] = i
		ints[int64(i)] = i
	}
	b.ResetTimer()
	n := 0
	for i := 0; b.Loop(); i++ {
		k := keys[i&1023]
		strs[k] = i
		n += strs[keys[(i*7)&1023]]
		n += ints[int64(i&2047)] // half of these miss
		ints[int64(i&1023)] = n
		if _, ok := strs["absent"]; ok {
			n++
		}
	}
	sink = n
}

// BenchmarkMapHeavy compares a healthy map workload with no Guard and with
// the default Guard: the default probes sit on branches healthy operations
// never take, so the two should match.
func BenchmarkMapHeavy(b *testing.B) {
	b.Run("guard=none", mapHeavy)
	b.Run("guard=default", func(b *testing.B) {
		g := startReal(b, mapguard.Options{})
		mapHeavy(b)
		b.StopTimer()
		reportHits(b, g)
	})
}

// BenchmarkDetection is the cost of one detected misuse: a nil-map write and
// its recovered panic, without and with the Guard.
func BenchmarkDetection(b *testing.B) {
	write := func(b *testing.B) {
		for b.Loop() {
			func() {
				defer func() { recover() }()
				var m map[string]int
				m["k"] = 1
			}()
		}
	}
	b.Run("guard=none", write)
	b.Run("guard=default", func(b *testing.B) {
		g := startReal(b, mapguard.Options{SiteRateLimit: -1, BufferSize: 1 << 16})
		write(b)
		b.StopTimer()
		reportHits(b, g)
	})
}

// BenchmarkStartClose measures Start (find sites, load, attach, canary) and
// Close (detach everything) with the default kinds.
func BenchmarkStartClose(b *testing.B) {
	testutil.RequirePrivileged(b)
	var start, stop time.Duration
	for b.Loop() {
		g, _ := mapguard.New(mapguard.Options{})
		t0 := time.Now()
		if err := g.Start(context.Background()); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		g.Close()
		start += t1.Sub(t0)
		stop += time.Since(t1)
	}
	b.ReportMetric(float64(start.Milliseconds())/float64(b.N), "start-ms")
	b.ReportMetric(float64(stop.Milliseconds())/float64(b.N), "close-ms")
}

func reportHits(b *testing.B, g *mapguard.Guard) {
	var hits uint64
	for _, s := range g.Stats().Sites {
		hits += s.Hits
	}
	b.ReportMetric(float64(hits)/float64(b.N), "hits/op")
}
