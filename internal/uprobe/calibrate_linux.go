//go:build linux && amd64

package uprobe

import (
	"errors"
	"fmt"
	"os"
	"reflect"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/mapguard/mapguard/internal/x86site"
	"github.com/mapguard/mapguard/symbols"
)

// calibrationSink keeps the calibration targets' cold branches alive.
//
//lint:ignore U1000 a sink that keeps the targets' cold branches
var calibrationSink string

// calibrationStep and calibrationEmu are what the cost calibration probes:
// functions with a stack check and a frame. calibrationStep is probed at
// its first instruction (the stack check's compare), which the kernel
// single-steps; calibrationEmu at the instruction after the check (PUSHQ
// BP), which it emulates: the two kinds of probe site. Two functions, so
// that both probes are attached at once and each loop hits only its own.
//
//go:noinline
func calibrationStep(m map[int]int, n int) int {
	if n < 0 {
		calibrationSink = fmt.Sprint(m)
	}
	return n + 1
}

//go:noinline
func calibrationEmu(m map[int]int, n int) int {
	if n < 0 {
		calibrationSink = fmt.Sprint(m, n)
	}
	return n + 1
}

// calibration holds the two probe sites.
type calibration struct {
	step, emu *site
}

// liveCalibration finds the two sites from the running process alone, so
// that the calibration can run while Start reads the symbols: each
// function's entry from its func value, its end from the runtime's
// function table, its file offset from /proc/self/maps, its code from the
// executable (not from memory, where another Guard's probe may sit).
// verifyCalibration checks the result against the symbols.
func liveCalibration() (calibration, error) {
	maps, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		return calibration{}, err
	}
	exe, err := os.Open(selfExe)
	if err != nil {
		return calibration{}, err
	}
	defer exe.Close()
	find := func(f func(map[int]int, int) int, name string) (symbols.Func, []byte, error) {
		entry := reflect.ValueOf(f).Pointer()
		rf := runtime.FuncForPC(entry)
		if rf == nil || rf.Entry() != entry || rf.Name() != name {
			return symbols.Func{}, nil, fmt.Errorf("calibration function %s not at its func value", name)
		}
		// End here is where the next function starts (padding included).
		end := entry + 1
		for ; end-entry < 4096; end++ {
			if g := runtime.FuncForPC(end); g == nil || g.Entry() != entry {
				break
			}
		}
		off, ok := fileOffset(maps, uint64(entry))
		if !ok {
			return symbols.Func{}, nil, fmt.Errorf("calibration function %s: %#x not in a mapping of the executable", name, entry)
		}
		code := make([]byte, end-entry)
		if _, err := exe.ReadAt(code, int64(off)); err != nil {
			return symbols.Func{}, nil, err
		}
		return symbols.Func{Name: name, Entry: uint64(entry), End: uint64(end), FileOffset: off}, code, nil
	}
	step, _, err := find(calibrationStep, calibrationStepFunc)
	if err != nil {
		return calibration{}, err
	}
	emu, code, err := find(calibrationEmu, calibrationEmuFunc)
	if err != nil {
		return calibration{}, err
	}
	at, err := x86site.EntrySite(code)
	if err != nil {
		return calibration{}, err
	}
	if !at.Emulated {
		return calibration{}, fmt.Errorf("calibration site %s is not emulated", at.Inst)
	}
	return calibration{
		step: &site{index: calibIndex, fn: step, found: found{at: x86site.Site{Offset: 0, Inst: "entry"}}},
		emu:  &site{index: calibIndex, fn: emu, found: found{at: at}},
	}, nil
}

// fileOffset maps the address addr of this process to its offset in the
// executable, from the text of /proc/self/maps.
func fileOffset(maps []byte, addr uint64) (uint64, bool) {
	for _, line := range strings.Split(string(maps), "\n") {
		var lo, hi, off uint64
		var perms, dev string
		var inode uint64
		var path string
		if n, _ := fmt.Sscanf(line, "%x-%x %s %x %s %d %s", &lo, &hi, &perms, &off, &dev, &inode, &path); n < 7 {
			continue
		}
		if addr >= lo && addr < hi && strings.Contains(perms, "x") {
			return addr - lo + off, true
		}
	}
	return 0, false
}

// calibrationFromSymbols finds the two sites from the symbols, where
// liveCalibration failed; the calibration then runs after Start
// (calibrateDue).
func calibrationFromSymbols(bin *symbols.Binary) (calibration, error) {
	var c calibration
	for _, name := range []string{calibrationStepFunc, calibrationEmuFunc} {
		fn, ok := bin.Func(name)
		if !ok {
			return c, fmt.Errorf("calibration function %s not in binary", name)
		}
		if name == calibrationStepFunc {
			c.step = &site{index: calibIndex, fn: fn, found: found{at: x86site.Site{Offset: 0, Inst: "entry"}}}
			continue
		}
		code, err := bin.Code(fn)
		if err != nil {
			return c, err
		}
		at, err := x86site.EntrySite(code)
		if err != nil {
			return c, err
		}
		if !at.Emulated {
			return c, fmt.Errorf("calibration site %s is not emulated", at.Inst)
		}
		c.emu = &site{index: calibIndex, fn: fn, found: found{at: at}}
	}
	return c, nil
}

// verifyCalibration checks the live sites against the symbols: the same
// file offsets, and the same emulated instruction found in the code the
// symbols give.
func verifyCalibration(c calibration, bin *symbols.Binary) error {
	var emu symbols.Func
	for _, s := range []*site{c.step, c.emu} {
		// By address, then by name: the symbols index only the runtime's
		// names at Open (any other name costs a read of the whole table).
		fn, ok := bin.FuncAt(s.fn.Entry - bin.LoadBias())
		if !ok || fn.Name != s.fn.Name {
			if fn, ok = bin.Func(s.fn.Name); !ok {
				return fmt.Errorf("calibration function %s not in the symbols", s.fn.Name)
			}
		}
		if fn.FileOffset != s.fn.FileOffset || fn.End-fn.Entry > s.fn.End-s.fn.Entry {
			return fmt.Errorf("calibration function %s: file offset %#x and size %d from the process, %#x and %d from the symbols",
				s.fn.Name, s.fn.FileOffset, s.fn.End-s.fn.Entry, fn.FileOffset, fn.End-fn.Entry)
		}
		if s == c.emu {
			emu = fn
		}
	}
	code, err := bin.Code(emu)
	if err != nil {
		return err
	}
	at, err := x86site.EntrySite(code)
	if err != nil {
		return err
	}
	if at.Offset != c.emu.at.Offset {
		return fmt.Errorf("calibration site at +%#x from the process, +%#x from the symbols", c.emu.at.Offset, at.Offset)
	}
	return nil
}

// calibrating is Start's calibration, running on a goroutine of its own
// (startCalibration) while Start reads the symbols, chooses the sites and
// loads the programs: its probes, trap loops and detaches (a detach waits
// tens of ms for the kernel) are off Start's path. What a detach costs the
// rest of the process is not measured there (Start's own work would count
// as such): the first recalibration measures it.
type calibrating struct {
	stop  atomic.Bool // set when Start fails: attach nothing more
	done  chan struct{}
	calib calibration
	costs trapCosts
	err   error
	// traps is closed once the trap costs are measured (trapped then
	// holds them, link cost not yet) or the calibration has failed, before
	// the detaches: Start needs no more.
	traps     chan struct{}
	trapsOnce sync.Once
	trapped   trapCosts
	trapsOK   bool
}

// startCalibration starts the calibration with an empty program and an
// executable handle of its own; it needs nothing else of Start's.
func (u *uprobes) startCalibration() *calibrating {
	c := &calibrating{done: make(chan struct{}), traps: make(chan struct{})}
	go c.run(u.multi, u.calibLane)
	return c
}

// run is the calibration's goroutine. Its name is in
// mapguard.GoroutineFunctions: it outlives Start by its detaches.
func (c *calibrating) run(multi bool, lane *linkLane) {
	defer close(c.done)
	defer c.trapsOnce.Do(func() { close(c.traps) })
	defer lowerPriority()()
	if c.calib, c.err = liveCalibration(); c.err != nil {
		return
	}
	prog, err := emptyProgram(multi)
	if err != nil {
		c.err = err
		return
	}
	defer prog.Close()
	ex, err := link.OpenExecutable(selfExe)
	if err != nil {
		c.err = err
		return
	}
	c.costs, c.err = measureTraps(ex, multi, lane, laneStartCalib, prog, c.calib, &c.stop, false, func(t trapCosts) {
		c.trapsOnce.Do(func() {
			c.trapped, c.trapsOK = t, true
			close(c.traps)
		})
	})
}

// calibrationNice is how much lower than the rest of Start the
// calibration's thread runs: its trap loops would otherwise take a core
// from Start's own steps (on two cores, three threads want one each while
// the kernel verifies the BPF programs). What a trap costs is measured in
// the thread's CPU time, which a lower priority does not change.
const calibrationNice = 10

// lowerPriority locks the calling goroutine to its thread and lowers the
// thread's priority by calibrationNice; the function it returns restores
// it and unlocks. If the old priority cannot be restored (that needs
// CAP_SYS_NICE), the thread stays locked, and so ends with its goroutine
// rather than run other goroutines at the lower priority.
func lowerPriority() (restore func()) {
	runtime.LockOSThread()
	tid := unix.Gettid()
	prio, err := unix.Getpriority(unix.PRIO_PROCESS, tid) // 20 - nice, from the system call
	nice := 20 - prio
	if err != nil || unix.Setpriority(unix.PRIO_PROCESS, tid, min(nice+calibrationNice, 19)) != nil {
		return runtime.UnlockOSThread
	}
	return func() {
		if unix.Setpriority(unix.PRIO_PROCESS, tid, nice) == nil {
			runtime.UnlockOSThread()
		}
	}
}

// waitTraps returns the trap costs as soon as they are measured, without
// the link cost (trapCosts.link 0), which the detaches then measure (wait);
// or what the calibration ended with, if it failed before.
func (c *calibrating) waitTraps() (calibration, trapCosts, error) {
	<-c.traps
	if c.trapsOK {
		return c.calib, c.trapped, nil
	}
	<-c.done
	return c.calib, c.costs, c.err
}

// wait returns what the calibration measured, once it has detached.
func (c *calibrating) wait() (trapCosts, error) {
	<-c.done
	return c.costs, c.err
}

// finishCalibration waits for Start's calibration to detach and keeps the
// link cost it measured, if Start kept its trap costs (verified). It runs
// after Start returns, counted in u.detaches (teardown waits for it). Its
// name is in mapguard.GoroutineFunctions.
func (u *uprobes) finishCalibration(c *calibrating, verified bool) {
	defer u.detaches.Done()
	costs, err := c.wait()
	u.mu.Lock()
	defer u.mu.Unlock()
	if err != nil || !verified || u.stopping {
		return
	}
	u.keepLinkLocked(costs)
	if err := u.pushCostsLocked(false); err != nil {
		u.log.V(1).Info("set probe costs", "error", err.Error())
	}
}

// abandon stops the calibration (Start failed, instead of wait) and
// waits for it to detach what it attached.
func (c *calibrating) abandon() {
	c.stop.Store(true)
	<-c.done
}

// emptyProgram loads a program that returns at once: the calibration's
// traps cost what the kernel's uprobe path costs, nothing of ours.
func emptyProgram(multi bool) (*ebpf.Program, error) {
	spec := &ebpf.ProgramSpec{
		Name:         "mapguard_calib",
		Type:         ebpf.Kprobe,
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
		License:      "GPL",
	}
	if multi {
		spec.AttachType = ebpf.AttachTraceUprobeMulti
	}
	return ebpf.NewProgram(spec)
}

// trapCosts is what one calibration measured.
type trapCosts struct {
	step, emu time.Duration // one trap
	link      time.Duration // CPU time to attach and detach one link, on the attaching thread
	others    time.Duration // what the cycle costs the rest of the process; -1: not measured
}

// errCalibrationStopped: the probe is being closed.
var errCalibrationStopped = errors.New("calibration stopped: the probe is closing")

// measureTraps measures, with the empty program prog, what one trap costs
// at a single-stepped and at an emulated instruction (the least of a few
// runs: noise only adds), and the CPU time of attaching and detaching one
// link. It takes no lock: it uses only its arguments. Once stop is set it
// attaches nothing more. Both probes are attached at once, and detached
// each on a thread of its own, in their turns in lane (the probe's
// calibLane: one at a time, apart from the governor's) at closePrio. With
// others, it also measures what
// the detaches cost the rest of the process; else trapCosts.others is -1.
// measured, if not nil, is called with the trap costs as soon as they are
// known, before the detaches.
//
// measureTraps is one measurement with its helpers as closures, which share its clocks.
func measureTraps(ex *link.Executable, multi bool, lane *linkLane, closePrio float64, prog *ebpf.Program, cal calibration, stop *atomic.Bool, others bool, measured func(trapCosts)) (c trapCosts, err error) {
	m := map[int]int{}
	// CPU time of this thread, not wall time: a trap is handled on the
	// thread that took it, and a busy machine's preemptions do not count.
	// Where the thread clock is too coarse to see the difference (an
	// emulated VM), wall time is used instead.
	//
	// Each call is timed alone, after the core's own caches were evicted
	// (eviction, untimed): a program's traps come between its own work,
	// which has pushed the kernel's trap path and the uprobe's data out of
	// them. Timed back to back, hot, a trap cost 0.6-1.2 us emulated and
	// 4.3-6.8 us single-stepped on the project's VM, and a profile put the
	// seeded service's traps at 1.5-2.9 times (median 2.1) what those
	// figures booked; evicted, 1.4-2.0 and 5.6-7.6 us, and 0.7-1.8 times
	// (median 1.4: the shared last-level cache is colder still in a busy
	// program, and evicting it too costs 1-2 ms a call). README: Checking
	// the account.
	evict := newEviction()
	type sample struct{ cpu, wall time.Duration }
	run := func(f func(map[int]int, int) int, calls int) sample {
		var s sample
		n := 0
		for i := 0; i < calls; i++ {
			evict.run()
			t0, w0 := threadCPU(), time.Now()
			n = f(m, n)
			s.wall += time.Since(w0)
			s.cpu += threadCPU() - t0
		}
		if n != calls {
			panic("calibration")
		}
		return s
	}
	least := func(f func(map[int]int, int) int, calls int) sample {
		best := sample{1<<63 - 1, 1<<63 - 1}
		for r := 0; r < calibrationRuns; r++ {
			x := run(f, calls)
			best = sample{min(best.cpu, x.cpu), min(best.wall, x.wall)}
		}
		return best
	}
	per := func(base, with sample, calls int) time.Duration {
		d := with.cpu - base.cpu
		if d <= 0 {
			d = with.wall - base.wall
		}
		return max(d/time.Duration(calls), time.Nanosecond)
	}
	stopped := func() bool { return stop != nil && stop.Load() }
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()

	baseStep := least(calibrationStep, calibrationStepCalls)
	baseEmu := least(calibrationEmu, calibrationEmuCalls)
	if stopped() {
		return c, errCalibrationStopped
	}
	a0 := threadCPU()
	var links []link.Link
	closeAll := func() {
		for _, l := range links {
			l.Close()
		}
	}
	for _, s := range []*site{cal.step, cal.emu} {
		var l link.Link
		var err error
		lane.do(laneCalib, func() { l, err = attachSite(ex, multi, s, prog) })
		if err != nil {
			closeAll()
			return c, fmt.Errorf("calibrate %s: %w", s.at.Inst, err)
		}
		links = append(links, l)
	}
	attachCPU := threadCPU() - a0
	c.step = per(baseStep, least(calibrationStep, calibrationStepCalls), calibrationStepCalls)
	c.emu = per(baseEmu, least(calibrationEmu, calibrationEmuCalls), calibrationEmuCalls)
	if measured != nil {
		measured(trapCosts{step: c.step, emu: c.emu, others: -1})
	}
	// A link's cost is not all on the thread that attaches and closes it:
	// the rest of the process pays too (the Go runtime's sysmon spins
	// after each long system call, and the kernel rewrites the probed
	// pages under every thread). The process's CPU around the detaches,
	// less the detaching threads', less what the process was doing just
	// before (its rate over a short look), is that share; the least seen
	// since Start is kept (other work of the process only adds to it).
	var otherRate float64
	if others {
		q0, w0 := processCPU(), time.Now()
		time.Sleep(time.Millisecond)
		otherRate = float64(processCPU()-q0) / float64(max(time.Since(w0), time.Microsecond))
	}
	p0, t0 := processCPU(), time.Now()
	closeCPU := make([]time.Duration, len(links))
	var wg sync.WaitGroup
	for i, l := range links {
		wg.Add(1)
		go closeTimed(l, lane.enter(closePrio), &closeCPU[i], &wg)
	}
	wg.Wait()
	var closing time.Duration
	for _, d := range closeCPU {
		closing += d
	}
	n := time.Duration(len(links))
	c.link = (attachCPU + closing) / n
	c.others = -1
	if others {
		busy := time.Duration(otherRate * float64(time.Since(t0)))
		c.others = max(processCPU()-p0-closing-busy, 0) / n
	}
	return c, nil
}

// closeTimed closes l on a thread of its own in its turn in the link lane
// and stores the CPU time that took in cpu. Its name is in
// mapguard.GoroutineFunctions.
func closeTimed(l link.Link, turn *laneTicket, cpu *time.Duration, wg *sync.WaitGroup) {
	defer wg.Done()
	turn.wait()
	defer turn.leave()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	t := threadCPU()
	l.Close()
	*cpu = threadCPU() - t
}

// keepCalibrationLocked keeps what a calibration measured: the trap costs,
// and the link cost if it was measured (keepLinkLocked).
func (u *uprobes) keepCalibrationLocked(c trapCosts) {
	u.stepCost, u.emuCost = c.step, c.emu
	switch {
	case c.link > 0:
		u.keepLinkLocked(c)
	case !u.linkMeasured:
		// Start's calibration reports its trap costs before its detaches
		// measure the link cost (finishCalibration): the assumed one until
		// then.
		u.linkCost = assumedLinkCost
		if u.gov != nil {
			u.gov.cycle = float64(u.linkCost)
		}
	}
	u.lastCalib = time.Now()
	u.calibrations++
}

// keepLinkLocked keeps the link cost a calibration measured: the least
// measured on the attaching thread, and what the rest of the process paid.
func (u *uprobes) keepLinkLocked(c trapCosts) {
	first := !u.linkMeasured
	u.linkMeasured = true
	if first || c.link < u.linkThread {
		u.linkThread = c.link
	}
	switch {
	case c.others < 0 && first:
		// Start's calibration: until a recalibration measures it, a
		// link's cost to the rest of the process is taken to equal the
		// attaching thread's. Measured with the process idle it is less
		// (the whole cycle cost 0.23-0.28 ms on the project's VMs); taken
		// much higher, it starves the sampled sites' windows.
		u.linkOthers = u.linkThread
	case c.others < 0:
	case !u.othersMeasured || c.others < u.linkOthers:
		u.linkOthers, u.othersMeasured = c.others, true
	}
	u.linkCost = u.linkThread + u.linkOthers
	if u.gov != nil {
		u.gov.cycle = float64(u.linkCost)
	}
}

// calibratedFloor is what a trap costs at s's instruction, as last
// calibrated.
func (u *uprobes) calibratedFloor(s *site) time.Duration {
	if s.at.Emulated {
		return u.emuCost
	}
	return u.stepCost
}

// floor is what the governor books for a trap at s's instruction: the
// calibrated cost, times what the trap sampler measured it to cost in
// place (sample_linux.go).
func (u *uprobes) floor(s *site) time.Duration {
	f := u.calibratedFloor(s)
	if u.samp != nil {
		f = time.Duration(float64(f) * u.samp.scaleOf(s.index))
	}
	return f
}

// siteCost is what one hit of s costs: its trap plus the program's run
// time as the kernel measured it (one hit in 16), in ns. A site at the
// same instruction as an earlier one on Start's shared link (the
// missing-key and nil-map reads' sites share the nil-or-empty block of
// mapaccess1*) is in the same trap: the kernel runs both programs on one
// breakpoint, and the two are attached and detached together, so the
// trap is charged to the first only.
func (u *uprobes) siteCost(s *site) float64 {
	c := u.counters[s.index]
	prog := 0.0
	if c.Timed > 0 {
		prog = float64(c.ProgNs) / float64(c.Timed)
	}
	if u.sharedTrap(s) {
		return prog
	}
	return float64(u.floor(s)) + prog
}

// sharedTrap reports whether s shares its trap with an earlier site at
// the same instruction that is attached now: the kernel keeps one
// breakpoint for both, and that site is charged the trap. Only while it
// is attached: once the governor samples the two apart (their windows
// need not coincide), each pays its own traps. (Charging the second one
// its program's time alone whenever both were on Start's shared link
// under-counted a reflect/JSON loop by about 1.2 s of CPU in 9 s: the
// first was detached after 9 ms, the second took 58,753 traps at 103 ns
// each.) The costs are pushed after each of the governor's attaches and
// detaches; a site being detached counts as detached (its last traps are
// then charged twice, not missed), unless both are being detached with
// one link: the kernel unregisters a link's sites in its order, these two
// side by side (startOrder), and removes the breakpoint with the second,
// so they trap together to the end. Charged twice, the seeded service's
// two sites at mapaccess1_fast32's miss block booked 8 ms for the 4 ms
// of traps that the detach of Start's link let through in one start (the
// same hit counts at both, 96 to 373, until it was done).
func (u *uprobes) sharedTrap(s *site) bool {
	at := s.fn.FileOffset + s.at.Offset
	for _, t := range u.sites[:min(int(s.index), len(u.sites))] {
		if t.fn.FileOffset+t.at.Offset != at {
			continue
		}
		if t.link != nil || (t.closing != nil && t.closing == s.closing) {
			return true
		}
	}
	return false
}

// cpuMeter measures what one of the Guard's own goroutines (the reader,
// the waker, the deep reader, the search for nested reads) costs, in
// stretches of work: from begin to book the goroutine is locked to its
// thread, so the thread's CPU clock is the goroutine's (decoding and
// delivering events and running the governor included). The governor
// books it as extra.
//
// Only the stretches are locked, not the waits between them: a goroutine
// locked for good wakes on its own thread, so each wake-up hands a P to
// that thread and back (two thread switches). The scheduler's work to
// wake a goroutine is then not in the measure (a few us a wake-up). With
// the raw clock read (threadCPU) and drain's look at the ring before a
// system call, the idle service (bench/corpus/service, perf task-clock
// over 8 s after 6 s) cost 2.2-3.4 ms a second against 3.3-5.7 before;
// the locking alone was not told apart from this VM's noise.
type cpuMeter struct {
	own   *atomic.Int64
	start time.Duration
	on    bool // in a stretch: locked to the thread
	skip  bool // the next stretch is Start's (the canary's first decode), not booked
}

// startCPUMeter returns a meter that books into own; with startup, the
// first stretch is part of Start, not booked. The goroutine calls stop
// before it ends.
func startCPUMeter(own *atomic.Int64, startup bool) cpuMeter {
	return cpuMeter{own: own, skip: startup}
}

// begin starts a stretch of work (if none is open): the goroutine stays
// on its thread until book.
func (m *cpuMeter) begin() {
	if m.on {
		return
	}
	runtime.LockOSThread()
	m.on, m.start = true, threadCPU()
}

// book adds the open stretch's CPU time and ends it.
func (m *cpuMeter) book() {
	if !m.on {
		return
	}
	if d := threadCPU() - m.start; d > 0 && !m.skip {
		m.own.Add(int64(d))
	}
	m.on, m.skip = false, false
	runtime.UnlockOSThread()
}

// stop ends a stretch left open, unbooked, so that the thread outlives
// the goroutine: a goroutine that ends locked takes its thread down with
// it.
func (m *cpuMeter) stop() {
	if m.on {
		m.on = false
		runtime.UnlockOSThread()
	}
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

// calibrationDueLocked reports whether calibrateDue has one to run: the
// first (Start's failed) or a recalibration, none in flight, and no
// governor detach in flight (its CPU would count as the calibration's).
func (u *uprobes) calibrationDueLocked(now time.Time) bool {
	if u.calibrating {
		return false
	}
	return u.lastCalib.IsZero() || (now.Sub(u.lastCalib) >= recalibrateEvery && u.detaching == 0)
}

// calibrateDue runs a calibration when one is due: the first, once, if
// Start's failed, and then every recalibrateEvery (trap costs move with the
// machine's load). It runs on the waker's goroutine without u.mu: it waits
// tens of ms for the kernel to detach its probes, which neither Stats nor
// the reader should wait for, and a Close meanwhile waits at most for the
// detach in flight (calibStop; teardown waits for the waker before it
// frees the program). first says it was the first calibration: its CPU
// time is start-up's, not charged to the budget. If one fails, the costs
// it would have replaced stay until the next, a minute on.
func (u *uprobes) calibrateDue(now time.Time) (ran, first bool) {
	u.mu.Lock()
	if !u.calibrationDueLocked(now) || !u.running || u.stopping || u.coll == nil {
		u.mu.Unlock()
		return false, false
	}
	first = u.lastCalib.IsZero()
	u.calibrating = true
	prog := u.coll.Programs[mapguardProgMapguardEmpty]
	u.mu.Unlock()

	c, err := measureTraps(u.ex, u.multi, u.calibLane, laneCalib, prog, u.calib, &u.calibStop, true, nil)

	u.mu.Lock()
	defer u.mu.Unlock()
	u.calibrating = false
	if u.stopping {
		return true, first
	}
	if err != nil {
		u.log.V(1).Info("calibrate trap costs; earlier costs kept", "error", err.Error())
		u.lastCalib = time.Now()
		return true, first
	}
	u.keepCalibrationLocked(c)
	if u.gov != nil {
		if err := u.pushCostsLocked(false); err != nil {
			u.log.V(1).Info("set probe costs", "error", err.Error())
		}
	}
	return true, first
}

// eviction is a buffer the calibration touches before each timed call, to
// evict what the call's trap would find in the caches: one and a half
// times the largest cache a core has to itself (the shared last level is
// the whole machine's, and other work's as much as ours).
type eviction struct{ b []byte }

// Bounds of the eviction buffer, and its size where the caches cannot be
// read (twice the 512 KiB L2 of the project's VMs).
const (
	evictMin     = 256 << 10
	evictMax     = 4 << 20
	evictDefault = 1 << 20
)

func newEviction() *eviction {
	return &eviction{b: make([]byte, evictionSize("/sys/devices/system/cpu/cpu0/cache"))}
}

// run writes a byte of each cache line of the buffer: dirty lines, as a
// program's own work leaves them (read only, the buffer evicted less: an
// emulated trap then cost 0.8-1.4 us, against 1.4-2.0).
func (e *eviction) run() {
	for i := 0; i < len(e.b); i += 64 {
		e.b[i]++
	}
}

// evictionSize is 1.5 times the largest cache below the last level that
// dir (sysfs's cpu0/cache) describes, within evictMin and evictMax.
func evictionSize(dir string) int {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return evictDefault
	}
	top, private := 0, 0
	sizes := map[int]int{}
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), "index") {
			continue
		}
		lvl, err1 := readInt(dir + "/" + e.Name() + "/level")
		size, err2 := readCacheSize(dir + "/" + e.Name() + "/size")
		if err1 != nil || err2 != nil {
			continue
		}
		top = max(top, lvl)
		sizes[lvl] = max(sizes[lvl], size)
	}
	for lvl, size := range sizes {
		if lvl < top || top == 1 {
			private = max(private, size)
		}
	}
	if private == 0 {
		return evictDefault
	}
	return min(max(private*3/2, evictMin), evictMax)
}

func readInt(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}

// readCacheSize reads a sysfs cache size ("512K", "32768K", "1M").
func readCacheSize(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	s := strings.TrimSpace(string(b))
	mult := 1
	switch {
	case strings.HasSuffix(s, "K"):
		mult, s = 1<<10, strings.TrimSuffix(s, "K")
	case strings.HasSuffix(s, "M"):
		mult, s = 1<<20, strings.TrimSuffix(s, "M")
	}
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("cache size %q", string(b))
	}
	return n * mult, nil
}
