//go:build linux && amd64

package uprobe

import (
	"time"

	"github.com/mapguard/mapguard/probe"
)

func (u *uprobes) Stats() probe.Stats {
	u.mu.Lock()
	defer u.mu.Unlock()
	now := time.Now()
	st := probe.Stats{Inactive: append([]probe.Inactive(nil), u.inactive...), CrashRecord: u.crashPath, CrashRecordError: u.crashErr,
		CrashRecordsDamaged: u.crashDamaged, Budget: u.budgetStatsLocked(now)}
	st.CallSites, st.CallSitesOverflow = u.calls.snapshot()
	if u.coll != nil {
		u.readCounters()
	}
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
		ss.Hits, ss.Events, ss.Dropped, ss.Filtered, ss.Ignored, ss.Aggregated = c.Hits, c.Events, c.Dropped, c.Filtered, c.Ignored, c.Agg
		if s.deep {
			// Deep hits that end in the kernel are not counted there, to
			// save an atomic add on a hot path: they are the rest.
			if done := c.Events + c.Dropped + c.Ignored; c.Hits >= done {
				ss.Aggregated = c.Hits - done
			}
		}
		st.Dropped += ss.Dropped
		st.Sites = append(st.Sites, ss)
	}
	return st
}
