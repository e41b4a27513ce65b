//go:build linux

// Command sysmon shows what goroutines waiting in blocking syscalls cost a
// Go program: the runtime's sysmon thread cannot back off to its long
// sleep while a P is held in a syscall. It runs three modes side by side
// in child processes, each doing the same busy loop for a while next to n
// goroutines that wait 100 ms at a time: in epoll_wait (as a ring buffer
// reader of cilium/ebpf does), in time.Sleep, or none. Each prints its
// busiest threads apart from the loop's: CPU time and wake-ups.
//
//	go run ./bench/sysmon [-n 3] [-d 10s]
package main

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	n := flag.Int("n", 3, "goroutines waiting")
	d := flag.Duration("d", 10*time.Second, "how long each mode runs")
	mode := flag.String("mode", "", "child: epoll, sleep or none")
	flag.Parse()
	if *mode != "" {
		child(*mode, *n, *d)
		return
	}
	var cmds []*exec.Cmd
	for _, m := range []string{"epoll", "sleep", "none"} {
		cmd := exec.Command(os.Args[0], "-mode", m, "-n", strconv.Itoa(*n), "-d", d.String())
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		if err := cmd.Start(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		cmds = append(cmds, cmd)
	}
	for _, c := range cmds {
		c.Wait()
	}
}

func child(mode string, n int, d time.Duration) {
	for i := 0; i < n && mode != "none"; i++ {
		go func() {
			if mode == "sleep" {
				for {
					time.Sleep(100 * time.Millisecond)
				}
			}
			ep, err := unix.EpollCreate1(0)
			if err != nil {
				panic(err)
			}
			ev := make([]unix.EpollEvent, 1)
			for {
				unix.EpollWait(ep, ev, 100)
			}
		}()
	}
	t0 := time.Now()
	x := 0
	for time.Since(t0) < d {
		for j := 0; j < 1_000_000; j++ {
			x += j
		}
	}
	runtime.KeepAlive(x)
	type thread struct {
		tid           string
		onCPU, wakeup int64
	}
	var ts []thread
	ents, _ := os.ReadDir("/proc/self/task")
	for _, e := range ents {
		dir := "/proc/self/task/" + e.Name()
		sched, _ := os.ReadFile(dir + "/schedstat")
		status, _ := os.ReadFile(dir + "/status")
		t := thread{tid: e.Name()}
		if f := strings.Fields(string(sched)); len(f) > 0 {
			t.onCPU, _ = strconv.ParseInt(f[0], 10, 64)
		}
		for _, l := range strings.Split(string(status), "\n") {
			if v, ok := strings.CutPrefix(l, "voluntary_ctxt_switches:"); ok {
				t.wakeup, _ = strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			}
		}
		ts = append(ts, t)
	}
	// The loop's thread (or threads, if it moved) switch out involuntarily;
	// sysmon sleeps, so it switches out voluntarily.
	sort.Slice(ts, func(i, j int) bool { return ts[i].wakeup > ts[j].wakeup })
	for _, t := range ts[:min(3, len(ts))] {
		fmt.Printf("%-5s n=%d thread %s: %v on a CPU, %d wake-ups\n", mode, n, t.tid, time.Duration(t.onCPU).Round(time.Millisecond), t.wakeup)
	}
}
