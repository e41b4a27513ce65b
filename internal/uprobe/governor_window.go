package uprobe

import (
	"cmp"
	"math"
	"slices"
	"time"
)

// shares divides what the windows may cost among the sampled sites,
// setting each one's share (of one CPU). The windows share what the exact
// sites leave of the budget (at least 1-exactShare of it; more while
// tokens are left over), max-min fairly:
// a site whose windows need less than an equal part (attached the whole
// period at its peak rate) gets what it needs, the others split the rest
// equally.
// It returns the load of the sites counted exactly.
func (g *governor) shares() (exactLoad float64) {
	var prio, rest []int
	for i := range g.sites {
		switch s := &g.sites[i]; {
		case s.sampled && s.prio:
			prio = append(prio, i)
		case s.sampled:
			rest = append(rest, i)
		case s.armed:
			exactLoad += s.load()
		}
	}
	// The Guard's own work goes on as an exact site's traps do: left out,
	// every window was planned as if the second had its 2-3 ms (seeded
	// service) to spare.
	exactLoad += g.ownLoad()
	// Tokens left over (windows cut short, periods rounded up to a beat,
	// links shared) raise the shares, up to twice, and up to what the
	// exact sites leave of a second's budget: plan still fits each window
	// in what its second leaves.
	boost := 1 + min(max(g.tokens, 0)/g.perSecond, 1)
	left := max(g.budget*(1-exactShare), (g.budget-exactLoad)*windowShare) * boost
	left = min(left, max(g.budget-exactLoad, g.budget*(1-exactShare))) * float64(samplePeriod)
	demand := func(i int) float64 { return g.sites[i].peakLoad()*float64(samplePeriod) + g.siteCycle() }
	// Each site gets its demand or an equal part of what is left, the
	// least demanding first (what one does not use goes to the next);
	// the sites that serve events take up to prioShare first, and the
	// statistics' sites share the rest.
	give := func(sites []int, left float64) float64 {
		slices.SortFunc(sites, func(a, b int) int { return cmp.Compare(demand(a), demand(b)) })
		for k, i := range sites {
			give := min(demand(i), left/float64(len(sites)-k))
			g.sites[i].share = give / float64(samplePeriod)
			left -= give
		}
		return left
	}
	if len(prio) > 0 {
		p := left * prioShare
		if len(rest) == 0 {
			p = left
		}
		left -= p - give(prio, p)
	}
	give(rest, left)
	return exactLoad
}

// windowCost is what a window of length w costs s at its peak rate: its
// traps, those while it is being attached (attachLag) and until its
// detach is done (overrun), and its link's share.
func (g *governor) windowCost(s *govSite, w time.Duration) float64 {
	return s.peakLoad()*float64(w+g.attachLag+g.overrun()) + g.siteCycle()
}

// windowWithin is the longest window s can pay for with allow, at least
// the shortest.
func (g *governor) windowWithin(s *govSite, allow float64) time.Duration {
	load := s.peakLoad()
	if load <= 0 {
		return samplePeriod
	}
	w := (allow-g.siteCycle())/load - float64(g.attachLag+g.overrun())
	return max(time.Duration(min(w, float64(samplePeriod))), g.shortestWindow(s))
}

// siteCycle is what attaching and detaching costs one sampled window: its
// share of a link.
func (g *governor) siteCycle() float64 { return g.cycle * g.linkShare }

// ended records that s's window ends now: its detach begins.
func (g *governor) ended(s *govSite, now time.Time) {
	s.offAt, s.checkAt = time.Time{}, time.Time{}
	s.detachAt, s.detachHits = now, s.hits
}

// windowBeat is the grid sampled sites' windows open on: every window
// opens on a whole period since the governor started (plus its phase), so
// that all the windows of one length share a link.
const windowBeat = samplePeriod

// prioPhase is how far into each beat the windows of the sites serving
// events open: half a beat after the statistics' windows. Opened with
// them, a nested-map miss site's window fell where every sampled runtime
// site trapped at once, the program ran slower, and its counts, scaled by
// the time attached, came out low; and the second's spend came in one
// burst. Seeded service, 10 interleaved pairs of 30,000-request runs
// (2026-11-28): nested-map misses estimated 49-171 (median 144) of 299 on
// one beat, 54-227 (median 172) half a beat apart; the Guard's worst
// second 12.1-21.6 (median 16.3) against 11.4-15.9 ms (median 14.3). The
// windows of different lengths have links of their own anyway.
const prioPhase = windowBeat / 2

// phase is where in the beat s's windows open (see prioPhase).
func (s *govSite) phase() time.Duration {
	if s.prio {
		return prioPhase
	}
	return 0
}

// nextBeat is when a window opened now with period opens next: on a beat
// (a whole sampling period since start, plus phase), the beat at most a
// period from now where the period is the sampling period (a window every
// period), else the beat at least a period from now (windows spaced out to
// pay for themselves stay at least that far apart).
func (g *governor) nextBeat(now time.Time, period, phase time.Duration) time.Time {
	t := now.Add(period)
	off := (t.Sub(g.start) - phase) % windowBeat
	if off < 0 {
		off += windowBeat
	}
	if off == 0 || period <= samplePeriod {
		return t.Add(-off)
	}
	return t.Add(windowBeat - off)
}

// bucket rounds a window down to a power of four milliseconds (a whole
// period stays whole), so that windows opening together can share a link:
// a few lengths, a few links a beat.
func bucket(w time.Duration) time.Duration {
	if w >= samplePeriod || w < 4*time.Millisecond {
		return w
	}
	b := time.Millisecond
	for b*4 <= w {
		b *= 4
	}
	return b
}

// endWindow reports whether s's window must end now, else brings its end
// forward to what it can still pay for and sets when to look again.
func (g *governor) endWindow(s *govSite, now time.Time, debt bool) bool {
	if !now.Before(s.offAt) {
		return true
	}
	if debt && !s.prio && !s.noHits() {
		if now.Sub(s.armedAt) >= g.shortestWindow(s) {
			return true
		}
		s.offAt = minTime(s.offAt, s.armedAt.Add(g.shortestWindow(s)))
	}
	// What the window can still pay for at the peak rate, the governor's
	// lateness and its detach's tail included.
	load := s.peakLoad()
	left := s.allow - g.siteCycle() - s.spent - load*float64(g.overrun())
	if left <= 0 && (load > 0 || s.spent > 0) {
		// A site that took no hit costs nothing more than its link,
		// which its allowance paid: its window runs its length (ended at
		// the first plan, a quiet site's window of a second lasted 2-20
		// ms, and never told that it was quiet).
		return true
	}
	if load > 0 {
		if d := time.Duration(min(left/load, float64(time.Hour))); now.Add(d).Before(s.offAt) {
			s.offAt = now.Add(d)
		}
	}
	s.lookAgain(now)
	return false
}

// lookAgain sets when plan looks at s's window next, before its end
// (offAt): halfway, once a rate can be measured; soon, while its rate is
// not known (see unknownLook).
func (s *govSite) lookAgain(now time.Time) {
	s.checkAt = time.Time{}
	if half := s.offAt.Sub(now) / 2; half >= minRateSpan {
		s.checkAt = now.Add(half)
	}
	if s.unknown() && now.Add(unknownLook).Before(s.offAt) {
		s.checkAt = now.Add(unknownLook)
	}
}

// shortestWindow is the shortest window s is attached for: long enough
// to take about minRateHits hits at its peak rate (a few are enough to
// see that a misuse goes on, and each costs), between a millisecond and
// minWindow.
func (g *governor) shortestWindow(s *govSite) time.Duration {
	r := max(s.rate, s.peak)
	if r <= 0 {
		return minWindow
	}
	return min(max(time.Duration(minRateHits/r*1e9), time.Millisecond), minWindow)
}

// demote samples the sites counted exactly, the statistics' ones first and
// the costliest first, until those left use at most exactShare of the
// budget; a site serving events is sampled only while they, with the load
// that goes on whatever is sampled (baseLoad), use more than
// prioExactShare.
func (g *governor) demote(now time.Time) {
	base := g.baseLoad()
	var exact []int
	load := 0.0
	for i := range g.sites {
		s := &g.sites[i]
		if !s.sampled && !s.disabled && !s.pinned {
			exact = append(exact, i)
			load += s.load()
		}
	}
	// The statistics' sites first, then those serving events; the
	// costliest first within each.
	slices.SortFunc(exact, func(a, b int) int {
		if pa, pb := g.sites[a].prio, g.sites[b].prio; pa != pb {
			if pb {
				return -1
			}
			return 1
		}
		return cmp.Compare(g.sites[b].load(), g.sites[a].load())
	})
	for _, i := range exact {
		s := &g.sites[i]
		over := load > g.budget*exactShare
		if s.prio {
			over = load+base > g.budget*prioExactShare
		}
		if !over || s.load() == 0 {
			continue
		}
		if s.sampled || s.relink {
			continue // sampled, or attached again, with its link's other sites below
		}
		if s.prio && s.hits < minRateHits {
			// Its hits are events: a rate from one or two of them says
			// nothing, and sampled the site misses the next ones (a
			// bloat site, its rate misread from the reader's one clear
			// in Start's first 8 ms, missed the quickstart's only bloat
			// event 1 run in 10). At most minRateHits of its hits are
			// spent before it is judged.
			continue
		}
		if s.armed && s.group != 0 {
			// It shares its link (the statistics' sites are attached with
			// one link at Start): the link is detached, one detach for all.
			// Its busy sites are sampled; the quiet ones (below what would
			// promote a sampled site, over relinkWatched at least) stay
			// counted exactly: a window each second for each of them would
			// cost a link's attach and detach for nothing. plan moves them
			// together to a new link before the old one is detached, so
			// that their counts have no gap (attached again only once the
			// detach was done, each was blind for the detach's 20-40 ms
			// and until the next plan).
			// A rate measured over a few milliseconds says nothing (a
			// site with no hits in Start's first 7 ms took 10,000 a second
			// right after, and its new link was detached again).
			var busy, quiet []int
			for j := range g.sites {
				if t := &g.sites[j]; t.group == s.group && t.armed && !t.sampled && !t.pinned && t.detachAt.IsZero() {
					if t.load() >= g.budget*promoteShare || t.watched < relinkWatched {
						busy = append(busy, j)
					} else {
						quiet = append(quiet, j)
					}
				}
			}
			if len(busy) == 0 {
				busy, quiet = append(busy, quiet...), nil // none stands out: sample them all
			}
			for _, j := range busy {
				load -= g.sites[j].load()
				g.sample(&g.sites[j], now, true)
			}
			for _, j := range quiet {
				g.sites[j].relink = true
			}
			continue
		}
		load -= s.load()
		g.sample(s, now, false)
	}
}

// sample makes s a sampled site; if it is attached, this plan ends its
// attachment, with its link's other sites if shared (the group is kept),
// else on its own link.
func (g *governor) sample(s *govSite, now time.Time, shared bool) {
	s.sampled, s.relink = true, false
	s.lastOn = now // attached until now
	g.demotedAt = now
	s.window, s.period = g.windowFor(s, g.budget*(1-exactShare))
	// Its first window on its beat, not a whole period from now: a site
	// serving events demoted 30 ms after Start had its first window 1.03 s
	// after it (no estimate from a window in its first second), now at
	// 0.5 s.
	first := min(s.period, samplePeriod)
	if s.idle() {
		first = idlePeriod // nothing to show for its hits so far
	}
	s.nextOn = g.nextBeat(now, first, s.phase())
	if s.armed {
		s.offAt = now // detached by this plan
		s.allow = math.Inf(1)
		if !shared {
			s.group = 0
		}
	}
}

// windowFor sizes a sampled site's window and period, at its peak rate,
// so that one window (its hits, those that come while the governor runs
// late and while its detach goes on, and the attach and detach
// themselves) costs at most share of the budget over
// the period.
func (g *governor) windowFor(s *govSite, share float64) (window, period time.Duration) {
	load := s.peakLoad()
	if load <= 0 {
		// A whole period, even for a site not watched long enough to tell
		// that it is quiet: a 10-ms window first (until 100 ms were
		// watched) cost the service throughput and p99 (Go 1.27 load runs
		// against c8316c7: 0.90x and 0.83x, p99 1.12x and 1.26x, against
		// 0.99x and 1.01x without), with no gain in the worst second.
		return samplePeriod, samplePeriod
	}
	allowed := share * float64(samplePeriod) // ns of CPU per period
	shortest := g.shortestWindow(s)
	if cost := g.windowCost(s, shortest); allowed < cost {
		// Even the shortest window each period is too dear: space them out.
		return shortest, time.Duration(min(cost/share, float64(time.Hour)))
	}
	return g.windowWithin(s, allowed), samplePeriod
}
