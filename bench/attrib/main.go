// Command attrib measures what a running Guard costs its process, from a
// CPU profile of the process rather than from the Guard's own account:
//
//	go run ./bench/attrib -pid PID [-seconds 10] [-freq 2000]
//
// (as root, with perf installed). It records the process with `perf record
// -g` for the given time, then sorts every sample by its call stack:
//
//   - traps: the kernel's uprobe path (the int3 or debug exception, the
//     uprobe's lookup and handlers, the BPF programs, the single step or the
//     emulation), less the context switches taken on the way back to user
//     space, which are the scheduler's;
//   - guard: the Guard's own goroutines (the code of the first frame that is
//     neither the Go runtime nor a system call wrapper is mapguard's,
//     cilium/ebpf's or golang.org/x/arch's; a callback the dispatcher runs
//     is the program's);
//   - sysmon and gc (the Go runtime's monitor thread and its background
//     mark workers: some of it is the Guard's, which a profile cannot tell
//     apart), and the rest.
//
// Compare traps with the growth of Stats().Budget.Traps (or of the
// metric mapguard_cpu_seconds_total, which adds the Guard's own work) over
// the same seconds: that is how far the governor's account is from what
// the kernel spent. On a loop of 100,000 known emulated traps the trap
// count agreed with the thread's CPU clock within 11%.
package main

import (
	"bufio"
	"bytes"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

func main() {
	pid := flag.Int("pid", 0, "the process to profile")
	seconds := flag.Float64("seconds", 10, "how long to record")
	freq := flag.Int("freq", 2000, "samples a second (perf record -F)")
	data := flag.String("data", "", "read this perf.data instead of recording")
	top := flag.Int("top", 8, "the costliest functions to list in traps and guard")
	flag.Parse()
	if *data == "" {
		if *pid <= 0 {
			fmt.Fprintln(os.Stderr, "attrib: -pid or -data is required")
			os.Exit(2)
		}
		dir, err := os.MkdirTemp("", "attrib")
		if err != nil {
			fail(err)
		}
		defer os.RemoveAll(dir)
		*data = filepath.Join(dir, "perf.data")
		rec := exec.Command("perf", "record", "-g", "-F", strconv.Itoa(*freq), "-o", *data,
			"-p", strconv.Itoa(*pid), "--", "sleep", strconv.FormatFloat(*seconds, 'f', -1, 64))
		rec.Stderr = os.Stderr
		if err := rec.Run(); err != nil {
			fail(fmt.Errorf("perf record: %w", err))
		}
	}
	script := exec.Command("perf", "script", "-i", *data, "-F", "comm,tid,time,period,ip,sym")
	script.Stderr = io.Discard
	out, err := script.StdoutPipe()
	if err != nil {
		fail(err)
	}
	if err := script.Start(); err != nil {
		fail(fmt.Errorf("perf script: %w", err))
	}
	r, err := attribute(out)
	if err != nil {
		fail(err)
	}
	if err := script.Wait(); err != nil {
		fail(fmt.Errorf("perf script: %w", err))
	}
	r.print(os.Stdout, *top)
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "attrib:", err)
	os.Exit(1)
}

// Categories of a sample.
const (
	catTrap = iota
	catGuard
	catSysmon
	catGC
	catOther
	nCats
)

var catNames = [nCats]string{"traps", "guard", "sysmon", "gc", "other"}

// report is what the samples add up to.
type report struct {
	ns          [nCats]int64 // sampled CPU time per category
	samples     int
	first, last float64 // sample times (s)
	leaf        [nCats]map[string]int64
}

// trapFrames are kernel functions only the uprobe path runs in a process
// (names as perf prints them; bpf_prog_ covers the programs).
var trapFrames = []string{
	"asm_exc_int3", "exc_int3", "asm_exc_debug", "exc_debug", "handle_swbp",
	"uprobe_notify_resume", "uprobe_dispatcher", "uprobe_multi_link_handler",
	"uprobe_prog_run", "handler_chain", "arch_uprobe_", "handle_singlestep",
	"uprobe_post_sstep_notifier", "uprobe_pre_sstep_notifier", "bpf_prog_",
}

func isTrap(sym string) bool {
	for _, p := range trapFrames {
		if strings.HasPrefix(sym, p) {
			return true
		}
	}
	return false
}

// guardPackages are the Guard's code and what it alone calls.
var guardPackages = []string{"github.com/mapguard/mapguard", "github.com/cilium/ebpf", "golang.org/x/arch"}

// notGuard are the parts of the module that are programs, not the Guard.
var notGuard = []string{"github.com/mapguard/mapguard/bench/", "github.com/mapguard/mapguard/examples/"}

// passThrough are frames that decide nothing: the Go runtime, system call
// wrappers, and the kernel (a user frame below them decides).
func passThrough(sym string) bool {
	for _, p := range []string{"runtime.", "internal/runtime/", "syscall.", "internal/syscall/", "golang.org/x/sys/", "internal/poll.", "os.", "sync.", "sync/atomic.", "time."} {
		if strings.HasPrefix(sym, p) {
			return true
		}
	}
	return !strings.Contains(sym, ".") || strings.HasPrefix(sym, "[") // kernel symbols, unknown
}

// classify sorts one sample by its stack, innermost frame first.
func classify(stack []string) int {
	trap, sched := false, false
	for _, s := range stack {
		if isTrap(s) {
			trap = true
		}
		if s == "schedule" || s == "__schedule" {
			sched = true
		}
		if strings.HasPrefix(s, "runtime.sysmon") {
			return catSysmon
		}
		if strings.HasPrefix(s, "runtime.gcBgMarkWorker") {
			return catGC
		}
	}
	if trap && !sched {
		return catTrap
	}
	for _, s := range stack {
		if passThrough(s) {
			continue
		}
		for _, p := range notGuard {
			if strings.HasPrefix(s, p) {
				return catOther
			}
		}
		for _, p := range guardPackages {
			if strings.HasPrefix(s, p) {
				return catGuard
			}
		}
		return catOther
	}
	return catOther
}

// attribute reads perf script's output (fields comm,tid,time,period,ip,sym):
// a header line per sample, then its frames (indented), then a blank line.
func attribute(r io.Reader) (*report, error) {
	rep := &report{first: -1}
	for i := range rep.leaf {
		rep.leaf[i] = map[string]int64{}
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	var period int64
	var stack []string
	var t float64
	flush := func() {
		if period == 0 {
			return
		}
		c := classify(stack)
		rep.ns[c] += period
		rep.samples++
		if len(stack) > 0 {
			rep.leaf[c][stack[0]] += period
		}
		if rep.first < 0 || t < rep.first {
			rep.first = t
		}
		rep.last = max(rep.last, t)
		period, stack = 0, stack[:0]
	}
	for sc.Scan() {
		line := sc.Bytes()
		if len(bytes.TrimSpace(line)) == 0 {
			flush()
			continue
		}
		if line[0] != ' ' && line[0] != '\t' {
			flush()
			// "svc 31732 36981.481538:     500000 " (a comm may hold spaces)
			f := strings.Fields(string(line))
			if len(f) < 4 {
				return nil, fmt.Errorf("perf script: unexpected line %q", line)
			}
			f = f[len(f)-3:]
			tt, err1 := strconv.ParseFloat(strings.TrimSuffix(f[1], ":"), 64)
			p, err2 := strconv.ParseInt(f[2], 10, 64)
			if err1 != nil || err2 != nil {
				return nil, fmt.Errorf("perf script: unexpected line %q", line)
			}
			t, period = tt, p
			continue
		}
		// "	  22ebe runtime.mallocgc+0x45" or "ffffffff81e876fb release_sock"
		f := strings.Fields(string(line))
		if len(f) >= 2 {
			stack = append(stack, strings.Join(f[1:], " "))
		}
	}
	flush()
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if rep.samples == 0 {
		return nil, fmt.Errorf("no samples: is the process busy, and perf allowed to profile it?")
	}
	return rep, nil
}

func (r *report) print(w io.Writer, top int) {
	var total int64
	for _, n := range r.ns {
		total += n
	}
	span := r.last - r.first
	if span <= 0 {
		span = 1
	}
	fmt.Fprintf(w, "process: %.3f CPUs over %.2f s (%d samples)\n", float64(total)/1e9/span, span, r.samples)
	for c := range nCats {
		fmt.Fprintf(w, "  %-7s %8.2f ms/s  %6.2f%% of the process\n", catNames[c], float64(r.ns[c])/1e6/span, 100*float64(r.ns[c])/float64(total))
	}
	for _, c := range []int{catTrap, catGuard} {
		type kv struct {
			k string
			v int64
		}
		var l []kv
		for k, v := range r.leaf[c] {
			l = append(l, kv{k, v})
		}
		sort.Slice(l, func(i, j int) bool { return l[i].v > l[j].v || l[i].v == l[j].v && l[i].k < l[j].k })
		if len(l) > top {
			l = l[:top]
		}
		if len(l) > 0 {
			fmt.Fprintf(w, "%s, innermost frames:\n", catNames[c])
		}
		for _, e := range l {
			fmt.Fprintf(w, "  %8.2f ms  %s\n", float64(e.v)/1e6, e.k)
		}
	}
}
