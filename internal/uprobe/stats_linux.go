//go:build linux && amd64

package uprobe

import (
	"time"

	"github.com/cilium/ebpf"

	"github.com/mapguard/mapguard/probe"
)

// Stats never waits for u.mu. Its holders include the governor's plan,
// whose moves and nested-read attaches wait for the kernel (milliseconds
// each), and any holder can wait that long for a thread in a saturated
// process. When the lock is taken, Stats answers from the view the last
// account published (statsView): the governor's figures of then, at most
// about pollInterval old, with the sites' counters read now from the
// kernel's memory.
func (u *uprobes) Stats() probe.Stats {
	u.statsUsed.Store(true)
	if !u.mu.TryLock() && !u.lockForStats() {
		return u.view.Load().fresh(u)
	}
	defer u.mu.Unlock()
	now := time.Now()
	if u.coll != nil {
		u.readCounters()
	}
	u.publishStatsLocked(now)
	st := u.view.Load().copy()
	st.CallSites, st.CallSitesOverflow = u.calls.snapshot()
	return st
}

// statsWait bounds how long Stats waits for u.mu when the view is
// stale; a variable for the tests.
var statsWait = time.Millisecond

// lockForStats takes u.mu for a Stats call that found it held, unless the
// view is fresh enough to report (the reader's ticks keep it within
// pollInterval once Stats has been called) or u.mu stays held for
// statsWait: then Stats reports the view as it is. Without this, the
// first Stats call that found u.mu held reported the view published at
// the end of Start (seen: a second after Start, Budget.Elapsed 1 ms and
// nothing spent). Reports whether it holds u.mu.
func (u *uprobes) lockForStats() bool {
	v := u.view.Load()
	if v != nil && time.Since(v.at) < pollInterval {
		return false
	}
	deadline := time.Now().Add(statsWait)
	for {
		if u.mu.TryLock() {
			return true
		}
		if time.Now().After(deadline) {
			if v == nil {
				u.mu.Lock()
				return true
			}
			return false
		}
		time.Sleep(20 * time.Microsecond)
	}
}

// statsView is Stats as of an account, for the calls that find u.mu held.
type statsView struct {
	at time.Time
	st probe.Stats // without CallSites (read at each call: callSites has its own lock)
	// mem and off: where the counters lie, site i's at index i as in
	// st.Sites (nil: not memory-mapped, or the probe is closed and st
	// holds the final counters).
	mem *ebpf.Memory
	off int64
}

// publishStatsLocked builds the view of now; u.counters must be current.
func (u *uprobes) publishStatsLocked(now time.Time) {
	st := probe.Stats{Inactive: append([]probe.Inactive(nil), u.inactive...), CrashRecord: u.crashPath, CrashRecordError: u.crashErr,
		CrashRecordsDamaged: u.crashDamaged, Budget: u.budgetStatsLocked(now)}
	v := &statsView{at: now}
	if u.coll != nil {
		v.mem, v.off = u.statsMem, u.statsOff
	}
	st.Sites = make([]probe.SiteStats, 0, len(u.sites))
	for _, s := range u.sites {
		ss := probe.SiteStats{
			Kind:     s.kind,
			Deep:     s.deep,
			Function: s.fn.Name,
			Offset:   s.at.Offset,
			Inst:     s.at.Inst,
			Emulated: s.at.Emulated,
			Armed:    s.link != nil,
		}
		if u.gov != nil {
			g := &u.gov.sites[s.index]
			ss.Cost = time.Duration(g.cost)
			ss.TrapScale = 1
			if u.samp != nil {
				ss.TrapScale = u.samp.scaleOf(s.index)
			}
			ss.Rate = g.rate
			ss.Watched = g.watched
			if g.armed && !g.armedAt.After(now) {
				ss.Watched += now.Sub(later(g.armedAt, u.gov.last))
			}
			if g.sampled {
				ss.Sampled, ss.Window, ss.Period = true, g.window, g.period
			}
		}
		if int(s.index) < len(u.notOwned) {
			ss.NotOwned = u.notOwned[s.index].Load()
			ss.OutOfScope = u.outOfScope[s.index].Load()
		}
		c := s.final
		if u.coll != nil {
			c = u.counters[s.index]
		}
		setCounters(&ss, c)
		st.Dropped += ss.Dropped
		st.Sites = append(st.Sites, ss)
	}
	v.st = st
	u.view.Store(v)
}

// setCounters fills in what the kernel counted at the site.
func setCounters(ss *probe.SiteStats, c mapguardSiteStats) {
	ss.Hits, ss.Events, ss.Dropped, ss.Filtered, ss.Ignored, ss.Aggregated = c.Hits, c.Events, c.Dropped, c.Filtered, c.Ignored, c.Agg
	if ss.Deep {
		// Deep hits that end in the kernel are not counted there, to
		// save an atomic add on a hot path: they are the rest.
		if done := c.Events + c.Dropped + c.Ignored; c.Hits >= done {
			ss.Aggregated = c.Hits - done
		}
	}
}

// copy is the view's Stats, in slices of the caller's own.
func (v *statsView) copy() probe.Stats {
	st := v.st
	st.Inactive = append([]probe.Inactive(nil), v.st.Inactive...)
	st.Sites = append([]probe.SiteStats(nil), v.st.Sites...)
	if v.st.Budget != nil {
		b := *v.st.Budget
		st.Budget = &b
	}
	return st
}

// fresh is the view's Stats with the counters and call sites of now.
func (v *statsView) fresh(u *uprobes) probe.Stats {
	st := v.copy()
	st.CallSites, st.CallSitesOverflow = u.calls.snapshot()
	if v.mem == nil || len(st.Sites) == 0 {
		return st
	}
	// The memory stays mapped while v holds it (cilium/ebpf unmaps it
	// once unreachable), also after the probe's objects are closed.
	var counters [maxSites]mapguardSiteStats
	if readSiteCounters(v.mem, v.off, &counters, len(st.Sites)) != nil {
		return st
	}
	st.Dropped = 0
	for i := range st.Sites {
		setCounters(&st.Sites[i], counters[i])
		st.Dropped += st.Sites[i].Dropped
	}
	return st
}
