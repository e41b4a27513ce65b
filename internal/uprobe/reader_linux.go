//go:build linux && amd64

package uprobe

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"

	"github.com/mapguard/mapguard/decode"
	"github.com/mapguard/mapguard/internal/rt"
	"github.com/mapguard/mapguard/internal/wire"
)

// run is the reader goroutine: it drains the ring buffer every poll
// interval (records are submitted without a wake-up), or at once when
// Start asks for the canary (readerWake), decodes and delivers, and runs
// the cost governor on each poll. It waits on a timer, never in a system
// call (poll_linux.go).
func (u *uprobes) run(ready chan<- error) {
	defer close(u.done)
	cpu := startCPUMeter(&u.ownCPU, true)
	defer cpu.stop()
	// Start holds u.mu and set u.ignore before starting this goroutine.
	if err := u.ignoreLocked(rt.GoID()); err != nil {
		ready <- err
		return
	}
	close(ready)

	var (
		rec ringbuf.Record
		ev  decode.Event
	)
	handle := func(raw []byte) { u.handle(raw, &ev) }
	timer := time.NewTimer(pollInterval)
	defer timer.Stop()
	for {
		select {
		case <-timer.C:
			cpu.begin()
			if !drain(u.reader, &rec, handle) {
				return
			}
			u.tick()
			cpu.book()
			timer.Reset(pollInterval)
		case <-u.readerWake:
			cpu.begin()
			if !drain(u.reader, &rec, handle) {
				return
			}
			u.deliverPending()
			cpu.book()
		case took := <-u.takeAsk:
			cpu.begin()
			if !drain(u.reader, &rec, handle) {
				return
			}
			u.mu.Lock()
			if !u.stopping && u.coll != nil && u.reader.AvailableBytes() == 0 {
				u.takeNestedLocked(time.Now())
			}
			u.mu.Unlock()
			cpu.book()
			close(took)
		case <-u.readerStop:
			drain(u.reader, &rec, handle) // what is left, then stop
			return
		}
	}
}

// runDeep drains the deep sites' ring buffer, on a goroutine of its own
// (ignored like the reader), so that deep events never crowd out the
// default ones. Its name is in mapguard.GoroutineFunctions.
func (u *uprobes) runDeep(ready chan<- error) {
	defer close(u.deepDone)
	cpu := startCPUMeter(&u.ownCPU, false)
	defer cpu.stop()
	ready <- u.ignoreLocked(rt.GoID()) // Start holds u.mu
	var (
		rec ringbuf.Record
		ev  decode.Event
	)
	handle := func(raw []byte) { u.handleWith(u.deepDecoder, raw, &ev) }
	ticker := time.NewTicker(pollInterval)
	defer ticker.Stop()
	for {
		select {
		case <-ticker.C:
			cpu.begin()
			if !drain(u.deepReader, &rec, handle) {
				return
			}
			cpu.book()
		case <-u.deepStop:
			drain(u.deepReader, &rec, handle)
			return
		}
	}
}

// handle decodes and delivers one record of the always-on sites, on the
// reader goroutine.
func (u *uprobes) handle(raw []byte, ev *decode.Event) { u.handleWith(u.decoder, raw, ev) }

// handleWith decodes with dec, which only the calling goroutine uses (the
// reader's, or the deep reader's own), and delivers.
func (u *uprobes) handleWith(dec *wire.Decoder, raw []byte, ev *decode.Event) {
	h, err := wire.Peek(raw)
	if err != nil {
		u.log.Error(err, "bad record")
		return
	}

	sites := u.readSites() // the deep reader runs this too, without u.mu
	if err := dec.Decode(raw, ev); err != nil {
		owned := errors.Is(err, wire.ErrRuntimeOwned) || errors.Is(err, wire.ErrStdlib)
		if owned || errors.Is(err, wire.ErrOutOfScope) {
			if int(h.Site) >= len(sites) {
				return
			}
			if owned {
				u.notOwned[h.Site].Add(1)
			} else {
				u.outOfScope[h.Site].Add(1)
			}
			if sites[h.Site].flags&siteAgg != 0 {
				// Count this call site from now on, but never report it.
				key := mapguardAggKey{Site: h.Site, Pc: uint64(h.PC)}
				if h.Kind == decode.NestedMapMiss {
					key.Site |= aggNested
				}
				u.muteAgg(key)
			}
			return
		}
		u.log.Error(err, "bad record")
		return
	}
	if h.Typ != 0 && h.Typ == u.canaryT {
		select {
		case u.canary <- *ev:
		default: // a late or repeated canary
		}
		return
	}
	byCode := false
	if (ev.Kind == decode.NilMapRead || ev.Kind == decode.NestedMapMiss) && u.watched[decode.NestedMapMiss] {
		// The caller's code tells a nested read without the outer miss
		// (a sampled miss site need not be attached at the time).
		if outer, ok := u.nestedOuter(h.PC); ok {
			ev.Kind, byCode = decode.NestedMapMiss, true
			ev.Peer = &decode.Peer{Goroutine: ev.Goroutine, Site: dec.SiteOf(outer)}
		}
	}
	if ev.Kind == decode.NestedMapMiss && !byCode && !u.nestedLocked(h, ev) {
		// Two reads close together, but the first did not return the
		// map the second read: a plain nil-map read, and so are its later
		// occurrences that the kernel counts as nested.
		ev.Kind, ev.Peer = decode.NilMapRead, nil
		u.notNested[mapguardAggKey{Site: h.Site | aggNested, Pc: uint64(h.PC)}] = true
	}
	if ev.Kind == decode.NestedMapMiss && int(h.Site) < len(sites) && sites[h.Site].flags&siteCaller == 0 {
		// Counted at its own site, in the caller's code, once that took
		// over and has reported the call site. Not before: an occurrence
		// whose CALL ran just before the site was attached, and whose
		// goroutine then waited before the runtime's trap, is the
		// runtime's alone (seen in CI: the first nested miss of a test
		// program, lost). The CALL's record comes first in the ring.
		if c, probed := u.callerAt(uint64(h.PC)); probed && !ev.Time.Before(c.since) {
			if seen, _ := u.nestedSeen[h.PC]; seen {
				return
			}
		}
	}
	if ev.Kind == decode.NestedMapMiss && u.watched[ev.Kind] {
		// A call site's nested misses have two aggregates in the kernel
		// (paired with the outer miss, and not): the first event of the
		// second is a count for the next report, not a new call site.
		if seen, _ := u.nestedSeen[h.PC]; seen {
			u.nestedLate[mapguardAggKey{Site: h.Site, Pc: uint64(h.PC)}]++
			return
		}
		u.nestedSeen[h.PC] = true
	}
	if !u.watched[ev.Kind] {
		return // the canary's site, its kind not watched
	}
	if int(h.Site) < len(u.sampled) {
		ev.Sampled = u.sampled[h.Site].Load()
	}
	if int(h.Site) < len(u.useful) {
		u.useful[h.Site].Store(true)
	}
	if decode.IsStatistic(ev.Kind) && int(h.Site) < len(sites) {
		commaOK := u.commaOK(h.PC)
		u.calls.add(h.PC, commaOK, ev, ev.Count, ev.Sampled)
		if u.statsOnly[ev.Kind] || commaOK {
			return // an idiom as often as a bug: counted, not an event
		}
	}
	if decode.IsDeep(ev.Kind) {
		if ev.Kind == decode.SharedWriters && u.excluded(ev) {
			u.outOfScope[h.Site].Add(1)
			return
		}
	}
	if v := u.log.V(8); v.Enabled() {
		v.Info("event", "kind", ev.Kind.String(), "site", ev.Site.String())
	}
	u.sink(ev)
}

// tick is the reader's periodic work: crash reports not yet delivered and
// the per-call-site counts (both go to the sink, which only the reader
// calls), then the governor: it books the hits, and plans when due.
func (u *uprobes) tick() {
	u.mu.Lock()
	defer u.mu.Unlock()
	now := time.Now() // with u.mu held: the governor's accounts run in time order
	if u.stopping || u.coll == nil {
		return
	}
	if len(u.pending) > 0 && u.running {
		u.deliverCrashesLocked()
	}
	u.readCounters()
	// Counts go out only once the ring buffer is drained, so that the
	// first occurrence at a call site, an event of its own, comes first.
	if now.Sub(u.lastAgg) >= aggInterval && u.reader.AvailableBytes() == 0 {
		u.lastAgg = now
		u.flushAggsLocked()
	}
	if u.reader.AvailableBytes() == 0 && u.running {
		u.takeNestedLocked(now) // the search for nested reads is done
	}
	u.sampleLocked(now)
	if u.bookLocked(now) && u.planDueLocked(now) {
		u.planLocked(now)
	}
	if u.statsUsed.Load() {
		if v := u.view.Load(); v == nil || now.Sub(v.at) >= pollInterval/2 {
			u.publishStatsLocked(now) // for the Stats calls that find u.mu held
		}
	}
	var dropped uint64
	for _, s := range u.sites {
		dropped += u.counters[s.index].Dropped
	}
	if dropped > u.lastDropped {
		u.log.V(1).Info("events dropped: the ring buffer was full; raise Options.BufferSize",
			"dropped", dropped-u.lastDropped, "total", dropped)
		u.lastDropped = dropped
	}
}

// deliverPending delivers the crash records Start found, once Start is
// done (it wakes the reader then), rather than at the next tick: a
// process that dies in its first 100 ms still reports them.
func (u *uprobes) deliverPending() {
	u.mu.Lock()
	defer u.mu.Unlock()
	if len(u.pending) > 0 && u.running && !u.stopping && u.coll != nil {
		u.deliverCrashesLocked()
	}
}

// wake is the waker's work: the governor only (it never calls the sink).
// It reads the clock once it holds u.mu, as tick does: the reader and
// the waker each took the time before waiting for the lock, and an
// account 15 ms older than the one before it (the seeded service, in a
// storm) found none of its last second in the governor's record, took
// all spent since Start for one second's (23.7 ms, 2.3 times the real
// figure) and reported it as the worst second.
func (u *uprobes) wake() {
	u.mu.Lock()
	defer u.mu.Unlock()
	now := time.Now()
	if u.stopping || u.coll == nil {
		return
	}
	u.readCounters()
	u.governLocked(now)
}

// flushAggsLocked reports, per call site, the occurrences counted in BPF
// since the last report.
func (u *uprobes) flushAggsLocked() {
	var ev decode.Event
	clock, err := newClock()
	if err != nil {
		return
	}
	now := time.Now()
	// One report per (kind, call site): a nested miss's kernel aggregates
	// (paired with the outer miss, told from the code, at more than one
	// site) are one.
	type report struct {
		index   uint32 // the first site counted
		count   uint64
		sampled bool
	}
	reports := map[mapguardAggKey]report{} // Site: the kind
	add := func(index uint32, kind decode.Kind, pc uint64, count uint64, sampled bool) {
		k := mapguardAggKey{Site: uint32(kind), Pc: pc}
		r, ok := reports[k] // comma-ok: see aggSeen
		if !ok {
			r.index = index
		}
		r.count += count
		r.sampled = r.sampled || sampled
		reports[k] = r
	}
	keys, vals, err := u.aggRead.read(u.aggs)
	if err != nil {
		u.log.V(1).Info("read aggregates", "error", err.Error())
	}
	for i, key := range keys {
		val := vals[i]
		seen, _ := u.aggSeen[key] // comma-ok: a plain read that misses would hit our own probe
		index, kind := key.Site&^aggNested, decode.NestedMapMiss
		if val.Muted == 0 && slices.Contains(u.fresh, index) {
			u.aggSeen[key] = val.Count // counted at the runtime's sites so far
			continue
		}
		if val.Muted != 0 || val.Count <= seen || int(index) >= len(u.sites) || u.sites[index].flags&siteAgg == 0 {
			continue // operation counts (deep sites) are read by OpStats
		}
		u.aggSeen[key] = val.Count
		s := u.sites[index]
		if nn, _ := u.notNested[key]; key.Site&aggNested == 0 || nn {
			kind = s.kind // counted as nested in the kernel, but found not to be
		}
		if kind == decode.NilMapRead && u.watched[decode.NestedMapMiss] {
			if _, ok := u.nestedOuter(uintptr(key.Pc)); ok {
				kind = decode.NestedMapMiss // told from the caller's code
			}
		}
		if !u.watched[kind] {
			continue // a site probed for another kind (nested misses)
		}
		if _, probed := u.callerAt(key.Pc); probed && kind == decode.NestedMapMiss && s.flags&siteCaller == 0 {
			continue // counted at its own site, in the caller's code
		}
		count, sampled := val.Count-seen, false
		if u.gov != nil {
			// A sampled site's counts are scaled by the time it was
			// attached: an estimate, and the event says so.
			var f float64
			f, sampled = u.gov.scale(now, int(index))
			count = uint64(float64(count)*f + 0.5)
		}
		add(index, kind, key.Pc, count, sampled)
		u.useful[index].Store(true)
	}
	for k, n := range u.nestedLate {
		add(k.Site, decode.NestedMapMiss, k.Pc, n, false)
	}
	if len(u.nestedLate) > 0 {
		// Not every flush: a clear is a call of runtime.mapclear, the
		// bloat site, where the reader would trap each second (its
		// first look then saw a rate there, and sampled the site: a
		// bloat event right after Start was lost).
		clear(u.nestedLate)
	}
	for k, r := range reports {
		index, kind := r.index, decode.Kind(k.Site)
		rec := wire.Rec{Kind: kind, Site: index, Mono: uint64(clock.Mono), Count: r.count, NPCs: 1}
		rec.PCs[0] = uintptr(k.Pc)
		if err := u.decoder.DecodeRec(&rec, &ev); err != nil {
			continue
		}
		ev.Time = clock.Wall
		ev.Sampled = r.sampled
		if decode.IsStatistic(ev.Kind) {
			commaOK := u.commaOK(uintptr(k.Pc))
			u.calls.add(uintptr(k.Pc), commaOK, &ev, r.count, r.sampled)
			if u.statsOnly[ev.Kind] || commaOK {
				continue
			}
		}
		u.sink(&ev)
	}
	if u.gov != nil {
		u.gov.flush(now)
	}
	u.aggsFlushed = true // for the governor's next account (see idle)
}

// readCounters refreshes u.counters from the memory-mapped .bss: a copy,
// no system call. Counters only grow, and each is updated atomically.
func (u *uprobes) readCounters() {
	if u.statsMem != nil {
		// Only the sites' counters (site i's at index i): Get copies all
		// maxSites of them (16 KiB), and the governor reads them 15-20
		// times a second; on the seeded service that copy was 7% of the
		// Guard's own CPU.
		if readSiteCounters(u.statsMem, u.statsOff, &u.counters, len(u.sites)) == nil {
			return
		}
	}
	if err := u.stats.Get(&u.counters); err != nil {
		u.counters = [maxSites]mapguardSiteStats{}
	}
}

// readSiteCounters reads the counters of sites 0 to n-1 from mem, the
// memory-mapped stats array at off, into dst.
func readSiteCounters(mem *ebpf.Memory, off int64, dst *[maxSites]mapguardSiteStats, n int) error {
	b := unsafe.Slice((*byte)(unsafe.Pointer(dst)), min(n, maxSites)*int(unsafe.Sizeof(dst[0])))
	_, err := mem.ReadAt(b, off)
	return err
}

// muteAgg makes the kernel count a call site's aggregate from now on
// without it ever being reported.
func (u *uprobes) muteAgg(key mapguardAggKey) {
	if err := u.aggs.Update(key, mapguardAggVal{Muted: 1}, ebpf.UpdateExist); err != nil {
		u.log.V(1).Info("mute call site", "error", err.Error())
	}
	u.aggSeen[key] = 0
}

// nestedLocked reports whether a nested-map miss is one: the outer read
// (ev.Peer's site, whose map type the call site passes as a constant) is of
// a map whose elements are maps of the inner read's type. Without the
// outer type it trusts the kernel's pairing (a miss, then a nil-map read
// of the same goroutine a few instructions later).
func (u *uprobes) nestedLocked(h wire.Header, ev *decode.Event) bool {
	if ev.Peer == nil || h.Typ == 0 {
		return false
	}
	outer := callSiteType(u.offsets, ev.Peer.Site.PC)
	if outer == 0 {
		return true
	}
	return rt.MapElem(outer) == h.Typ
}

// nestedOuter is the package's nestedOuter, cached per call site.
func (u *uprobes) nestedOuter(pc uintptr) (uintptr, bool) {
	if pc == 0 {
		return 0, false
	}
	if c, probed := u.callerAt(uint64(pc)); probed {
		return uintptr(c.outer), true
	}
	if outer, seen := u.nestedAt[pc]; seen {
		return outer, outer != 0
	}
	outer, _ := nestedOuter(u.offsets, pc)
	if u.nestedAt == nil || len(u.nestedAt) >= 4096 {
		u.nestedAt = make(map[uintptr]uintptr)
	}
	u.nestedAt[pc] = outer
	return outer, outer != 0
}

// commaOK reports whether the map call returning to pc is a comma-ok read
// (v, ok := m[k]): the CALL before pc targets runtime.mapaccess2*. (On Go
// 1.27 the probe sits in mapaccess2* for both forms, and a plain read's
// pc is already its user's, past the mapaccess1* wrapper.)
func (u *uprobes) commaOK(pc uintptr) bool {
	if ok, seen := u.commaOKs[pc]; seen {
		return ok
	}
	ok := strings.HasPrefix(callTarget(pc), "runtime.mapaccess2")
	if u.commaOKs == nil || len(u.commaOKs) >= 4096 {
		u.commaOKs = make(map[uintptr]bool)
	}
	u.commaOKs[pc] = ok
	return ok
}

// startReadersLocked builds the decoders and starts the readers (each
// ignores itself before any probe is armed) and the governor's waker.
func (u *uprobes) startReadersLocked(offsets *rt.Offsets, clock wire.Clock) error {
	// Per site, sites added after Start included.
	u.notOwned = make([]atomic.Uint64, maxSites)
	u.useful = make([]atomic.Bool, maxSites)
	u.sampled = make([]atomic.Bool, maxSites) // before the readers start
	u.outOfScope = make([]atomic.Uint64, maxSites)
	u.aggSeen = make(map[mapguardAggKey]uint64)
	u.notNested = make(map[mapguardAggKey]bool)
	u.nestedSeen = make(map[uintptr]bool)
	u.nestedLate = make(map[mapguardAggKey]uint64)
	u.publishLocked()
	probes := u.decoderProbes()
	u.clock = clock
	dcfg := decoderConfig(offsets, clock)
	dcfg.StackDepth = u.cfg.StackDepth
	dcfg.Probes = probes
	dcfg.Redact = u.cfg.CaptureKeys
	if len(u.cfg.MissingKeyScope) > 0 {
		miss := wire.NewScope(u.cfg.MissingKeyScope...)
		dcfg.MissScope = &miss
	}
	u.decoder = wire.NewDecoder(dcfg)
	u.deepDecoder = wire.NewDecoder(dcfg)
	// The reader ignores itself before any probe is armed.
	u.canaryT = uintptr(rt.TypeOf(map[canaryKey]uint8(nil)))
	u.canary = make(chan decode.Event, 1)
	u.done = make(chan struct{})
	u.readerWake, u.readerStop = make(chan struct{}, 1), make(chan struct{})
	u.takeAsk = make(chan chan struct{})
	ready := make(chan error, 1)
	go u.run(ready)
	if err := <-ready; err != nil {
		return fmt.Errorf("start probe: ignore reader goroutine: %w", err)
	}
	if u.deepReader != nil {
		u.deepDone, u.deepStop = make(chan struct{}), make(chan struct{})
		ready := make(chan error, 1)
		go u.runDeep(ready)
		if err := <-ready; err != nil {
			return fmt.Errorf("start probe: ignore deep reader goroutine: %w", err)
		}
	}
	if err := u.startWakerLocked(); err != nil {
		return fmt.Errorf("start probe: waker: %w", err)
	}
	return nil
}
