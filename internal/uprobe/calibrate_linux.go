//go:build linux && amd64

package uprobe

import (
	"errors"
	"fmt"
	"runtime"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/mapguard/mapguard/internal/x86site"
	"github.com/mapguard/mapguard/symbols"
)

// calibrationSink keeps calibrationTarget's cold branch alive.
//
//lint:ignore U1000 a sink that keeps calibrationTarget's cold branch
var calibrationSink string

// calibrationTarget is what the cost calibration probes: a function with a
// stack check and a frame, so that its first instruction (the stack check's
// compare) is single-stepped by the kernel and the one after the check
// (PUSHQ BP) is emulated, as at the two kinds of probe site.
//
//go:noinline
func calibrationTarget(m map[int]int, n int) int {
	if n < 0 {
		calibrationSink = fmt.Sprint(m)
	}
	return n + 1
}

// calibration holds the two probe sites of calibrationTarget.
type calibration struct {
	step, emu *site
}

// setupCalibrationLocked finds calibrationTarget's two sites.
func (u *uprobes) setupCalibrationLocked(bin *symbols.Binary) error {
	fn, ok := bin.Func(calibrationFunc)
	if !ok {
		return errors.New("calibration function not in binary")
	}
	code, err := bin.Code(fn)
	if err != nil {
		return err
	}
	emu, err := x86site.EntrySite(code)
	if err != nil {
		return err
	}
	if !emu.Emulated {
		return fmt.Errorf("calibration site %s is not emulated", emu.Inst)
	}
	step := x86site.Site{Offset: 0, Inst: "entry"}
	u.calib = calibration{
		step: &site{index: calibIndex, fn: fn, found: found{at: step}},
		emu:  &site{index: calibIndex, fn: fn, found: found{at: emu}},
	}
	return nil
}

// calibrateLocked measures the trap costs again (measureTraps) and keeps
// them. It returns the CPU time it spent.
func (u *uprobes) calibrateLocked() (spent time.Duration, err error) {
	c, err := u.measureTraps(u.coll.Programs[mapguardProgMapguardEmpty], nil)
	if err != nil {
		return 0, err
	}
	u.keepCalibrationLocked(c)
	return c.spent, nil
}

// trapCosts is what one calibration measured.
type trapCosts struct {
	step, emu time.Duration // one trap
	link      time.Duration // CPU time to attach and detach one link, on the attaching thread
	others    time.Duration // what the cycle costs the rest of the process
	spent     time.Duration // CPU time the calibration took
}

// errCalibrationStopped: the probe is being closed.
var errCalibrationStopped = errors.New("calibration stopped: the probe is closing")

// measureTraps measures, with the empty program prog, what one trap costs
// at a single-stepped and at an emulated instruction (the least of a few
// runs: noise only adds), and the CPU time of attaching and detaching one
// link. It takes no lock: it uses only what Start set up (the calibration
// sites, the executable). Once stop is set it attaches nothing more.
//
// measureTraps is one measurement with its helpers as closures, which share its clocks.
func (u *uprobes) measureTraps(prog *ebpf.Program, stop *atomic.Bool) (c trapCosts, err error) {
	m := map[int]int{}
	// CPU time of this thread, not wall time: a trap is handled on the
	// thread that took it, and a busy machine's preemptions do not count.
	// Where the thread clock is too coarse to see the difference (an
	// emulated VM), wall time is used instead.
	type sample struct{ cpu, wall time.Duration }
	run := func(calls int) sample {
		t0, w0 := threadCPU(), time.Now()
		n := 0
		for i := 0; i < calls; i++ {
			n = calibrationTarget(m, n)
		}
		if n != calls {
			panic("calibration")
		}
		return sample{threadCPU() - t0, time.Since(w0)}
	}
	least := func(calls int) sample {
		best := sample{1<<63 - 1, 1<<63 - 1}
		for r := 0; r < calibrationRuns; r++ {
			x := run(calls)
			best = sample{min(best.cpu, x.cpu), min(best.wall, x.wall)}
		}
		return best
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	c0 := threadCPU()
	defer func() { c.spent = threadCPU() - c0 }()
	// One attachment per instruction kind (each detach waits for the
	// kernel: ~30 ms for uprobe_multi, ~100 ms for a perf-event uprobe):
	// the least of a few runs without, then with it.
	// A link's cost is not all on the thread that attaches and closes it:
	// the rest of the process pays too (about 1 ms a cycle on the
	// project's VM with nothing else running, against 0.1-0.4 ms on the
	// thread: the Go runtime's sysmon spins after each long system call,
	// and the kernel rewrites the probed pages under every thread). The
	// process's CPU around the cycle, less this thread's, is that share;
	// the least seen since Start is kept (other work of the process only
	// adds to it).
	measure := func(s *site, calls int) (time.Duration, error) {
		// The rest of the process keeps working meanwhile (the
		// calibration runs after Start, in a live program): its rate,
		// measured over the base runs, is taken out of the cycle's share.
		b0, q0, w0 := threadCPU(), processCPU(), time.Now()
		base := least(calls)
		otherRate := float64(max(processCPU()-q0-(threadCPU()-b0), 0)) / float64(max(time.Since(w0), time.Microsecond))
		if stop != nil && stop.Load() {
			return 0, errCalibrationStopped
		}
		a0, p0, t0 := threadCPU(), processCPU(), time.Now()
		l, err := u.attach(s, prog)
		if err != nil {
			return 0, err
		}
		a1 := threadCPU()
		with := least(calls)
		a2 := threadCPU()
		l.Close()
		a3, p3 := threadCPU(), processCPU()
		if lc := a1 - a0 + a3 - a2; c.link == 0 || lc < c.link {
			c.link = lc
		}
		busy := time.Duration(otherRate * float64(time.Since(t0)))
		if o := max(p3-p0-(a3-a0)-busy, 0); c.others == 0 || o < c.others {
			c.others = o
		}
		d := with.cpu - base.cpu
		if d <= 0 {
			d = with.wall - base.wall
		}
		return max(d/time.Duration(calls), time.Nanosecond), nil
	}
	if c.step, err = measure(u.calib.step, calibrationStepCalls); err != nil {
		return c, fmt.Errorf("calibrate a single-stepped trap: %w", err)
	}
	if c.emu, err = measure(u.calib.emu, calibrationEmuCalls); err != nil {
		return c, fmt.Errorf("calibrate an emulated trap: %w", err)
	}
	return c, nil
}

// keepCalibrationLocked keeps what a calibration measured; the link cost
// is the least measured (the first replaces the assumed one).
func (u *uprobes) keepCalibrationLocked(c trapCosts) {
	u.stepCost, u.emuCost = c.step, c.emu
	if u.calibrations == 0 || c.link < u.linkThread {
		u.linkThread = c.link
	}
	if u.calibrations == 0 || c.others < u.linkOthers {
		u.linkOthers = c.others
	}
	u.linkCost = u.linkThread + u.linkOthers
	if u.gov != nil {
		u.gov.cycle = float64(u.linkCost)
	}
	u.lastCalib = time.Now()
	u.calibrations++
}

// floor is what a trap costs at s's instruction, as last calibrated.
func (u *uprobes) floor(s *site) time.Duration {
	if s.at.Emulated {
		return u.emuCost
	}
	return u.stepCost
}

// siteCost is what one hit of s costs: its trap plus the program's run
// time as the kernel measured it (one hit in 16), in ns.
func (u *uprobes) siteCost(s *site) float64 {
	c := u.counters[s.index]
	prog := 0.0
	if c.Timed > 0 {
		prog = float64(c.ProgNs) / float64(c.Timed)
	}
	return float64(u.floor(s)) + prog
}

// cpuMeter measures what one of the Guard's own goroutines (the reader,
// the waker, the deep reader) costs: each is locked to its thread, so the
// thread's CPU clock is the goroutine's, decoding and delivering events
// and running the governor included. The governor books it as extra.
type cpuMeter struct {
	last time.Duration
	own  *atomic.Int64
	skip bool // the next delta is Start's (the canary's first decode), not booked
}

// startCPUMeter locks the calling goroutine to its thread and starts
// measuring it into own; with startup, what it does until its first book
// is part of Start, not booked. The goroutine calls stop before it ends.
func startCPUMeter(own *atomic.Int64, startup bool) cpuMeter {
	runtime.LockOSThread()
	return cpuMeter{last: threadCPU(), own: own, skip: startup}
}

// stop unlocks the thread, so that it outlives the goroutine: a goroutine
// that ends locked takes its thread down with it, and the Guard's three
// would do so at every Close. Exiting threads of a process with uprobes
// attached are the prime suspect of the crashes seen on the 6.1 VM (they
// began with the locked goroutines), and threads are not churned anyway.
func (m *cpuMeter) stop() { runtime.UnlockOSThread() }

// book adds the CPU time the goroutine used since the last call.
func (m *cpuMeter) book() {
	now := threadCPU()
	if d := now - m.last; d > 0 && !m.skip {
		m.own.Add(int64(d))
	}
	m.last, m.skip = now, false
}

// processCPU is the CPU time of the whole process so far (user and
// system, every thread).
func processCPU() time.Duration {
	var ru unix.Rusage
	if unix.Getrusage(unix.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// Until a calibration succeeds (Start runs the first; if it fails, the
// governor's waker tries again after Start), every site's trap is taken
// to cost
// assumedTrapCost: about twice the high end of a single-stepped trap
// measured on the project's VMs (FACTS.md: 22-25 us; 27 us under load), so
// that the budget is never under-counted meanwhile. assumedLinkCost is
// what attaching and detaching one link costs the process until then
// (measured: 0.26-0.33 ms on the attaching thread, 1.1-1.4 ms for the
// whole process).
const (
	assumedTrapCost = 50 * time.Microsecond
	assumedLinkCost = 1500 * time.Microsecond
)

// assumeCostsLocked sets the assumed costs, before any calibration.
func (u *uprobes) assumeCostsLocked() {
	if u.calibrations == 0 {
		u.stepCost, u.emuCost, u.linkCost = assumedTrapCost, assumedTrapCost, assumedLinkCost
	}
}

// calibrateFirst runs the first calibration, once, on the waker's
// goroutine after Start has returned, without u.mu: it waits tens of ms
// for the kernel to detach its probes, which neither Stats nor the reader
// should wait for, and a Close meanwhile waits at most for the detach in
// flight (calibStop; teardown waits for the waker before it frees the
// program). Its CPU time is start-up's, not charged to the budget. If it
// fails, the assumed costs stay until the next calibration, a minute on.
func (u *uprobes) calibrateFirst() (ran bool) {
	u.mu.Lock()
	if !u.running || u.stopping || u.calibrating || !u.lastCalib.IsZero() || u.coll == nil {
		u.mu.Unlock()
		return false
	}
	u.calibrating = true
	prog := u.coll.Programs[mapguardProgMapguardEmpty]
	u.mu.Unlock()

	c, err := u.measureTraps(prog, &u.calibStop)

	u.mu.Lock()
	defer u.mu.Unlock()
	u.calibrating = false
	if u.stopping {
		return true
	}
	if err != nil {
		u.log.V(1).Info("calibrate trap costs; assumed costs kept", "error", err.Error())
		u.lastCalib = time.Now()
		return true
	}
	u.keepCalibrationLocked(c)
	if u.gov != nil {
		u.gov.cycle = float64(u.linkCost) // the assumed one until now
		if err := u.pushCostsLocked(false); err != nil {
			u.log.V(1).Info("set probe costs", "error", err.Error())
		}
	}
	return true
}
