//go:build linux && amd64

package uprobe

import (
	"cmp"
	"context"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mapguard/mapguard/decode"
	"github.com/mapguard/mapguard/internal/rt"
	"github.com/mapguard/mapguard/probe"
	"github.com/mapguard/mapguard/symbols"
)

// The inner reads of m[a][b] in the program's own code get sites of their
// own (findNestedReads). Finding them reads the whole text: on the 91 MB
// program of BenchmarkStartup, 40 MB and 10-20 ms of CPU, which Start
// used to wait for (Start 60-73 ms against 45-55 without it). The search
// starts beside the rest of Start, which then waits for it up to
// nestedWait, not to the end: what is left when Start returns goes on
// paced to nestedScanShare of the budget, its CPU time booked like the
// reader's. Its goroutine is ignored by the probes. Until its sites are
// attached, the runtime's sites see nested misses as before (the kernel
// pairs the two reads, the reader tells the inner read from the code).
// The reader attaches what it found: before Start returns if the search
// was done in time (takeNestedAtStartLocked), else at its next tick
// (takeNestedLocked).

// nestedScanShare is the share of the budget the search may use while it
// runs: with the default budget (1% of a CPU), 0.5%. What is left of
// 10-20 ms of CPU on the 91 MB program after Start then takes up to 2-4 s
// (arithmetic, not measured); a small program's search is usually done
// within Start.
const nestedScanShare = 0.5

// testScanPace, if set by a test, runs at each of the search's paces,
// with the channel Close closes.
var testScanPace atomic.Pointer[func(stop <-chan struct{})]

// HoldNestedScan holds the search for nested reads of every probe started
// from now on at its first step, until release is called or the probe
// closes: for tests of what happens while the search runs after Start
// (which otherwise, on a small program, attaches its sites before it
// returns). Release also ends the hold for probes started later.
func HoldNestedScan() (release func()) {
	hold := make(chan struct{})
	pace := func(stop <-chan struct{}) {
		select {
		case <-hold:
		case <-stop:
		}
	}
	testScanPace.Store(&pace)
	var once sync.Once
	return func() {
		once.Do(func() {
			testScanPace.CompareAndSwap(&pace, nil)
			close(hold)
		})
	}
}

// errScanStopped ends the search when the probe closes.
var errScanStopped = errors.New("search for nested reads stopped")

// callerRead is an inner read probed at its CALL: the return address of
// the call, the outer read's, and when its site took over from the
// runtime's (a nested miss the runtime's sites saw before then is theirs).
type callerRead struct {
	pc, outer uint64
	since     time.Time
}

// callerAt returns the probed inner read whose call returns to pc. The
// reader looks every nested miss and nil-map read up here: a sorted
// slice, since a map read that misses would trap at the Guard's own
// probe.
func (u *uprobes) callerAt(pc uint64) (callerRead, bool) {
	i, ok := slices.BinarySearchFunc(u.callers, pc, callerCmp)
	if !ok {
		return callerRead{}, false
	}
	return u.callers[i], true
}

// callerCmp orders callerReads by call site.
func callerCmp(c callerRead, pc uint64) int { return cmp.Compare(c.pc, pc) }

// readSites returns the sites as the readers may read them without u.mu.
func (u *uprobes) readSites() []*site {
	if p := u.published.Load(); p != nil {
		return *p
	}
	return nil
}

// publishLocked makes u.sites what readSites returns.
func (u *uprobes) publishLocked() {
	sites := u.sites[:len(u.sites):len(u.sites)] // an append reallocates
	u.published.Store(&sites)
}

// startNestedScanLocked starts the search on a goroutine of its own.
// While Start runs, the search runs
// at full speed and its CPU is Start's; once Start has returned
// (scanPaced), it is paced to nestedScanShare of the budget and booked as
// the Guard's own. Start ignores its goroutine before any probe is
// attached.
//
// bin is Start's too: whichever of the two is done with it last closes
// it (release).
func (u *uprobes) startNestedScanLocked(bin *symbols.Binary) (release func()) {
	u.nestedFound = make(chan nestedReads, 1)
	u.scanStop, u.scanDone = make(chan struct{}), make(chan struct{})
	var refs atomic.Int32
	refs.Store(2)
	release = func() {
		if refs.Add(-1) == 0 {
			bin.Close()
		}
	}
	ids := make(chan uint64)
	share := nestedScanShare * u.cfg.budget()
	go u.scanNested(bin, release, share, ids)
	u.scanGoid = <-ids
	return release
}

// stopNestedScanLocked ends the search, if it runs, and waits for it.
func (u *uprobes) stopNestedScanLocked() {
	if u.scanDone == nil {
		return
	}
	close(u.scanStop)
	u.mu.Unlock()
	<-u.scanDone // it never takes u.mu
	u.mu.Lock()
	u.scanDone = nil
}

// scanNested is the search's goroutine.
func (u *uprobes) scanNested(bin *symbols.Binary, release func(), share float64, ids chan<- uint64) {
	defer close(u.scanDone)
	defer release()
	ids <- rt.GoID()
	cpu := startCPUMeter(&u.ownCPU, false)
	defer cpu.stop()
	stretch := func() time.Duration { // the open stretch's CPU so far
		if !cpu.on {
			return 0
		}
		return threadCPU() - cpu.start
	}
	cpu.begin()
	pace := func() error {
		if p := testScanPace.Load(); p != nil {
			(*p)(u.scanStop)
		}
		select {
		case <-u.scanStop:
			return errScanStopped
		default:
		}
		if !u.scanPaced.Load() {
			cpu.stop() // Start's, not booked
			cpu.begin()
			return nil
		}
		ran := stretch()
		cpu.book()
		if share > 0 && share < 1 && ran > 0 {
			t := time.NewTimer(time.Duration(float64(ran) * (1/share - 1)))
			defer t.Stop()
			select {
			case <-u.scanStop:
				return errScanStopped
			case <-t.C:
			}
		}
		cpu.begin()
		return nil
	}
	n, complete := findNestedReads(bin, symbolsCallee(bin), pace)
	if u.scanPaced.Load() {
		cpu.book()
	}
	cpu.stop()
	if !complete {
		return
	}
	u.nestedFound <- n // buffered: sent once
}

// nestedWait is how long Start waits for the search to end once the rest
// of Start is done. On a small program the search is usually done by then
// (the quickstart's: 20-25 ms, within Start's 50-60); a large one's goes on
// after Start, paced.
const nestedWait = 10 * time.Millisecond

// takeNestedAtStartLocked has the reader attach the nested reads before
// Start returns, if the search is done within nestedWait. Otherwise the
// reader attaches them at its first tick after the search, 100 ms or more
// after Start: a nested miss in between is seen only by the runtime's
// sites, if they are armed at the time (seen in CI: the quickstart's only
// nested miss, right after Start, lost while the governor had its
// runtime site detached).
func (u *uprobes) takeNestedAtStartLocked(ctx context.Context) {
	if u.nestedFound == nil || u.scanDone == nil {
		return
	}
	done, ask, reader := u.scanDone, u.takeAsk, u.done
	u.mu.Unlock() // the reader takes u.mu to attach
	defer u.mu.Lock()
	timer := time.NewTimer(nestedWait)
	defer timer.Stop()
	select {
	case <-done:
	case <-timer.C:
		return
	case <-ctx.Done():
		return
	}
	took := make(chan struct{})
	select {
	case ask <- took:
	case <-reader: // the reader has stopped
		return
	case <-ctx.Done():
		return
	}
	select {
	case <-took:
	case <-reader:
	case <-ctx.Done():
	}
}

// takeNestedLocked attaches what the search found, if it is done: on the
// reader's tick, once the ring buffer is drained. An occurrence is then
// counted once, whichever site saw it: up to the instant since, the
// runtime's sites' counts are reported (the new sites' counts so far are
// marked as seen); from since on, the new sites' (the runtime's counts
// there skipped, and their events dropped once the call site has been
// reported: see handleWith). An occurrence traps at the inner read's CALL
// and then in the runtime; a goroutine can wait between the two, across
// the attach and since, and no rule on times alone keeps exactly one of
// its two records (seen in CI: the only nested miss of a test program,
// unreported). So around the handover an occurrence may be counted twice,
// or, in the counts, missed (TestRealNestedAcrossAttach allows 2).
func (u *uprobes) takeNestedLocked(now time.Time) {
	if u.nestedFound == nil {
		return
	}
	var n nestedReads
	select {
	case n = <-u.nestedFound:
		u.nestedFound = nil
	default:
		return
	}
	added := u.addNestedLocked(n)
	if len(added) == 0 {
		return
	}
	mono, err := kernelMono() // the records' clock
	if err != nil {
		mono = uint64(u.clock.Mono) // Start's: every record is after it
	}
	since := u.clock.Time(mono)
	u.fresh = added
	u.lastAgg = now
	u.flushAggsLocked()
	u.fresh = nil
	for _, c := range added {
		s := u.sites[c]
		r := callerRead{pc: s.wrapRet[0], outer: s.wrapRet[1], since: since}
		j, _ := slices.BinarySearchFunc(u.callers, r.pc, callerCmp)
		u.callers = slices.Insert(u.callers, j, r)
	}
	u.log.V(4).Info("nested reads probed", "sites", len(u.callers))
}

// addNestedLocked adds and attaches the sites the search found, as far as
// the site table has room, and returns the indexes of those attached.
// Only the reader calls it (its decoder is the reader's).
func (u *uprobes) addNestedLocked(n nestedReads) (added []uint32) {
	u.inactive = append(u.inactive, n.inactive...)
	inactive := func(s *site, reason string) {
		u.inactive = append(u.inactive, probe.Inactive{Kind: decode.NestedMapMiss, Function: s.fn.Name, Reason: reason})
	}
	sitesMap := u.coll.Maps[mapguardMapSites]
	var fresh []*site
	for _, s := range n.sites {
		if len(u.sites)+len(fresh) >= calibIndex {
			inactive(s, "no room in the site table")
			continue
		}
		s.index = uint32(len(u.sites) + len(fresh))
		conf := mapguardSiteConf{Kind: uint8(s.kind), Flags: s.flags, MapReg: s.mapReg, TypReg: s.typReg, KeyMode: s.keyMode, WrapRet: s.wrapRet}
		if err := sitesMap.Put(s.index, conf); err != nil {
			inactive(s, "configure site: "+err.Error())
			continue
		}
		u.costs[s.index] = uint64(u.siteCost(s))
		fresh = append(fresh, s)
	}
	if len(fresh) == 0 {
		return nil
	}
	// The costs are in the kernel before a site can trap.
	if err := u.costVar.Set(u.costs); err != nil {
		for _, s := range fresh {
			inactive(s, "set site cost: "+err.Error())
		}
		return nil
	}
	probes := u.decoderProbes()
	for _, s := range fresh {
		// Appended whether it attaches or not: its index is its place.
		u.sites = append(u.sites, s)
		probes = append(probes, callTarget(uintptr(s.wrapRet[0])))
		call := uintptr(s.wrapRet[0] - 5)
		addProbed(call, 0xe8) // the CALL's opcode, under the breakpoint
		err := u.armLocked(s)
		i := u.gov.add(u.siteCost(s), time.Now(), err == nil)
		if err != nil {
			removeProbed(call)
			inactive(s, "attach: "+err.Error())
			continue
		}
		if u.watched[s.kind] && !u.statsOnly[s.kind] {
			u.gov.prioritize(i) // its hits are events
		}
		added = append(added, s.index)
	}
	u.decoder.SetProbes(probes)
	u.publishLocked()
	return added
}

// decoderProbes names the probed function of each site, for the decoder.
func (u *uprobes) decoderProbes() []string {
	probes := make([]string, len(u.sites), len(u.sites)+maxNestedSites)
	for i, s := range u.sites {
		probes[i] = s.fn.Name
		if s.flags&siteCaller != 0 {
			probes[i] = callTarget(uintptr(s.wrapRet[0])) // the map function called there
		}
	}
	return probes
}
