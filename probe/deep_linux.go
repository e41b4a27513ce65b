//go:build linux && amd64

package probe

// Deep watching: probes on every operation of a kind, kept inside a CPU
// budget by detaching them part of the time.

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"

	"github.com/mapguard/mapguard/bpf"
	"github.com/mapguard/mapguard/decode"
	"github.com/mapguard/mapguard/internal/rt"
	"github.com/mapguard/mapguard/symbols"
)

// threadCPU is the CPU time of the calling thread.
func threadCPU() time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_THREAD, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func randomSalt() uint64 {
	var b [8]byte
	rand.Read(b[:])
	return binary.LittleEndian.Uint64(b[:])
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// calibrationSink keeps calibrationTarget's cold branch alive.
var calibrationSink string

// calibrationTarget is what the cost calibration probes: a function with a
// stack check and a frame, so that its first instruction after the stack
// check is PUSHQ BP, which the kernel emulates, as at the deep sites. Its
// first argument (AX) is a map, so that the probe runs the deep program's
// path for a write with OpStats and SharedWriters: count the call site,
// note the writer.
//
//go:noinline
func calibrationTarget(m map[int]int, n int) int {
	if n < 0 {
		calibrationSink = fmt.Sprint(m)
	}
	return n + 1
}

const (
	calibrationFunc  = "github.com/mapguard/mapguard/probe.calibrationTarget"
	calibrationCalls = 20000
	// burstSeconds bounds the budget deep probes may save up: at most this
	// many seconds' worth is spent at once.
	burstSeconds = 1
)

// calibrateLocked measures what one hit of the BPF program costs on this
// machine at an emulated instruction: the time of calibrationCalls calls
// of calibrationTarget with a probe, minus without.
func (u *uprobes) calibrateLocked(bin *symbols.Binary) (time.Duration, error) {
	fn, ok := bin.Func(calibrationFunc)
	if !ok {
		return 0, errors.New("calibration function not in binary")
	}
	code, err := bin.Code(fn)
	if err != nil {
		return 0, err
	}
	at, err := symbols.EntrySite(code)
	if err != nil {
		return 0, err
	}
	if !at.Emulated {
		return 0, fmt.Errorf("calibration site %s is not emulated", at.Inst)
	}
	s := &site{index: calibIndex, fn: fn, deep: true, found: found{at: at, mapReg: regAX, typReg: regNone}}
	conf := bpf.MapguardSiteConf{Flags: siteCount | siteWriter, MapReg: regAX, TypReg: regNone}
	if err := u.coll.Maps[bpf.MapguardMapSites].Put(s.index, conf); err != nil {
		return 0, err
	}
	m := map[int]int{}
	run := func() time.Duration {
		t0 := time.Now()
		n := 0
		for i := 0; i < calibrationCalls; i++ {
			n = calibrationTarget(m, n)
		}
		d := time.Since(t0)
		if n != calibrationCalls {
			panic("calibration")
		}
		return d
	}
	base := run()
	// Attaching and detaching cost CPU time in this thread (the rest of
	// their wall time is waiting for the kernel's grace periods): measure
	// it, to charge each duty cycle to the budget.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	c0 := threadCPU()
	if err := u.armLocked(s); err != nil {
		return 0, err
	}
	c1 := threadCPU()
	with := run()
	l := s.link
	s.link = nil
	c2 := threadCPU()
	l.Close()
	u.linkCost = c1 - c0 + threadCPU() - c2
	// The first attach of a program costs more than the later ones the
	// governor makes: measure once more and keep the lower.
	c0 = threadCPU()
	if err := u.armLocked(s); err != nil {
		return 0, err
	}
	l = s.link
	s.link = nil
	l.Close()
	u.linkCost = min(u.linkCost, threadCPU()-c0)
	u.readCounters()
	if hits := u.counters[calibIndex].Hits; hits != calibrationCalls {
		return 0, fmt.Errorf("calibration probe hit %d times, want %d", hits, calibrationCalls)
	}
	cost := (with - base) / calibrationCalls
	if cost <= 0 {
		cost = time.Nanosecond
	}
	return cost, nil
}

// startWakerLocked starts the goroutine that the BPF program wakes when a
// site goes over its rate limit or the deep probes have spent their budget,
// so that they are detached at once rather than at the next tick.
func (u *uprobes) startWakerLocked() error {
	r, err := ringbuf.NewReader(u.coll.Maps[bpf.MapguardMapWakeups])
	if err != nil {
		return err
	}
	u.wakeReader = r
	u.wakeDone = make(chan struct{})
	ready := make(chan error, 1)
	go u.runWaker(r, ready)
	return <-ready
}

// runWaker runs the governor whenever the BPF program asks, until r is
// closed. Its name is in mapguard.GoroutineFunctions.
func (u *uprobes) runWaker(r *ringbuf.Reader, ready chan<- error) {
	defer close(u.wakeDone)
	ready <- u.ignoreLocked(rt.GoID()) // Start holds u.mu
	var rec ringbuf.Record
	for {
		if err := r.ReadInto(&rec); err != nil {
			return // closed
		}
		u.tickFrom(time.Now(), false)
	}
}

// startDeepLocked arms the deep sites with a full burst of budget.
func (u *uprobes) startDeepLocked(now time.Time) error {
	u.deepSince = now
	u.deepLastGov = now
	u.deepTokens = u.cfg.budget() * burstSeconds * 1e9
	// The first attach is part of Start, measured as Start's latency; later
	// ones are the governor's and charged to the budget.
	err := u.armDeepLocked()
	u.deepTokens += float64(u.deepGovTime)
	u.deepGovTime = 0
	return err
}

// burst is the most CPU time (ns) the deep probes may save up and spend at
// once: a second's worth of budget, and at least ten times what attaching
// and detaching them costs, so that each duty cycle pays for itself.
func (u *uprobes) burst() float64 {
	return max(u.cfg.budget()*burstSeconds*1e9, 10*float64(u.cycleCost()))
}

// cycleCost is the CPU time of attaching (or detaching) every deep probe,
// as calibrated.
func (u *uprobes) cycleCost() time.Duration {
	n := 0
	for _, s := range u.sites {
		if s.deep {
			n++
		}
	}
	return time.Duration(n) * u.linkCost
}

// setDeepLimitLocked makes the BPF program wake the governor at the hit
// count where the tokens left are spent, not at the next tick.
func (u *uprobes) setDeepLimitLocked(hits uint64) error {
	return u.deepLimit.Set(hits + uint64(u.deepTokens/float64(u.hitCost)) + 1)
}

func (u *uprobes) armDeepLocked() error {
	defer u.chargeCycle()
	var hits uint64
	if err := u.deepHitsVar.Get(&hits); err != nil {
		return err
	}
	u.deepLast = hits
	if err := u.setDeepLimitLocked(hits); err != nil {
		return err
	}
	for _, s := range u.sites {
		if !s.deep {
			continue
		}
		if err := u.armLocked(s); err != nil {
			u.disarmDeepLocked() // those already attached
			return fmt.Errorf("attach %s+%#x: %w", s.fn.Name, s.at.Offset, err)
		}
	}
	u.deepArmed = true
	return nil
}

// chargeCycle spends one attach or detach of the deep probes from the
// budget.
func (u *uprobes) chargeCycle() {
	d := u.cycleCost()
	u.deepTokens -= float64(d)
	u.deepGovTime += d
}

func (u *uprobes) disarmDeepLocked() {
	defer u.chargeCycle()
	done := make(chan struct{})
	n := 0
	for _, s := range u.sites {
		if s.deep && s.link != nil {
			n++
			go func(l link.Link) {
				l.Close()
				done <- struct{}{}
			}(s.link)
			s.link = nil
		}
	}
	for ; n > 0; n-- {
		<-done
	}
	u.deepArmed = false
}

// governLocked keeps deep watching inside its budget. Tokens (CPU
// nanoseconds) accrue at Budget per second, up to burst, and every deep
// hit spends HitCost (and every attach or detach its CPU time). When they run out (the BPF program wakes
// the reader at that hit count), the deep probes are detached until the
// debt is paid back; then they are attached again. The budget therefore
// holds on average, over the time it takes to earn back one burst.
func (u *uprobes) governLocked(now time.Time) {
	if !u.deep || u.deepSince.IsZero() {
		return
	}
	elapsed := now.Sub(u.deepLastGov)
	if elapsed < 0 {
		return
	}
	u.deepLastGov = now
	var hits uint64
	if err := u.deepHitsVar.Get(&hits); err != nil {
		return
	}
	budget := u.cfg.budget()
	u.deepTokens += budget * float64(elapsed)
	u.deepTokens -= float64(hits-u.deepLast) * float64(u.hitCost)
	u.deepTokens = min(u.deepTokens, u.burst())
	u.deepLast = hits
	if u.deepArmed {
		u.deepWatched += elapsed
		if u.deepTokens > 0 {
			u.setDeepLimitLocked(hits)
			// Hits that passed the limit before it was set never wake the
			// governor: if that happened, the budget is spent now.
			var later uint64
			if u.deepHitsVar.Get(&later) != nil || later <= hits+uint64(u.deepTokens/float64(u.hitCost)) {
				return
			}
			u.deepTokens -= float64(later-hits) * float64(u.hitCost)
			u.deepLast = later
		}
		u.disarmDeepLocked()
		u.deepDetach.Add(1)
		u.deepOffTill = now.Add(time.Duration(max(0, -u.deepTokens) / budget))
		u.log.V(1).Info("deep probes detached: budget spent", "until", u.deepOffTill)
		return
	}
	// Hits taken while the probes were being detached arrive late: push
	// the re-arm back until they are paid for too.
	if u.deepTokens <= 0 {
		if till := now.Add(time.Duration(-u.deepTokens / budget)); till.After(u.deepOffTill) {
			u.deepOffTill = till
		}
		return
	}
	if !now.Before(u.deepOffTill) {
		if err := u.armDeepLocked(); err != nil {
			u.log.Error(err, "re-arm deep probes")
			u.deepOffTill = now.Add(5 * time.Second)
		}
	}
}

func (u *uprobes) deepStatsLocked(now time.Time) *DeepStats {
	if !u.deep || u.deepSince.IsZero() {
		return nil
	}
	var hits uint64
	if u.deepHitsVar != nil {
		u.deepHitsVar.Get(&hits)
	}
	d := &DeepStats{
		HitCost:  u.hitCost,
		Budget:   u.cfg.budget(),
		Watched:  u.deepWatched,
		Elapsed:  now.Sub(u.deepSince),
		Hits:     hits,
		Detaches: int(u.deepDetach.Load()),
		Governor: u.deepGovTime,
		Burst:    time.Duration(u.burst()),
	}
	if !u.deepArmed {
		d.RearmAt = u.deepOffTill
	}
	if d.Elapsed > 0 {
		d.DutyCycle = min(1, float64(d.Watched)/float64(d.Elapsed))
		d.Overhead = (float64(hits)*float64(u.hitCost) + float64(u.deepGovTime)) / float64(d.Elapsed)
	}
	return d
}

// excluded reports whether a SharedWriters event is excluded by the user.
func (u *uprobes) excluded(ev *decode.Event) bool {
	for _, x := range u.cfg.SharedExclude {
		if ev.MapType == x || strings.HasPrefix(ev.Site.Function, x) {
			return true
		}
	}
	return false
}

// OpStats returns the operation counts per call site and kind, as counted
// in the kernel since Start (while the deep probes were attached).
func (u *uprobes) OpStats() []OpStat {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.aggs == nil || !u.cfg.OpStats {
		return nil
	}
	if u.statsDec == nil {
		clock, _ := newClock()
		cfg := decoderConfig(u.offsets, clock)
		cfg.Scope, cfg.MissScope = nil, nil
		u.statsDec = decode.NewDecoder(cfg)
	}
	var (
		key bpf.MapguardAggKey
		val bpf.MapguardAggVal
		ev  decode.Event
		raw []byte
		out []OpStat
	)
	it := u.aggs.Iterate()
	for it.Next(&key, &val) {
		if int(key.Site) >= len(u.sites) || u.sites[key.Site].flags&siteCount == 0 {
			continue
		}
		s := u.sites[key.Site]
		raw = decode.Record(raw, decode.NilMapRead, key.Site, 0, 0, val.Count, []uintptr{uintptr(key.Pc)}, "")
		if err := u.statsDec.Decode(raw, &ev); err != nil && !errors.Is(err, decode.ErrRuntimeOwned) {
			continue
		}
		out = append(out, OpStat{Op: s.op, Site: ev.Site, MapType: ev.MapType, Count: val.Count})
	}
	return out
}
