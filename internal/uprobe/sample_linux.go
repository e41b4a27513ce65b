//go:build linux && amd64

package uprobe

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// The trap sampler measures what the probes' traps cost in this process,
// in place, and corrects the calibrated costs by it.
//
// The calibration times traps on a function of the Guard's own, with the
// core's private caches evicted before each: the closest it can come
// cheaply to a trap in a busy program. In the seeded service a CPU
// profile still put the traps at 1.1-1.8 times what the governor booked
// (median 1.4; the nested read's emulated CALL at 1.7): the shared cache
// and the TLB are colder there than a calibration can make them.
//
// So, when the traps are a real part of the budget (sampleFrom), the
// sampler attaches mapguard_sample to the local APIC timer's interrupt (a
// raw tracepoint): the scheduler's tick, HZ times a second on a busy CPU
// (250 here), and the CPU's other timers. It counts the interrupts that
// find one of the process's threads current, and those that find it in a
// site's trap (bpf/src/mapguard.bpf.c says how it tells). The traps' share
// of the samples, times the process's CPU time over the same stretch, is
// what they cost; less their programs' measured time, over their hits'
// calibrated floors, it is the scale the governor's floors are multiplied
// by from then on (floor). A trap (an instruction) whose own samples are
// enough gets a scale of its own: a rare hit in a program that trashes
// its caches between hits (a nil-map write that net/http recovers and
// logs) costs in place several times what a hot one costs, and one scale
// for both over-books the one and under-books the other (see
// estimateLocked); the others share the pool's scale. A single-stepped
// trap's second part runs in the [uprobes] area, no one site's: its
// samples are shared among the single-stepped sites by their floors.
//
// The interrupts come anyway: a sample costs the process only the
// program's run, about sampleCost (BenchmarkSampleCost), booked as the
// Guard's own work. A Go process takes many more of them than the tick's
// (its runtime's timers: the seeded service about 1,900 a second on 0.9
// CPU), so the samples may cost at most sampleShare of each second's
// budget: once they have, the program is detached until the next second.
// (The sampler's first way, a task-clock perf event on each thread, cost
// about 5 us a sample, and every context switch of a sampled thread about
// 3 us more, to stop and start the event's timer: on the seeded service,
// 9,400 switches a second, about 28 ms a second, unbooked, while it ran.)
// The program runs for every process's timer interrupts while attached,
// and returns at once for the others'. An estimate takes minSamples
// samples in the traps: on the seeded service the provisional one came
// after a second of sampling and the first after 8-9. After each estimate
// the sampler rests restFactor times as long as it ran. Threads started
// while it is on are sampled too, and only the process's own are counted.
//
// The scale is never below 1. The calibration is a floor: a program whose
// traps find warm caches (a tight loop of hits) costs less than it and is
// over-booked, which is safe; a sampler that sees no trap at all (a kernel
// that enters them another way) must not halve the account. An interrupt
// that comes due while the kernel runs with interrupts off (the last
// stretch of a trap's way back to user space) is taken in user space, at
// the address the trap resumes at: it is counted as the trap's.
const (
	// sampleCost is what one of the process's samples costs it: the
	// program's run in the interrupt (BenchmarkSampleCost: 2.8-3.4 us on
	// the project's VMs, with the kernel's BPF run-time statistics on,
	// which add to it; 0.9-1.1 us a run for the other processes' samples,
	// which return at once).
	sampleCost = 3 * time.Microsecond
	// sampleShare is the most of each second's budget the samples may
	// cost while the sampler runs: once they have, it pauses until the
	// next second.
	sampleShare = 0.1
	// The sampler turns on while the traps booked over the last second
	// are at least sampleFrom of the budget, and off below half of it.
	sampleFrom = 0.10
	restFactor = 4
	// An estimate takes minSamples samples in the traps (about 22% of
	// statistical error); the scale moves halfway to each new one. Until
	// the first, a provisional one from firstSamples (about 35%) stands in
	// (see estimateLocked).
	// maxScale bounds a scale: a provisional estimate is +-35%, and the
	// cold nil-map write's trap (see estimateLocked) measured 6.2 in a
	// perf profile and 7.7 by the sampler.
	minSamples   = 20
	firstSamples = 8
	maxScale     = 8.0
)

// sampler is the trap sampler's state; the reader's, under u.mu.
type sampler struct {
	prog      *ebpf.Program
	lnk       link.Link // the program on the timer's tracepoint, while attached
	on        bool      // sampling: attached, or paused until the next second
	busy      bool      // an attach is under way (off u.mu)
	linked    bool      // lnk was set at the last tick
	onSince   time.Time
	restUntil time.Time
	ips       *ebpf.Map // trap_ips
	// known counts the sites whose addresses are in ips (sites are added
	// after Start; their indexes only grow).
	known    int
	xolSet   bool
	xolStart *ebpf.Variable
	xolEnd   *ebpf.Variable
	// counts is sample_counts in the memory-mapped .bss, at off.
	mem    *ebpf.Memory
	off    int64
	counts mapguardSampleCounts
	cpu    time.Duration // the process's CPU time at the last read while on
	calibs int           // u.calibrations at the last read
	// Per site, the counters at the last read.
	hits, samples [maxSites]uint64
	// pool is the scale of the traps that have none of their own (see
	// estimateLocked), and acc the process's samples and CPU time since
	// its last estimate.
	pool scaleEst
	acc  sampleAcc
	// Per trap, keyed by the index of the first site at its instruction
	// (trapKey, set for the sites known): its own scale once its samples
	// gave one, and its samples since its last estimate.
	trapKey [maxSites]uint32
	trapEst [maxSites]scaleEst
	trapAcc [maxSites]sampleAcc
	inTraps uint64 // samples found in a trap, in all
	// The traps booked (ns) since winStart, for turning on and off.
	winLoad  float64
	winStart time.Time
	// The process's samples since secStart (see sampleShare).
	secStart time.Time
	secOwn   uint64
}

// sampleAcc is the samples and the booked costs since the last estimate,
// over the stretches the sampler was on.
type sampleAcc struct {
	// samples found in the traps: a single-stepped trap's second part,
	// in the [uprobes] area, is no one site's, and is shared among the
	// single-stepped sites by their floors over the same tick.
	samples     float64
	own         uint64
	cpu         float64 // ns of the process's CPU over the same stretches
	floor, prog float64 // ns: the hits' calibrated trap floors, their programs' time
}

// scaleEst is one trap scale, and how far it was estimated.
type scaleEst struct {
	// scale is what the traps cost in place over their calibrated floor:
	// 1 until measured for the pool; 0 for a trap with no scale of its
	// own.
	scale     float64
	estimates int
	// provisional: the scale is the provisional estimate (see
	// estimateLocked).
	provisional bool
}

// startSamplerLocked prepares the sampler, off. It is optional: without
// it (a verifier that refuses mapguard_sample), the calibrated costs
// stand, as before; a tracepoint it cannot attach to turns it off for
// good when it first turns on.
func (u *uprobes) startSamplerLocked(countsOff int64) error {
	prog := u.coll.Programs[mapguardProgMapguardSample]
	tgid := u.coll.Variables[mapguardVarSampleTgid]
	if prog == nil || tgid == nil || u.statsMem == nil {
		return errors.New("trap sampler not loaded")
	}
	p := &sampler{
		prog:     prog,
		ips:      u.coll.Maps[mapguardMapTrapIps],
		xolStart: u.coll.Variables[mapguardVarXolStart],
		xolEnd:   u.coll.Variables[mapguardVarXolEnd],
		mem:      u.statsMem,
		off:      countsOff,
		pool:     scaleEst{scale: 1},
	}
	if err := tgid.Set(uint32(os.Getpid())); err != nil {
		return err
	}
	u.samp = p
	return nil
}

// close ends sampling: the program is detached.
func (p *sampler) close() {
	p.detach()
	p.on = false
}

// newLink attaches the program to the local APIC timer's interrupt; it
// counts at once.
func (p *sampler) newLink() (link.Link, error) {
	l, err := link.AttachRawTracepoint(link.RawTracepointOptions{Name: sampleTracepoint, Program: p.prog})
	if err != nil {
		return nil, fmt.Errorf("attach to %s: %w", sampleTracepoint, err)
	}
	return l, nil
}

// detach detaches the program at once (sampling ends, or pauses until the
// next second; sampleDetachLocked does it off the lock).
func (p *sampler) detach() {
	if p.lnk != nil {
		p.lnk.Close()
		p.lnk = nil
	}
}

// sampleTracepoint is the raw tracepoint the sampler runs on: x86's local
// APIC timer interrupt, in the interrupted thread's context.
const sampleTracepoint = "local_timer_entry"

// addTrapIPsLocked puts the sites added since the last call in trap_ips
// (if the sampler has it: not in unit tests), and keys each with its
// trap: the first site at its instruction.
func (u *uprobes) addTrapIPsLocked(p *sampler) {
	for ; p.known < len(u.sites); p.known++ {
		s := u.sites[p.known]
		p.trapKey[s.index] = s.index
		at := s.fn.FileOffset + s.at.Offset
		for _, t := range u.sites[:p.known] {
			if t.fn.FileOffset+t.at.Offset == at {
				p.trapKey[s.index] = p.trapKey[t.index]
				break
			}
		}
		if p.ips == nil {
			continue
		}
		ips, n := trapIPs(s)
		for _, ip := range ips[:n] {
			if err := p.ips.Put(ip, s.index); err != nil {
				u.log.V(1).Info("trap sampler: site address", "error", err.Error())
			}
		}
	}
}

// trapIPs are the user addresses at which a sample in s's trap finds the
// thread (see mapguard_sample): just past the breakpoint on the way in;
// the breakpoint's own while the kernel runs the programs (handle_swbp
// sets it back there first); where the instruction resumes once the
// kernel has emulated or single-stepped it (the next one, a branch's
// target). Not the next instruction of an emulated JMP or CALL, where
// the trap does not resume, and not a CALL's target either: the callee's
// entry, which every other caller runs too (the nested read's CALL goes
// to mapaccess1_faststr, which net/http calls on every header lookup).
// A key is one site's only: sites at one instruction share a trap, and
// resume addresses can coincide.
func trapIPs(s *site) (ips [4]uint64, n int) {
	at := s.fn.Entry + s.at.Offset
	ips[0], ips[1], n = at, at+1, 2
	call := strings.HasPrefix(s.at.Inst, "CALL ")
	jump := s.at.Emulated && s.at.Branch && (call || strings.HasPrefix(s.at.Inst, "JMP "))
	if s.at.Len > 0 && !jump {
		ips[n], n = at+uint64(s.at.Len), n+1
	}
	if s.at.Emulated && s.at.Branch && !call {
		ips[n], n = s.fn.Entry+s.at.Target, n+1
	}
	return ips, n
}

// sampleLocked is the sampler's part of the reader's tick: it books what
// sampling cost, adds the samples since the last call to the estimate,
// corrects the scale when an estimate is due, and turns the sampler on or
// off. u.counters must be current.
func (u *uprobes) sampleLocked(now time.Time) {
	p := u.samp
	if p == nil || u.gov == nil {
		return
	}
	u.addTrapIPsLocked(p)
	var c mapguardSampleCounts
	if _, err := p.mem.ReadAt(unsafe.Slice((*byte)(unsafe.Pointer(&c)), unsafe.Sizeof(c)), p.off); err != nil {
		return
	}
	own, xol := c.Own-p.counts.Own, c.Xol-p.counts.Xol
	p.counts = c
	u.extra += time.Duration(own) * sampleCost
	p.secOwn += own
	p.inTraps += xol
	// Only the stretches the program ran all along count: attached at the
	// last tick and still (it is attached off the lock, between ticks, and
	// detached here). A recalibration's single-stepped traps run in the
	// [uprobes] area too, on a function no site is at: the ticks it
	// overlaps are not counted.
	counted := p.linked && p.lnk != nil && !u.calibrating && u.calibrations == p.calibs
	defer func() { p.linked = p.lnk != nil }()
	p.calibs = u.calibrations
	a := &p.acc
	var cpu time.Duration // the process's CPU time now, read once a tick at most
	dcpu := 0.0
	if p.on {
		cpu = processCPU()
		if counted {
			dcpu = float64(cpu - p.cpu)
			a.own += own
			a.cpu += dcpu
		}
		p.cpu = cpu
	}
	// The single-stepped sites' floors this tick, to share xol among.
	stepFloors := 0.0
	if counted && xol > 0 {
		for _, s := range u.sites {
			if !s.at.Emulated && !u.sharedTrap(s) {
				stepFloors += float64(u.counters[s.index].Hits-p.hits[s.index]) * float64(u.calibratedFloor(s))
			}
		}
	}
	for _, s := range u.sites {
		cs := &u.counters[s.index]
		dh, ds := cs.Hits-p.hits[s.index], cs.Samples-p.samples[s.index]
		p.hits[s.index], p.samples[s.index] = cs.Hits, cs.Samples
		p.inTraps += ds
		prog, trap := 0.0, 0.0
		if cs.Timed > 0 {
			prog = float64(cs.ProgNs) / float64(cs.Timed)
		}
		if !u.sharedTrap(s) {
			trap = float64(u.calibratedFloor(s))
		}
		k := p.trapKey[s.index]
		p.winLoad += float64(dh) * (trap*p.scaleOf(s.index) + prog)
		if !counted {
			continue
		}
		if dh == 0 && s.link == nil {
			// Detached all along: its addresses ran as plain code, and a
			// sample there was in no trap.
			ds = 0
		}
		t := &p.trapAcc[k]
		if k == s.index {
			t.own += own
			t.cpu += dcpu
		}
		t.samples += float64(ds)
		if !s.at.Emulated && trap > 0 && stepFloors > 0 {
			t.samples += float64(xol) * float64(dh) * trap / stepFloors
		}
		t.floor += float64(dh) * trap
		t.prog += float64(dh) * prog
	}
	// Its samples may cost sampleShare of each second's budget: once the
	// next tick's would take them past it (as many as this tick's), the
	// program is detached until the next second (a Go process takes many
	// more timer interrupts than the tick's: the seeded service 1,900 a
	// second on 0.9 CPU, 5.6 ms of samples a second, 0.57 ms a tick).
	// Detached only once past it, the samples cost 1.0-2.1 ms a second
	// against the 1 ms allowed.
	if now.Sub(p.secStart) >= time.Second {
		p.secStart, p.secOwn = now, 0
		if p.on {
			u.sampleAttachLocked(p)
		}
	} else if p.lnk != nil && sampleCapped(p.secOwn, own, u.gov.perSecond) {
		u.sampleDetachLocked(p)
	}
	if moved, done := u.estimateLocked(); moved {
		if err := u.pushCostsLocked(false); err != nil {
			u.log.V(1).Info("set probe costs", "error", err.Error())
		}
		if done && p.on {
			p.restUntil = now.Add(restFactor * now.Sub(p.onSince))
			p.on = false
			u.sampleDetachLocked(p)
		}
	}
	dt := now.Sub(p.winStart)
	if dt < time.Second {
		return
	}
	share := p.winLoad / dt.Seconds() / u.gov.perSecond
	p.winLoad, p.winStart = 0, now
	switch {
	case p.on && share < sampleFrom/2:
		p.on = false
		u.sampleDetachLocked(p)
	case !p.on && share >= sampleFrom && !now.Before(p.restUntil):
		if !p.xolSet {
			if lo, hi, ok := xolArea(); ok && p.xolStart.Set(lo) == nil && p.xolEnd.Set(hi) == nil {
				p.xolSet = true
			}
		}
		p.secStart, p.secOwn = now, 0
		p.on = true
		u.sampleAttachLocked(p)
		p.onSince, p.cpu = now, processCPU()
	}
}

// sampleCapped reports whether the samples of this second so far
// (secOwn), with as many again as the last tick's (own), cost sampleShare
// of the second's budget (perSecond, ns) or more.
func sampleCapped(secOwn, own uint64, perSecond float64) bool {
	return float64(secOwn+own)*float64(sampleCost) >= sampleShare*perSecond
}

// sampleAttachLocked attaches the program off u.mu (see offLock): an
// attach took 0.1-8 ms here (0.1-0.4 ms of CPU), the kernel patching the
// tracepoint in, and the reader held the lock meanwhile. A sampler that
// cannot attach is off for good: the calibrated costs stand.
func (u *uprobes) sampleAttachLocked(p *sampler) {
	if p.busy || p.lnk != nil {
		return
	}
	p.busy = true
	var l link.Link
	var err error
	u.offLock(func() { l, err = p.newLink() }, func() {
		p.busy = false
		switch {
		case err != nil:
			u.log.V(1).Info("trap sampler off: calibrated costs stand", "error", err.Error())
			p.on = false
			if u.samp == p {
				u.samp = nil
			}
		case u.stopping || !p.on:
			u.offLock(func() { l.Close() }, nil)
		default:
			p.lnk = l
		}
	})
}

// sampleDetachLocked detaches the program off u.mu (a detach took 0.4-0.9
// ms here).
func (u *uprobes) sampleDetachLocked(p *sampler) {
	if l := p.lnk; l != nil {
		p.lnk = nil
		u.offLock(func() { l.Close() }, nil)
	}
}

// offLock runs op on a goroutine of its own, off u.mu, on a thread of its
// own, then books the CPU it took and runs done (if any) under u.mu.
// Teardown waits for it.
func (u *uprobes) offLock(op, done func()) {
	u.detaches.Add(1)
	go func() {
		defer u.detaches.Done()
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		c0 := threadCPU()
		op()
		cpu := threadCPU() - c0
		u.mu.Lock()
		defer u.mu.Unlock()
		u.extra += cpu
		if done != nil {
			done()
		}
	}()
}

// scaleOf is the scale site i's trap is booked at: its own, once its
// samples gave one, else the pool's.
func (p *sampler) scaleOf(i uint32) float64 {
	if int(i) < p.known {
		if sc := p.trapEst[p.trapKey[i]].scale; sc > 0 {
			return sc
		}
	}
	return p.pool.scale
}

// estimateLocked corrects the scales once enough samples are in (see
// scaleEst.update); it reports whether it moved one, and whether one was
// an estimate (done; not a provisional one).
//
// A trap whose own samples are enough is given a scale of its own: what
// a trap costs in place differs by site by more than any one scale can
// say. On the seeded service a perf profile (20 s, 5 kHz) put the
// recovered nil-map write's trap (mapassign_faststr's emulated JE, 120
// hits a second, each followed by a panic that net/http recovers and logs
// with a stack trace, caches cold) at about 21 us a hit, against 2.1 us
// calibrated and 8.1 us of program; the nested read's emulated CALL at
// 2.3 us, as calibrated. The one scale they shared read 4, its cap then:
// it booked every other trap four times over, the hot sites' storms
// included, and still under-booked the nil-map write's. With every site
// exact (Budget 1) it read 1.0-1.2.
//
// The other traps share the pool's scale, estimated from their samples
// together, less the trap with the most: that one is on its way to a
// scale of its own, and in the seeded service, where it was the nil-map
// write's, it made the pool's first estimate alone (7 of 8 samples).
func (u *uprobes) estimateLocked() (moved, done bool) {
	p := u.samp
	big := -1 // the pool's trap with the most samples
	for i := range p.known {
		k := u.sites[i].index
		if p.trapKey[k] != k {
			continue
		}
		e, t := &p.trapEst[k], &p.trapAcc[k]
		before := *t
		if m, d, measured := e.update(t); m {
			moved, done = true, done || d
			u.log.V(1).Info("trap cost measured in place", "function", u.sites[i].fn.Name, "offset", u.sites[i].at.Offset,
				"samples", before.samples, "of", before.own, "measured", measured, "scale", e.scale, "provisional", !d)
		}
		if e.scale == 0 && (big < 0 || t.samples > p.trapAcc[big].samples) {
			big = int(k)
		}
	}
	// The pool's traps: those with no scale of their own, but big.
	inPool := func(k uint32) bool { return p.trapKey[k] == k && p.trapEst[k].scale == 0 && int(k) != big }
	pool := sampleAcc{own: p.acc.own, cpu: p.acc.cpu}
	for i := range p.known {
		if k := u.sites[i].index; inPool(k) {
			t := &p.trapAcc[k]
			pool.samples += t.samples
			pool.floor += t.floor
			pool.prog += t.prog
		}
	}
	before := pool
	m, d, measured := p.pool.update(&pool)
	if pool.own == 0 && before.own > 0 {
		// The pool's samples were used (or told nothing): its traps start
		// again with it.
		p.acc = sampleAcc{}
		for i := range p.known {
			if k := u.sites[i].index; inPool(k) {
				p.trapAcc[k] = sampleAcc{}
			}
		}
	}
	if m {
		moved, done = true, done || d
		u.log.V(1).Info("trap cost measured in place", "samples", before.samples, "of", before.own,
			"measured", measured, "scale", p.pool.scale, "provisional", !d)
	}
	return moved, done
}

// update corrects e from a once minSamples samples were found in the
// traps (then a is emptied), and reports whether it moved the scale,
// whether that was an estimate (done; not the provisional one, see
// below), and what was measured.
//
// Before the first estimate the pool's scale is 1, and the governor books
// the traps at their calibrated floors: on the seeded service half what
// they cost, for the 14-72 s the first estimate took. So once
// firstSamples samples are in, a provisional estimate sets the scale,
// and the samples go on to the first estimate, which replaces it; the
// sampler does not rest after it.
func (e *scaleEst) update(a *sampleAcc) (moved, done bool, measured float64) {
	provisional := e.estimates == 0 && !e.provisional && a.samples >= firstSamples
	if a.samples < minSamples && !provisional {
		return false, false, 0
	}
	if a.floor <= 0 || a.own == 0 {
		// Samples at a trap's addresses while it took no hit (its code
		// ran detached), or no process samples: nothing to tell.
		*a = sampleAcc{}
		return false, false, 0
	}
	traps := a.samples / float64(a.own) * a.cpu
	measured = (traps - a.prog) / a.floor
	est := min(max(measured, 1), maxScale)
	if a.samples < minSamples {
		e.scale, e.provisional = est, true
		return true, false, measured
	}
	if e.estimates == 0 {
		e.scale = est
	} else {
		e.scale = (e.scale + est) / 2
	}
	e.estimates++
	*a = sampleAcc{}
	return true, true, measured
}

// xolArea returns the process's [uprobes] area, where the kernel runs the
// copies of single-stepped instructions (it exists once a single-stepped
// probe has fired: Start's calibration fires some).
func xolArea() (lo, hi uint64, ok bool) {
	b, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		return 0, 0, false
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := sc.Bytes()
		if !bytes.HasSuffix(line, []byte("[uprobes]")) {
			continue
		}
		r, _, _ := bytes.Cut(line, []byte(" "))
		a, z, found := bytes.Cut(r, []byte("-"))
		if !found {
			return 0, 0, false
		}
		lo, err1 := strconv.ParseUint(string(a), 16, 64)
		hi, err2 := strconv.ParseUint(string(z), 16, 64)
		return lo, hi, err1 == nil && err2 == nil && lo < hi
	}
	return 0, 0, false
}
