package main

import (
	"strings"
	"testing"
)

// Samples as perf script prints them: a trap at an emulated site, a
// context switch on a trap's way back (the scheduler's), the Guard's
// reader in a system call, a callback the dispatcher runs (the
// program's), sysmon, and the program's own work.
const script = `svc 10 100.000000:     500000 
	ffffffff8225a6c1 uprobe_prog_run
	ffffffff81000130 uprobe_notify_resume
	ffffffff81000131 irqentry_exit_to_user_mode
	ffffffff81000132 asm_exc_int3
	          78e993 main.handleLimit
	           8d521 runtime.goexit.abi0

svc 10 100.000500:     500000 
	ffffffff82260c34 finish_task_switch.isra.0
	ffffffff82260c35 __schedule
	ffffffff82260c36 schedule
	ffffffff82260c37 irqentry_exit_to_user_mode
	ffffffff81000132 asm_exc_int3
	          78e993 main.handleLimit

svc 11 100.001000:     500000 
	ffffffff816d6a63 ksys_read
	            b40e internal/runtime/syscall/linux.Syscall6
	           bcaa6 syscall.Syscall
	          3a0000 github.com/cilium/ebpf/internal/sys.BPF
	          3a1000 github.com/mapguard/mapguard/internal/uprobe.(*uprobes).readCounters

svc 12 100.001500:     500000 
	          22ebe runtime.mallocgc
	          3b0000 github.com/mapguard/mapguard/bench/corpus/record.Start.func3
	          3b1000 github.com/mapguard/mapguard.(*Guard).dispatch

svc 13 100.002000:     500000 
	          40000 runtime.usleep
	          40001 runtime.sysmon

svc 10 100.002500:     500000 
	          22ebe runtime.mallocgc
	          26445f net/http.readTransfer
`

func TestAttribute(t *testing.T) {
	r, err := attribute(strings.NewReader(script))
	if err != nil {
		t.Fatal(err)
	}
	want := [nCats]int64{catTrap: 500000, catGuard: 500000, catSysmon: 500000, catOther: 1500000}
	if r.ns != want || r.samples != 6 {
		t.Errorf("ns %v (%d samples), want %v (6)", r.ns, r.samples, want)
	}
	if r.first != 100 || r.last != 100.0025 {
		t.Errorf("span %v-%v", r.first, r.last)
	}
	if _, err := attribute(strings.NewReader("")); err == nil {
		t.Error("no samples: no error")
	}
	if _, err := attribute(strings.NewReader("svc oops\n")); err == nil {
		t.Error("a bad header: no error")
	}
}
