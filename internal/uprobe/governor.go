package uprobe

import (
	"cmp"
	"math"
	"slices"
	"time"
)

// The cost governor keeps every probe site, always-on and deep alike,
// under one CPU budget, from what hits cost on this machine: the trap at
// the site's instruction (calibrated at Start, and again from time to
// time) plus the BPF program's run time (measured in the kernel on one
// hit in 16). It is plain arithmetic on a clock and counters, so that it
// can be tested without a kernel; the probe executes what it decides.
//
// Under budget every site stays attached and every occurrence is counted.
// When the budget is spent (tokens run out), the costliest sites are
// sampled instead: attached for a short window once a period (a second,
// unless the budget cannot pay even the shortest window that often), so
// that a misuse that goes on is seen every period, and their counts are
// scaled by the time they were attached. A sampled site whose load has
// fallen is counted exactly again.

const (
	// samplePeriod is how often a sampled site is attached, at most.
	samplePeriod = time.Second
	// minWindow is the shortest window a sampled site is attached for.
	minWindow = 10 * time.Millisecond
	// exactShare is the share of the budget that sites counted exactly
	// may use; the rest pays for the windows of sampled sites.
	exactShare = 0.5
	// windowShare is the share of what the exact sites leave that the
	// windows use; the rest pays back a debt (a storm's first burst).
	windowShare = 0.8
	// promoteShare: a sampled site whose load is below this share of the
	// budget is counted exactly again (while tokens are plentiful).
	promoteShare = 0.1
	// burstSeconds is how many seconds' worth of budget may be spent at
	// once, before any site is sampled.
	burstSeconds = 0.5
	// rateWeight is the weight of the newest measurement in a site's rate.
	rateWeight = 0.5
	// minRateSpan is the least attached time a rate is measured over.
	minRateSpan = 5 * time.Millisecond
)

// govSite is the governor's view of one probe site.
type govSite struct {
	cost    float64 // CPU ns one hit costs
	hits    uint64  // the site's hit counter at the last account
	rate    float64 // hits per second while attached (moving average)
	sampled bool
	armed   bool      // attached, or being detached (its traps go on)
	armedAt time.Time // start of the current attachment
	offDone time.Time // armed: when its detach finished (booked at the next account)
	offAt   time.Time // sampled and armed: end of the window
	nextOn  time.Time // sampled and not armed: start of the next window
	window  time.Duration
	period  time.Duration
	// watched is the time attached since Start; span the time attached
	// since the last rate measurement and spanHits the hits in it;
	// flushWatched the time attached since the last scale.
	watched, span, flushWatched time.Duration
	spanHits                    uint64
	disabled                    bool // never attached (e.g. failed to attach)
	// pinned: never sampled, since its cost is bounded by the work that
	// makes it fire (a large map's table splitting: thousands of entries
	// rehashed per hit); its hits are still spent from the budget.
	pinned bool
}

// load is the share of one CPU the site costs while attached.
func (s *govSite) load() float64 { return s.rate * s.cost / 1e9 }

// governor is the cost governor. It is not safe for concurrent use.
type governor struct {
	budget  float64       // share of one CPU
	burst   float64       // CPU ns that may be spent at once
	tokens  float64       // CPU ns that may still be spent
	cycle   float64       // CPU ns to attach and then detach one site
	latency time.Duration // wall time a detach takes; traps go on meanwhile
	kernel  float64       // the kernel's running cost sum at the last account
	extra   float64       // CPU ns spent outside hits since start
	last    time.Time     // last account
	start   time.Time
	flushed time.Time // last scale
	sites   []govSite
}

// newGovernor returns a governor for sites with the given per-hit costs
// (ns), all attached exactly at now, with a full burst.
func newGovernor(budget float64, costs []float64, cycle float64, latency time.Duration, now time.Time) *governor {
	g := &governor{
		budget:  budget,
		cycle:   cycle,
		latency: latency,
		last:    now,
		start:   now,
		flushed: now,
		sites:   make([]govSite, len(costs)),
	}
	g.burst = max(budget*burstSeconds*1e9, 10*cycle)
	g.tokens = g.burst
	for i, c := range costs {
		g.sites[i] = govSite{cost: c, armed: true, armedAt: now}
	}
	return g
}

// pin keeps site i attached whatever the budget (see govSite.pinned).
func (g *governor) pin(i int) { g.sites[i].pinned = true }

// setCost updates site i's cost per hit (ns).
func (g *governor) setCost(i int, cost float64) { g.sites[i].cost = cost }

// account books what happened since the last call: spent is the kernel's
// running sum of what the probes' hits cost (CPU ns),
// hits the sites' hit counters, extra CPU ns spent otherwise (attaching,
// detaching, calibrating).
func (g *governor) account(now time.Time, spent float64, hits []uint64, extra float64) {
	dt := now.Sub(g.last)
	if dt < 0 {
		dt = 0
	}
	g.last = now
	g.tokens = min(g.burst, g.tokens+g.budget*float64(dt)) - (spent - g.kernel) - extra
	g.kernel = spent
	g.extra += extra
	for i := range g.sites {
		s := &g.sites[i]
		if i >= len(hits) {
			break
		}
		d := hits[i] - s.hits
		s.hits = hits[i]
		if !s.armed {
			continue
		}
		end := now
		if !s.offDone.IsZero() {
			end = s.offDone // detached since: book its last hits, then stop
			s.armed, s.offDone = false, time.Time{}
		}
		att := end.Sub(later(s.armedAt, now.Add(-dt)))
		if att < 0 {
			att = 0
		}
		s.watched += att
		s.flushWatched += att
		s.span += att
		s.spanHits += d
		if s.span >= minRateSpan {
			r := float64(s.spanHits) / s.span.Seconds()
			if s.rate == 0 {
				s.rate = r
			} else {
				s.rate = rateWeight*r + (1-rateWeight)*s.rate
			}
			s.span, s.spanHits = 0, 0
		}
	}
}

// plan returns the sites to attach and to detach now. The probe attaches
// and then calls armed; it starts detaching and calls disarmed when the
// detach has finished.
func (g *governor) plan(now time.Time) (attach, detach []int) {
	if g.tokens < 0 {
		g.demote(now)
	}
	// The windows of sampled sites share what the exact ones leave of the
	// budget (at least 1-exactShare of it), equally.
	nSampled, exactLoad := 0, 0.0
	for i := range g.sites {
		if g.sites[i].sampled {
			nSampled++
		} else if g.sites[i].armed {
			exactLoad += g.sites[i].load()
		}
	}
	share := max(g.budget*(1-exactShare), (g.budget-exactLoad)*windowShare)
	if nSampled > 0 {
		share /= float64(nSampled)
	}
	for i := range g.sites {
		s := &g.sites[i]
		if s.disabled {
			continue
		}
		if !s.sampled {
			if !s.armed {
				attach = append(attach, i)
			}
			continue
		}
		if g.tokens > g.burst/2 && s.rate > 0 && s.load() < g.budget*promoteShare {
			s.sampled = false // quiet again: count it exactly
			if !s.armed {
				attach = append(attach, i)
			}
			continue
		}
		switch {
		case s.armed && s.offDone.IsZero() && !s.offAt.IsZero() && !now.Before(s.offAt):
			detach = append(detach, i)
			s.offAt = time.Time{}
		case !s.armed && s.offDone.IsZero() && !now.Before(s.nextOn):
			s.window, s.period = g.windowFor(s, share)
			s.nextOn = now.Add(s.period)
			attach = append(attach, i)
		}
	}
	return attach, detach
}

// demote samples the costliest sites counted exactly until those left use
// at most exactShare of the budget.
func (g *governor) demote(now time.Time) {
	var exact []int
	load := 0.0
	for i := range g.sites {
		s := &g.sites[i]
		if !s.sampled && !s.disabled && !s.pinned {
			exact = append(exact, i)
			load += s.load()
		}
	}
	slices.SortFunc(exact, func(a, b int) int { return cmp.Compare(g.sites[b].load(), g.sites[a].load()) })
	for _, i := range exact {
		s := &g.sites[i]
		if load <= g.budget*exactShare || s.load() == 0 {
			break
		}
		load -= s.load()
		s.sampled = true
		s.window, s.period = g.windowFor(s, g.budget*(1-exactShare))
		s.nextOn = now.Add(min(s.period, samplePeriod))
		if s.armed {
			s.offAt = now // detached by this plan
		}
	}
}

// windowFor sizes a sampled site's window and period so that one window
// (its hits, those taken while it is being detached, and the attach and
// detach themselves) costs at most share of the budget over the period.
func (g *governor) windowFor(s *govSite, share float64) (window, period time.Duration) {
	load := s.load()
	if load <= 0 {
		return samplePeriod, samplePeriod
	}
	allowed := share * float64(samplePeriod) // ns of CPU per period
	w := (allowed-g.cycle)/load - float64(g.latency)
	if w >= float64(minWindow) {
		return min(time.Duration(w), samplePeriod), samplePeriod
	}
	// Even the shortest window each period is too dear: space them out.
	cost := load*float64(minWindow+g.latency) + g.cycle
	return minWindow, time.Duration(math.Min(cost/share, float64(time.Hour)))
}

// next is when plan must run again at the latest: the end of a window or
// the start of one (zero if none is due).
func (g *governor) next() time.Time {
	var t time.Time
	for i := range g.sites {
		s := &g.sites[i]
		if !s.sampled {
			continue
		}
		at := s.nextOn
		if s.armed {
			at = s.offAt
		}
		if !at.IsZero() && (t.IsZero() || at.Before(t)) {
			t = at
		}
	}
	return t
}

// armed records that site i was attached at now.
func (g *governor) armed(i int, now time.Time) {
	s := &g.sites[i]
	s.armed, s.armedAt = true, now
	s.span, s.spanHits = 0, 0
	if s.sampled {
		s.offAt = now.Add(s.window)
	}
}

// disarmed records that site i's detach finished at now.
func (g *governor) disarmed(i int, now time.Time) {
	if s := &g.sites[i]; s.armed {
		s.offDone = now // booked, with its last hits, by the next account
	}
}

// failed records that site i could not be attached; it is tried again at
// its next window (sampled) or never (exact: disabled).
func (g *governor) failed(i int) {
	if !g.sites[i].sampled {
		g.sites[i].disabled = true
	}
}

// scale returns, per site, the factor by which counts taken since the last
// call are multiplied to estimate every occurrence (1 for a site attached
// the whole time), and whether the count is an estimate.
func (g *governor) scale(now time.Time, i int) (float64, bool) {
	s := &g.sites[i]
	elapsed := now.Sub(g.flushed)
	w := s.flushWatched
	if s.armed {
		w += now.Sub(later(s.armedAt, g.last))
	}
	if !s.sampled && w >= elapsed {
		return 1, false
	}
	if w <= 0 || elapsed <= 0 {
		return 1, s.sampled
	}
	return max(1, float64(elapsed)/float64(w)), true
}

// flush starts a new interval for scale.
func (g *governor) flush(now time.Time) {
	g.flushed = now
	for i := range g.sites {
		g.sites[i].flushWatched = 0
	}
}

// limit is the kernel's running cost sum at which the governor must be
// woken: when the tokens left are spent, or, in debt, when another tick's
// worth of budget has been spent on top.
func (g *governor) limit() float64 {
	return g.kernel + max(g.tokens, 0) + g.budget*float64(pollInterval) + 1
}

// spentTotal is the CPU ns accounted since start: hits, attaching,
// detaching and calibrating.
func (g *governor) spentTotal() float64 { return g.kernel + g.extra }

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}
