// Package child measures, inside the program that imports it, what a
// Guard's Start and Close cost: wall time, and resident memory read from
// /proc/self/status (VmRSS, and VmHWM for the peak, reset before Start).
//
// Main prints one line of JSON (see Result) and exits 0, or prints the
// error and exits 1. With MAPGUARD_BENCH_SMAPS=1 it also prints to stderr
// the mappings whose resident size grew by 64 kB or more from before Start
// to its peak and to after Close. With MAPGUARD_BENCH_PROFILE=dir it also writes a CPU
// profile of Start (dir/cpu.pprof) and a heap profile taken right after
// Start (dir/heap.pprof).
package child

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"runtime/pprof"
	"strconv"
	"syscall"
	"time"

	"github.com/go-logr/logr/funcr"

	"github.com/mapguard/mapguard"
)

// Result is what Main prints. Memory is in bytes.
type Result struct {
	StartNs int64 `json:"start_ns"`
	CloseNs int64 `json:"close_ns"`
	// CPU time (user and system, all threads) Start and Close took: on a
	// busy machine, wall time mostly measures the wait for a core.
	StartCPUNs int64 `json:"start_cpu_ns"`
	CloseCPUNs int64 `json:"close_cpu_ns"`
	// RSS before Start, its peak during Start, right after Start, right
	// after Close, and after Close, a GC and debug.FreeOSMemory.
	RSSBefore   int64 `json:"rss_before"`
	RSSPeak     int64 `json:"rss_peak"`
	RSSStarted  int64 `json:"rss_started"`
	RSSClosed   int64 `json:"rss_closed"`
	RSSClosedGC int64 `json:"rss_closed_gc"`
	// Size of the executable.
	ExeBytes int64 `json:"exe_bytes"`
	// Heap bytes Start allocated (live or not): what the garbage
	// collector must take back, and what makes the heap grow until it
	// does.
	StartAllocBytes int64 `json:"start_alloc_bytes"`
}

// Main measures one Start and one Close of a Guard with the default
// options.
func Main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "startup:", err)
		os.Exit(1)
	}
}

// run is one measured Start and Close, step by step, in the order they happen.
func run() error {
	var r Result
	if st, err := os.Stat("/proc/self/exe"); err == nil {
		r.ExeBytes = st.Size()
	}
	profDir := os.Getenv("MAPGUARD_BENCH_PROFILE")
	// Settle what the program's own start-up left behind, so that only the
	// Guard's memory shows.
	runtime.GC()
	debug.FreeOSMemory()
	var err error
	if r.RSSBefore, err = status("VmRSS"); err != nil {
		return err
	}
	smaps := os.Getenv("MAPGUARD_BENCH_SMAPS") != ""
	var before map[string]int64
	if smaps {
		before = mappingRSS()
	}
	// Writing 5 to clear_refs resets VmHWM to the current RSS.
	if err := os.WriteFile("/proc/self/clear_refs", []byte("5"), 0); err != nil {
		return fmt.Errorf("reset peak RSS: %w", err)
	}
	if profDir != "" {
		f, err := os.Create(filepath.Join(profDir, "cpu.pprof"))
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
	}

	var opts mapguard.Options
	if os.Getenv("MAPGUARD_BENCH_LOG") != "" {
		opts.Logger = funcr.New(func(prefix, args string) { fmt.Fprintln(os.Stderr, prefix, args) }, funcr.Options{Verbosity: 4})
	}
	g, err := mapguard.New(opts)
	if err != nil {
		return err
	}
	a0, c0, t0 := heapAllocs(), cpuTime(), time.Now()
	if err := g.Start(context.Background()); err != nil {
		return err
	}
	r.StartNs = int64(time.Since(t0))
	r.StartCPUNs = cpuTime() - c0
	r.StartAllocBytes = heapAllocs() - a0
	if profDir != "" {
		pprof.StopCPUProfile()
	}
	if r.RSSPeak, err = status("VmHWM"); err != nil {
		return err
	}
	if smaps {
		printGrowth("started", before, mappingRSS())
	}
	if r.RSSStarted, err = status("VmRSS"); err != nil {
		return err
	}
	if profDir != "" {
		f, err := os.Create(filepath.Join(profDir, "heap.pprof"))
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
			return err
		}
	}

	c1, t1 := cpuTime(), time.Now()
	if err := g.Close(); err != nil {
		return err
	}
	r.CloseNs = int64(time.Since(t1))
	r.CloseCPUNs = cpuTime() - c1
	if r.RSSClosed, err = status("VmRSS"); err != nil {
		return err
	}
	runtime.GC()
	debug.FreeOSMemory()
	if r.RSSClosedGC, err = status("VmRSS"); err != nil {
		return err
	}
	if smaps {
		printGrowth("closed-gc", before, mappingRSS())
	}
	return json.NewEncoder(os.Stdout).Encode(r)
}

// heapAllocs returns the bytes allocated on the heap so far.
func heapAllocs() int64 {
	s := []metrics.Sample{{Name: "/gc/heap/allocs:bytes"}}
	metrics.Read(s)
	return int64(s[0].Value.Uint64())
}

// cpuTime returns the process's user and system CPU time in nanoseconds.
func cpuTime() int64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return ru.Utime.Nano() + ru.Stime.Nano()
}

// status returns a "kB" field of /proc/self/status, in bytes.
func status(field string) (int64, error) {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name, val, ok := bytes.Cut(sc.Bytes(), []byte(":"))
		if !ok || string(name) != field {
			continue
		}
		kb, err := strconv.ParseInt(string(bytes.TrimSuffix(bytes.TrimSpace(val), []byte(" kB"))), 10, 64)
		if err != nil {
			return 0, fmt.Errorf("parse %s: %w", field, err)
		}
		return kb << 10, nil
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("no %s in /proc/self/status", field)
}

// mappingRSS returns the resident size of each mapping in
// /proc/self/smaps, by its header line without the address range's end
// (heap arenas keep their start as they grow).
func mappingRSS() map[string]int64 {
	m := map[string]int64{}
	data, err := os.ReadFile("/proc/self/smaps")
	if err != nil {
		return m
	}
	var cur string
	for _, line := range bytes.Split(data, []byte("\n")) {
		f := bytes.Fields(line)
		if len(f) >= 5 && bytes.Contains(f[0], []byte("-")) && !bytes.HasSuffix(f[0], []byte(":")) {
			start, _, _ := bytes.Cut(f[0], []byte("-"))
			name := ""
			if len(f) >= 6 {
				name = string(f[5])
			}
			cur = string(start) + " " + string(f[1]) + " " + name
			continue
		}
		if len(f) == 3 && string(f[0]) == "Rss:" {
			kb, _ := strconv.ParseInt(string(f[1]), 10, 64)
			m[cur] += kb << 10
		}
	}
	return m
}

func printGrowth(when string, before, after map[string]int64) {
	for k, v := range after {
		if d := v - before[k]; d >= 64<<10 {
			fmt.Fprintf(os.Stderr, "%s: +%d kB %s\n", when, d>>10, k)
		}
	}
}
