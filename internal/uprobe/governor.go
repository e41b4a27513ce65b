package uprobe

import (
	"cmp"
	"maps"
	"math"
	"slices"
	"time"
)

// The cost governor keeps every probe site, always-on and deep alike,
// under one CPU budget, from what hits cost on this machine: the trap at
// the site's instruction (calibrated in Start, and again from time to
// time) plus the BPF program's run time (measured in the kernel on one
// hit in 16). It is plain arithmetic on a clock and counters, so that it
// can be tested without a kernel; the probe executes what it decides.
//
// The budget is kept per second, not only on average: what may still
// be spent (tokens) is a second's worth of budget less what was spent in
// the last second, the first second included. (A token bucket, which let
// half a second's burst through on top of a second's refill, cost the
// loaded service twice its budget in its first second.)
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
	// planAim is the share of a second's budget the windows are planned
	// to fill, with what was spent and what the exact sites and the
	// Guard's own work will spend (see plan): the rest absorbs what the
	// plan cannot foresee (a burst in a window, a governor late to end
	// it), so that the seconds stay within the budget, not around it.
	planAim = 0.85
	// prioExactShare is the share of the budget the sites counted exactly,
	// with the Guard's own work and the pinned sites (baseLoad), may use
	// before demote samples one that serves events (see prio): sampled,
	// its events are estimates. On the seeded service the
	// nested-map miss site (its probe takes every nested read, 2,000-2,600
	// a second, 3-6 ms of CPU a second) crossed exactShare alone 1 run in
	// 10, and its counts were estimates (110-576 of 300 or 600).
	prioExactShare = 0.7
	// prioPromoteShare: a sampled site serving events is counted exactly
	// again when it fits with the sites counted exactly and the Guard's
	// own work in this share of the budget (see plan).
	prioPromoteShare = 0.55
	// windowShare is the share of what the exact sites leave that the
	// windows use; the rest pays back a debt (a storm's first burst).
	windowShare = 0.8
	// prioShare is the share of the windows' budget that the sampled
	// sites serving events (see prioritize) may take before the sites
	// serving statistics share the rest.
	prioShare = 0.8
	// promoteShare: a sampled site whose load is below this share of the
	// budget is counted exactly again (while tokens are plentiful).
	promoteShare = 0.1
	// quietShare: a sampled site whose peak load is below this share of
	// the budget, and whose window is the whole period, is counted
	// exactly again whatever the tokens (see plan).
	quietShare = 0.01
	// relinkWatched is how long a site must have been attached for its
	// rate to tell that it is quiet (see demote).
	relinkWatched = 100 * time.Millisecond
	// startSpent is the share of the budget taken as spent in the second
	// before Start (see newGovernor).
	startSpent = 0.7
	// maxReserve bounds reserve, as a share of the second's budget.
	maxReserve = 0.9
	// firstLook is the share of the budget spent before the governor's
	// first look at the rates (see limit).
	firstLook = 0.1
	// stormShare: a storm has begun (see storm) once less than this share
	// of the second's budget is left (half what Start begins with: an
	// idle program's Guard, spending a little on its own goroutines, is
	// no storm); calmShare: it is over once this share is left.
	stormShare = 0.15
	calmShare  = 0.75
	// debtGap is the longest a sampled statistics' site goes without a
	// window while the budget is in debt (see plan).
	debtGap = 4 * time.Second
	// debtShare is the share of the second's budget that the statistics'
	// windows opened after debtGap may cost together in a lasting debt.
	debtShare = 0.2
	// idleHits and idlePeriod: a sampled site that took idleHits hits
	// since it last gave the user anything (an event, or a count for a
	// call site: all its hits were filtered out, or the runtime's and the
	// standard library's own) has a window every idlePeriod, not every
	// second, until one gives something again. On the seeded service the
	// map-bloat site (a Delete that empties a map: net/http's small maps,
	// 10,000-14,000 a second, never a bloated one) took 550-770 hits in
	// Start's first 100 ms and then a window every second, about 1 ms of
	// the budget each (its attach, its detach and 200 hits).
	idleHits   = 256
	idlePeriod = 4 * time.Second
	// rateWeight is the weight of the newest measurement in a site's rate.
	rateWeight = 0.5
	// minRateSpan is the least attached time a rate is measured over,
	// unless minRateHits hits came sooner (at least a millisecond): a rate
	// from three hits in 128 us says nothing.
	minRateSpan = 5 * time.Millisecond
	minRateHits = 16
	// slowRateSpan is the least attached time a rate is measured over
	// from fewer than minRateHits hits, if any came: one hit in 5 ms read
	// 200 a second for a site taking 10, and the governor, run every few
	// ms in a storm, sampled that quiet site as busy
	// (TestRealQuietSiteStaysExact failed so in CI, 1 run in 7).
	slowRateSpan = 100 * time.Millisecond
	// peakHalfLife: a site's peak rate (what its windows are sized from,
	// since a rate measured while the program was quiet is no bound on
	// the next burst) halves this often.
	peakHalfLife = 10 * time.Second
	// initialTail is what a detach is assumed to let through until one was
	// measured: the time from the start of a detach until the kernel has
	// removed the breakpoints (for uprobe_multi on 6.18: 0.01 ms for the
	// link's first site, a grace period more for the others unless the
	// link is a few milliseconds old, see hottestFirst; the grace periods
	// the close then waits for are not paid in traps).
	initialTail = time.Millisecond
	// initialLate is how late the governor is assumed to run, in the
	// reserve, until a few runs were measured (see priorLate): 1-4 ms on
	// the saturated seeded service. Assumed on time, the storm at Start
	// left the hot sites attached until the tokens were gone, the reserve
	// sized for 1 ms of their traps: at its first look (2 ms, 1.3 ms
	// spent) 1.7 ms were left, more than that; it demoted them at 6.8 ms,
	// and the detach's tail took its first 100 ms to 8.2 ms of traps.
	initialLate = 4 * time.Millisecond
	// ownSpan is the least time the Guard's own load is measured over
	// (see ownLoad).
	ownSpan = 100 * time.Millisecond
	// unknownLook is how often the governor looks, on a timer, at a window
	// of a site whose rate is not measured yet (sampled with Start's storm
	// before it was), until it is or minRateSpan has shown it is not among
	// the hottest (see unknown): such a site may be among the hottest,
	// and the kernel's wake-up at the window's allowance goes through Go's
	// netpoller, which a saturated process polls late. On the seeded
	// service one such window (16 sites, one of them taking 40,000 hits a
	// second, single-stepped) ran 65 ms and took 26 ms of traps.
	unknownLook = 2 * time.Millisecond
)

// govSite is the governor's view of one probe site.
type govSite struct {
	cost float64 // CPU ns one hit costs
	hits uint64  // the site's hit counter at the last account
	rate float64 // hits per second while attached (moving average)
	// measured: rate was measured (zero before is unknown, not quiet).
	measured bool
	// peak is the highest rate measured lately (decaying by peakHalfLife
	// from peakAt): windows are sized from it.
	peak    float64
	peakAt  time.Time
	sampled bool
	armed   bool      // attached, or being detached (its traps go on)
	armedAt time.Time // start of the current attachment
	offDone time.Time // armed: when its detach finished (booked at the next account)
	offAt   time.Time // sampled and armed: end of the window
	nextOn  time.Time // sampled and not armed: start of the next window
	lastOn  time.Time // sampled: start of the last window (or of sampling)
	checkAt time.Time // sampled and armed: when plan looks at the window again
	window  time.Duration
	period  time.Duration
	// allow is what the current window may cost (CPU ns: its hits, those
	// let through by its detach, and the attach and detach themselves);
	// spent what its hits cost so far. detachHits is the hit counter when
	// its detach began, to measure what a detach lets through.
	allow, spent float64
	share        float64 // of one CPU, what its windows may cost
	detachHits   uint64
	detachAt     time.Time
	// watched is the time attached since Start; span the time attached
	// since the last rate measurement and spanHits the hits in it;
	// flushWatched the time attached since flushFrom, the start of the
	// interval its counts are scaled over (see flush).
	watched, span, flushWatched time.Duration
	flushFrom                   time.Time
	spanHits                    uint64
	disabled                    bool // never attached (e.g. failed to attach)
	// group: the sampled sites attached together (one link) share one;
	// 0 for a site on a link of its own.
	group int
	// pinned: never sampled, since its cost is bounded by the work that
	// makes it fire (a large map's table splitting: thousands of entries
	// rehashed per hit); its hits are still spent from the budget.
	pinned bool
	// prio: its hits are events (a nested-map miss), not statistics: when
	// sampled, its windows are paid for before the statistics' sites'.
	prio bool
	// usefulHits is hits when the site last gave the user anything, and
	// flushHits hits at the last report of the call sites' counts;
	// filtered is the kernel's count of the site's hits that were no
	// anomaly (a map too small to be bloated, say), usefulFiltered that
	// count when it last gave anything (see idle).
	usefulHits, flushHits    uint64
	filtered, usefulFiltered uint64
	// relink: counted exactly, on a shared link that is detached because
	// other sites on it are sampled (see demote): moved to a link of its
	// own, with the other such sites, before that link is detached.
	relink bool
}

// load is the share of one CPU the site costs while attached.
func (s *govSite) load() float64 { return s.rate * s.cost / 1e9 }

// peakLoad is load at the site's recent peak rate: what its windows are
// sized from.
func (s *govSite) peakLoad() float64 { return max(s.rate, s.peak) * s.cost / 1e9 }

// noHits reports whether s took no hit lately, as measured: a rate not yet
// measured (a site sampled with Start's storm before its first few
// milliseconds) is no proof of a quiet site.
func (s *govSite) noHits() bool { return s.measured && s.peakLoad() == 0 }

// idle reports whether s took idleHits hits since it last gave the user
// anything: that many the kernel filtered out, or that many as of the
// last report of the call sites' counts (the hits a site counts for a
// call site give the user something only when they are reported, each
// second: until then a busy window's hits would read as idle).
func (s *govSite) idle() bool {
	return s.filtered-s.usefulFiltered >= idleHits ||
		(s.flushHits > s.usefulHits && s.flushHits-s.usefulHits >= idleHits)
}

// unknown reports whether s's rate is not measured and it has not been
// watched long enough to tell that it is not among the hottest (fewer than
// minRateHits hits in minRateSpan): see unknownLook.
func (s *govSite) unknown() bool { return !s.measured && s.span < minRateSpan }

// heat orders detaches the busiest first: s's load at its peak, or +Inf
// if it may be among the hottest (see unknown).
func (s *govSite) heat() float64 {
	if s.unknown() {
		return math.Inf(1)
	}
	return s.peakLoad()
}

// noteFiltered records the kernel's count of site i's hits that were no
// anomaly.
func (g *governor) noteFiltered(i int, filtered uint64) { g.sites[i].filtered = filtered }

// useful records that site i gave the user an event or a call site's
// count from the hits booked so far.
func (g *governor) useful(i int) {
	s := &g.sites[i]
	s.usefulHits, s.usefulFiltered = s.hits, s.filtered
}

// flushed records that the call sites' counts were reported from the hits
// booked so far (after useful for the sites whose counts were).
func (g *governor) flushed() {
	for i := range g.sites {
		g.sites[i].flushHits = g.sites[i].hits
	}
}

// inWindow reports whether s is a sampled site in a window that has not
// begun to be detached.
func (s *govSite) inWindow() bool {
	return s.sampled && s.armed && s.offDone.IsZero() && !s.offAt.IsZero()
}

// governor is the cost governor. It is not safe for concurrent use.
type governor struct {
	budget float64 // share of one CPU
	// perSecond is the CPU ns that may be spent in any one second (the
	// budget's second); tokens what may still be spent: perSecond less the
	// spend of the last second (negative: in debt).
	perSecond float64
	tokens    float64
	cycle     float64 // CPU ns to attach and then detach one link
	// linkShare is the links opened per sampled window lately (windows
	// that open together with one length share a link), from 1 down.
	linkShare float64
	latency   time.Duration // wall time a detach takes; a site is not re-attached meanwhile
	tail      time.Duration // time traps go on once a detach began
	// attachLag is how long an attach takes (the worst lately, see
	// noteAttach): a window's breakpoints trap for part of it before the
	// window begins.
	attachLag time.Duration
	// late is how late the governor runs after the time it asked to, or
	// after the kernel woke it (the worst lately, see noteLate): a window
	// planned to end at t ends at t+late.
	late time.Duration
	// priorLate is what the reserve assumes of late before enough runs
	// were measured: initialLate, down by an eighth at each measurement.
	priorLate time.Duration
	// looked: a site's rate was measured (see limit).
	looked bool
	kernel float64   // the kernel's running cost sum at the last account
	extra  float64   // CPU ns spent outside hits since start
	last   time.Time // last account
	start  time.Time
	groups int // the last group given out
	// pressureAt is when the tokens last fell below stormShare
	// of the second's budget (zero once calmShare is left): see storm.
	pressureAt time.Time
	demotedAt  time.Time // when demote last sampled a site
	sites      []govSite
	// recent holds the spend (spentTotal) at the accounts of the last
	// second, oldest first, for worst; worst is the most spent in one
	// second since start (see account).
	recent []spendAt
	worst  float64
	// linkOps counts the attaches and detaches planned (see ownLoad).
	linkOps int
}

// spendAt is the governor's total spend at one account, the part of it
// spent outside hits (extra), and the link operations planned until then.
type spendAt struct {
	at    time.Time
	spent float64
	extra float64
	links int
}

// newGovernor returns a governor for sites with the given per-hit costs
// (ns), all attached exactly at now, with startSpent of the first
// second's budget taken as spent.
func newGovernor(budget float64, costs []float64, cycle float64, latency time.Duration, now time.Time) *governor {
	g := &governor{
		budget:    budget,
		cycle:     cycle,
		latency:   latency,
		tail:      min(initialTail, latency),
		priorLate: initialLate,
		linkShare: 1,
		last:      now,
		start:     now,
		sites:     make([]govSite, len(costs)),
		recent:    []spendAt{{at: now}},
	}
	g.perSecond = max(budget*float64(time.Second), 2*cycle)
	// 30% of the second's budget at first (the rest is taken as spent
	// just before Start, see prior): the storm a service makes at Start
	// (hot runtime sites, whose traps go on while the governor, 10-20 ms
	// late in a saturated process, demotes them), and the rest of the
	// first second (the Guard's own work, the pinned sites), must fit in
	// the budget. With half, the seeded service's storm took 2.2-4.6 ms
	// of traps in its first 100 ms and its first second 10.7-12.1 ms
	// (6 runs); with 30%, 2.2-2.6 ms and 8.8-10.6 ms.
	// Starting with none made the first second cheaper still, but a
	// program's own burst right after Start (250 missing-key reads, 5 ms
	// of traps on the emulated VM) was then sampled, not counted
	// exactly (TestRealMissingKeyCounts failed in CI: 208 of 250 seen,
	// 9,322 estimated).
	g.tokens = g.perSecond * (1 - startSpent)
	for i, c := range costs {
		g.sites[i] = govSite{cost: c, armed: true, armedAt: now, flushFrom: now}
	}
	return g
}

// add adds a site found after the start, attached at now (or never, if
// attaching it failed), and returns its index.
func (g *governor) add(cost float64, now time.Time, attached bool) int {
	s := govSite{cost: cost, armed: attached, disabled: !attached, flushFrom: now}
	if attached {
		s.armedAt = now
	}
	g.sites = append(g.sites, s)
	return len(g.sites) - 1
}

// pin keeps site i attached whatever the budget (see govSite.pinned).
func (g *governor) pin(i int) { g.sites[i].pinned = true }

// shareLink records that sites were attached together with one link
// (Start attaches the statistics' sites so): demoted, they are detached
// together.
func (g *governor) shareLink(sites []int) {
	if len(sites) < 2 {
		return
	}
	g.groups++
	for _, i := range sites {
		g.sites[i].group = g.groups
	}
}

// prioritize gives site i's windows precedence (see govSite.prio).
func (g *governor) prioritize(i int) { g.sites[i].prio = true }

// setCost updates site i's cost per hit (ns).
func (g *governor) setCost(i int, cost float64) { g.sites[i].cost = cost }

// account books what happened since the last call: spent is the kernel's
// running sum of what the probes' hits cost (CPU ns),
// hits the sites' hit counters, extra CPU ns spent otherwise (attaching,
// detaching, recalibrating, the Guard's own goroutines).
// Accounts must come in time order: one older than the last is booked
// at the last one's time (see noteSecond).
func (g *governor) account(now time.Time, spent float64, hits []uint64, extra float64) {
	now = later(now, g.last)
	dt := now.Sub(g.last)
	g.last = now
	g.kernel = spent
	g.extra += extra
	g.tokens = g.perSecond - g.noteSecond(now)
	switch {
	case g.tokens < g.perSecond*stormShare && g.pressureAt.IsZero():
		g.pressureAt = now
	case g.tokens >= g.perSecond*calmShare:
		// Not a full second's budget: the Guard's own goroutines spend a
		// little every second.
		g.pressureAt = time.Time{}
	}
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
		s.spent += float64(d) * s.cost
		// The site traps from its attach until a little after its detach
		// began (the kernel removes the breakpoints first, then waits for a
		// grace period without traps).
		end := g.trapsUntil(s, now)
		if !s.offDone.IsZero() {
			g.measureTail(s)
			s.armed, s.offDone, s.detachAt = false, time.Time{}, time.Time{}
		}
		att := end.Sub(later(s.armedAt, now.Add(-dt)))
		if att < 0 {
			att = 0
		}
		s.watched += att
		s.flushWatched += att
		s.span += att
		s.spanHits += d
		// No hit in minRateSpan is a rate of zero at once (a sampled site
		// whose storm ended is promoted within its next few windows).
		if (s.span >= minRateSpan && (s.spanHits == 0 || s.span >= slowRateSpan)) || (s.span >= time.Millisecond && s.spanHits >= minRateHits) {
			r := float64(s.spanHits) / s.span.Seconds()
			if s.rate == 0 {
				s.rate = r
			} else {
				s.rate = rateWeight*r + (1-rateWeight)*s.rate
			}
			s.notePeak(r, now)
			s.measured = true
			s.span, s.spanHits = 0, 0
			g.looked = true
		}
	}
}

// noteSecond records the spend at now, updates worst and returns the
// spend of the last second: since the latest account at least a second
// before now (since start in the first second: recent begins with start).
// The window can be longer than a second (accounts are 0.1 s apart at
// most while the reader runs), never shorter, so the spend over-states
// rather than under-states.
func (g *governor) noteSecond(now time.Time) float64 {
	total := g.spentTotal()
	from := 0.0
	k := 0
	for k < len(g.recent) && !g.recent[k].at.After(now.Add(-time.Second)) {
		k++
	}
	if k > 0 {
		from = g.recent[k-1].spent
		k-- // keep it: the window's start for the next accounts too
	}
	g.worst = max(g.worst, total-from)
	g.recent = append(g.recent[:0], g.recent[k:]...)
	g.recent = append(g.recent, spendAt{now, total, g.extra, g.linkOps})
	return total - from + g.prior(now.Add(-time.Second))
}

// prior is what is taken as spent before start, in a second that began
// at t (see newGovernor).
func (g *governor) prior(t time.Time) float64 {
	if t.Before(g.start) {
		return g.perSecond * startSpent
	}
	return 0
}

// trapsUntil is when s stops trapping, as far as now: its detach's start
// plus the tail, or now.
func (g *governor) trapsUntil(s *govSite, now time.Time) time.Time {
	if !s.detachAt.IsZero() {
		if t := s.detachAt.Add(g.tail); t.Before(now) {
			return t
		}
	}
	return now
}

// notePeak records a rate measured at now in s's decaying peak.
func (s *govSite) notePeak(r float64, now time.Time) {
	if !s.peakAt.IsZero() {
		s.peak *= math.Exp2(-float64(now.Sub(s.peakAt)) / float64(peakHalfLife))
	}
	s.peakAt = now
	s.peak = max(s.peak, r)
}

// maxLate bounds late: a run that late was not waiting on its timer (the
// process stopped, or the machine).
const maxLate = 50 * time.Millisecond

// noteLate records that a run asked for at some time came d after it:
// late rises to a longer delay at once, and comes down slowly (an eighth
// of the way each time). Its mean would plan the next window for a
// typical run, and a saturated process's bad runs are what a hot site's
// window costs: on the loaded service a window planned at 1 ms, with
// 1.4 ms of overrun foreseen, ran 9 ms (the governor 3.7 ms late, the
// detach's traps 4.5 ms more) and cost 6.6 ms of traps.
func (g *governor) noteLate(d time.Duration) {
	g.priorLate = g.priorLate * 7 / 8
	g.late = worstLately(g.late, d)
}

// worstLately is the worst delay lately, cur, after one more was measured
// (d, at most maxLate): a longer one at once, a shorter one an eighth of
// the way.
func worstLately(cur, d time.Duration) time.Duration {
	d = min(max(d, 0), maxLate)
	if d > cur {
		return d
	}
	return (7*cur + d) / 8
}

// noteCrossing records how late the governor runs after the kernel's
// spend crossed limit (the last one set, from the account at g.last), at
// an account at now that found spent: the crossing is placed by assuming
// the spend went on at one rate since the last account. In a saturated
// process the waker ran 8-20 ms after the kernel woke it (the seeded
// service: the netpoller is looked at by sysmon then), and a storm's
// traps go on meanwhile: the reserve must know it before the first
// window's deadline tells.
func (g *governor) noteCrossing(now time.Time, spent, limit float64) {
	if spent <= limit || limit <= g.kernel || !now.After(g.last) {
		return
	}
	frac := (limit - g.kernel) / (spent - g.kernel)
	cross := g.last.Add(time.Duration(frac * float64(now.Sub(g.last))))
	g.noteLate(now.Sub(cross))
}

// noteAttach records that an attach took d, from its start until the
// probe marked its sites attached: their breakpoints were in place for
// part of it, and trapped. Like late, attachLag is the worst lately.
func (g *governor) noteAttach(d time.Duration) { g.attachLag = worstLately(g.attachLag, d) }

// overrun is how long a window's traps go on after the governor decides
// to end it, at the latest planned time: until it runs (late), then until
// the kernel has removed the breakpoints (tail).
func (g *governor) overrun() time.Duration { return g.tail + g.late }

// measureTail updates the time traps go on once a detach began from the
// hits s took since then, where enough were expected to tell.
func (g *governor) measureTail(s *govSite) {
	if s.detachHits == 0 || s.hits < s.detachHits || s.rate*g.latency.Seconds() < 4*minRateHits {
		return
	}
	t := time.Duration(float64(s.hits-s.detachHits) / s.rate * 1e9)
	if t <= g.tail {
		t = (7*g.tail + t) / 8 // down slowly, up at once (see noteLate)
	}
	g.tail = min(max(t, 50*time.Microsecond), g.latency)
}

// plan returns the sites to attach and to detach now, in groups: the
// probe attaches each group with one link where it can (one attach and one
// detach for all of them: a link's CPU cost is mostly per link), and
// detaches a group's sites together. It calls armed when a group is
// attached, and disarmed for each site when its detach has finished.
// The sites of a move group stay attached: the probe attaches them with a
// new link before it detaches the old one, which other sites in a detach
// group share (make before break; see demote), and calls unmoved for each
// it could not move.
//
// Sampled sites' windows open on beats (whole periods since start), with
// lengths rounded down to a power of four milliseconds, so that the sites
// whose windows open together and are about as long share a link.
//
// A window ends at its planned end, or sooner: as soon as what it spent,
// plus what it would spend until its end at the site's peak rate, plus
// what its detach lets through, exceeds what it may cost (a burst during
// the window raises the peak rate at the next look, and the kernel wakes
// the governor when the windows' allowances are spent, see limit); and
// in debt (tokens below zero) no window runs longer than the shortest
// one. When one site's window in a group ends, the group's does.
func (g *governor) plan(now time.Time) (attach, detach, move [][]int) {
	debt := g.tokens < 0
	if g.tokens < g.reserve() {
		// Demote while the tokens left still pay for it.
		g.demote(now)
	}
	exactLoad := g.shares()
	opening := map[time.Duration][]int{} // window -> sites
	var due []int                        // sampled sites whose window is due
	ending := map[int]bool{}             // groups
	var exact []int                      // attached together, one link
	for i := range g.sites {
		s := &g.sites[i]
		if s.disabled {
			continue
		}
		if !s.sampled {
			if !s.armed {
				exact = append(exact, i)
			}
			continue
		}
		// Quiet again (its recent rate, not its peak: a burst after this is
		// paid from the tokens, and the kernel wakes the governor when they
		// are spent): count it exactly, on a link of its own. So too,
		// whatever the tokens, a quiet site whose window was the whole
		// period: it is paid to be attached all along, and a window each
		// second only cost a link's attach and detach, and left it blind
		// while they ran (seeded service: 13 sites with no more than 14
		// hits a second cycled one link every second for as long as the
		// budget was tight).
		// Its rate must be known (a window is the whole period too for a
		// site not watched long enough to tell), and low at its peak.
		// Either way it must have been measured: a rate never measured
		// reads zero, and the seeded service's net/http miss sites,
		// sampled with Start's storm before they took a hit, their first
		// window waiting for room (see discovery), were counted exactly
		// again at 2.6 s, and one took 5.3 ms of traps in 12 ms.
		whole := s.window >= samplePeriod && s.period <= samplePeriod &&
			s.watched >= relinkWatched && s.peakLoad() < g.budget*quietShare
		// A site serving events is counted exactly again once it fits,
		// at its peak rate, beside the exact sites and the Guard's own
		// work in prioPromoteShare of the budget (below prioExactShare, so
		// that it is not sampled and promoted by turns), out of debt: a
		// program whose Start's own work sampled it is not left with
		// estimates.
		back := s.prio && exactLoad+s.peakLoad() <= g.budget*prioPromoteShare && g.tokens > 0
		if s.measured && (back || s.load() < g.budget*promoteShare && (g.tokens > g.perSecond/2 || whole)) && (!s.armed || s.group == 0) {
			exactLoad += s.load()
			s.sampled = false
			s.offAt, s.checkAt = time.Time{}, time.Time{}
			if !s.armed {
				exact = append(exact, i)
			}
			continue
		}
		switch {
		case s.inWindow():
			if g.endWindow(s, now, debt) {
				ending[s.group] = true
				if s.group == 0 {
					detach = append(detach, []int{i})
					g.ended(s, now)
				}
			}
		case !s.armed && !now.Before(s.nextOn):
			due = append(due, i)
		}
	}
	// The windows due open in turn, the sites serving events first, then
	// those that waited longest, each while what its second leaves pays
	// for it.
	slices.SortStableFunc(due, func(a, b int) int {
		sa, sb := &g.sites[a], &g.sites[b]
		if sa.prio != sb.prio {
			if sa.prio {
				return -1
			}
			return 1
		}
		return sa.lastOn.Compare(sb.lastOn)
	})
	given := 0.0     // the windows' allowances opened so far
	discover := -1.0 // what a window of a site never measured risks (see discovery)
	forced := 0.0    // in debt, what the statistics' windows opened after debtGap risk
	// roomFor is what the second that ends w from now leaves: spent since
	// a second before its end (the last window of a site sampled every
	// second lies before that), what the exact sites spend meanwhile, and
	// the windows opened before.
	roomFor := func(w time.Duration) float64 {
		return g.perSecond*planAim - g.spentSince(now.Add(w-time.Second)) - exactLoad*float64(w) - given
	}
	for _, i := range due {
		s := &g.sites[i]
		s.window, s.period = g.windowFor(s, s.share)
		s.allow = s.share * float64(s.period)
		if s.idle() {
			s.period = max(s.period, idlePeriod)
		}
		if debt && !s.prio && !s.noHits() {
			// In debt, windows are the shortest, except those of the
			// sites serving events (their share is a fifth of the
			// budget at most: the rest pays the debt back), and those of
			// sites that took no hit (such a window costs its link,
			// whatever its length; kept whole, it tells that the site
			// is quiet, see quietShare).
			s.window = min(s.window, g.shortestWindow(s))
		}
		room := roomFor(s.window)
		least := g.windowCost(s, g.shortestWindow(s))
		wait := room < least
		if !s.measured && discover != 0 {
			// The first such window this plan opens pays for the risk,
			// which comes at its start; the others share its link and
			// its end.
			if discover < 0 {
				discover = g.discovery()
			}
			wait = wait || roomFor(unknownLook+g.overrun()) < discover
		}
		if wait {
			if !s.prio {
				// A statistics' site waits for the next beat, when this
				// beat's windows have left the second, unless it has had
				// no window for debtGap: its counts are estimates either
				// way (see flush). Even then its window must fit in what
				// the whole second leaves (the planned aim's margin
				// included), or in a lasting debt in debtShare of the
				// budget: opened whatever it cost, the seeded service's
				// hot net/http and encoding/json sites (14,000-37,000
				// hits a second, single-stepped, 14 ms of attach and 10
				// of lateness around each window) were given 21 ms at
				// once, and the second cost 12-18 ms. The sites serving
				// events keep theirs, the shortest.
				risk := least
				if !s.measured && discover > 0 {
					risk += discover
				}
				limit := roomFor(g.shortestWindow(s)) + g.perSecond*(1-planAim)
				if debt {
					limit = g.perSecond*debtShare - forced
				}
				if now.Sub(s.lastOn) < debtGap || risk > limit {
					s.nextOn = g.nextBeat(now, samplePeriod, s.phase())
					continue
				}
				forced += risk
			}
			room = max(room, least)
		}
		if s.allow > room {
			s.allow = room
			s.window = min(s.window, g.windowWithin(s, room))
		}
		s.window = bucket(s.window)
		given += min(s.allow, g.windowCost(s, s.window))
		if !s.measured && discover > 0 {
			given += discover
			discover = 0
		}
		s.nextOn = g.nextBeat(now, s.period, s.phase())
		opening[s.window] = append(opening[s.window], i)
	}
	for _, gr := range slices.Sorted(maps.Keys(ending)) {
		if gr == 0 {
			continue
		}
		var sites, moving []int
		for i := range g.sites {
			s := &g.sites[i]
			switch {
			case s.group != gr:
			case s.inWindow():
				sites = append(sites, i)
				g.ended(s, now)
			case s.relink && s.armed && s.detachAt.IsZero():
				moving = append(moving, i)
			}
		}
		if len(sites) > 0 {
			detach = append(detach, sites)
		}
		if len(moving) > 0 {
			g.groups++
			for _, i := range moving {
				g.sites[i].group, g.sites[i].relink = g.groups, false
			}
			move = append(move, moving)
		}
	}
	// The sites counted exactly that are not attached (at first, promoted,
	// or off a shared link) share one link: a link's cost is mostly per
	// link, and a later demotion detaches them together again.
	if len(exact) > 0 {
		gr := 0
		if len(exact) > 1 {
			g.groups++
			gr = g.groups
		}
		for _, i := range exact {
			g.sites[i].group = gr
		}
		attach = append(attach, exact)
	}
	windows := 0
	for _, w := range slices.Sorted(maps.Keys(opening)) {
		g.groups++
		for _, i := range opening[w] {
			g.sites[i].group = g.groups
		}
		attach = append(attach, g.hottestFirst(opening[w]))
		windows += len(opening[w])
	}
	if windows > 0 {
		g.linkShare = (g.linkShare + float64(len(opening))/float64(windows)) / 2
	}
	g.linkOps += len(attach) + len(detach) + len(move)
	return attach, detach, move
}

// hottestFirst orders a group's sites as its link will hold them, the
// hottest first (a site never measured counts as the hottest, as
// discovery prices it): when a link is detached the kernel removes
// its breakpoints in that order, the first at once and the others some
// milliseconds later (an RCU grace period, unless the link was attached
// within the last few). On this machine, with 15 sites on one link and one of them
// hot, traps went on 0.01 ms after the close began when it was first and
// 3-8 ms (up to 16) when it was last; on the seeded service a window of
// 16 sites never measured let 379-455 hits through its detach, 2-3 ms of
// traps.
func (g *governor) hottestFirst(group []int) []int {
	heat := func(i int) float64 {
		if s := &g.sites[i]; s.measured {
			return s.peakLoad()
		}
		return math.Inf(1) // never measured: priced as the hottest (see discovery)
	}
	slices.SortStableFunc(group, func(a, b int) int { return cmp.Compare(heat(b), heat(a)) })
	return group
}

// discovery is what the first window of a site whose rate was never
// measured may cost before the governor ends it: it may be as hot as the
// hottest site measured, and its traps go on until the governor looks
// (unknownLook), runs (late), and its detach is done: tail, and a grace
// period more unless it is its link's first site (see hottestFirst),
// which a cold attach measures (attachLag). On the seeded service 16
// sites took no hit in Start's first 2 ms (net/http's header lookups had
// not begun), were sampled with Start's storm, and opened with the
// statistics' windows at 1.0 s, a second that still held the storm: one
// took 35,000-69,000 hits a second, single-stepped, and the window 1.5-3.4
// ms of traps (2-3 ms of them after its detach began). Priced without the
// grace period, such a window still opened at 1.0 s in 2 runs of 12
// (priced at 0.46 ms; it took 3.4). Priced so, it waits for a beat whose
// second has room for it.
func (g *governor) discovery() float64 {
	hot := 0.0
	for i := range g.sites {
		if s := &g.sites[i]; !s.disabled {
			hot = max(hot, s.peakLoad())
		}
	}
	return hot*float64(unknownLook+g.overrun()+g.attachLag) + g.siteCycle()
}

// next is when plan must run again at the latest: the end of a window, a
// look into one, or the start of one (zero if none is due).
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
			if !s.checkAt.IsZero() && (at.IsZero() || s.checkAt.Before(at)) {
				at = s.checkAt
			}
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
	s.offDone, s.detachAt = time.Time{}, time.Time{}
	s.spent = 0
	s.relink = false
	if s.sampled {
		s.lastOn = now
		s.offAt = now.Add(s.window)
		s.lookAgain(now)
	}
}

// unmoved records that site i, in a move group of plan, could not be
// moved: it is detached with its old link, now, and attached again once
// that is done (a blind spell, which its counts then say).
func (g *governor) unmoved(i int, now time.Time) { g.ended(&g.sites[i], now) }

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
	elapsed := now.Sub(s.flushFrom)
	w := g.watchedSinceFlush(s, now)
	if !s.sampled && w >= elapsed {
		return 1, false
	}
	if w <= 0 || elapsed <= 0 {
		return 1, s.sampled
	}
	return max(1, float64(elapsed)/float64(w)), true
}

// watchedSinceFlush is the time s was attached since flushFrom, as far as
// now (s.flushWatched, and the attachment going on).
func (g *governor) watchedSinceFlush(s *govSite, now time.Time) time.Duration {
	w := s.flushWatched
	if s.armed {
		w += max(g.trapsUntil(s, now).Sub(later(s.armedAt, g.last)), 0)
	}
	return w
}

// flush starts a new interval for scale, except for a sampled site that
// was not attached at all in this one (its windows skipped in debt): its
// next window's counts stand for both, so that a skipped second is
// estimated, not lost.
func (g *governor) flush(now time.Time) {
	for i := range g.sites {
		s := &g.sites[i]
		if s.sampled && g.watchedSinceFlush(s, now) == 0 {
			continue
		}
		s.flushFrom, s.flushWatched = now, 0
	}
}

// demotable reports whether a site counted exactly could still be
// sampled: attached, with hits, and neither pinned nor disabled.
func (g *governor) demotable() bool {
	for i := range g.sites {
		if s := &g.sites[i]; s.armed && !s.sampled && !s.pinned && !s.disabled && s.rate > 0 {
			return true
		}
	}
	return false
}

// stormPoll is how often the waker looks at the spend, whatever the
// kernel's wake-ups, while storm reports pressure on the budget.
const stormPoll = 10 * time.Millisecond

// storm reports whether a storm has begun lately: less than stormShare of
// the second's budget is left, for at most stormSpan since it fell there,
// and only while it goes on demoting sites (stormQuiet since it fell there
// or since the last site was sampled): once the hot sites are sampled,
// their windows run on timers, and each look costs the waker's thread a
// wake-up (measured: about 60 us of CPU under load, 6 ms a second).
func (g *governor) storm(now time.Time) bool {
	return g.tokens < g.perSecond*stormShare && !g.pressureAt.IsZero() && now.Sub(g.pressureAt) < stormSpan &&
		now.Sub(later(g.pressureAt, g.demotedAt)) < stormQuiet
}

// startLook reports whether the waker must look at the spend on a timer
// (every startPoll), whatever the kernel's wake-ups: until the governor's
// first look at the rates (see limit), in the first startLookSpan. The
// storm a busy program makes at Start (hot runtime sites, single-stepped,
// trapping on both CPUs) crosses firstLook within a millisecond, and the
// kernel's wake-up reached the waker through the netpoller 1-9 ms later
// on the seeded service, while the traps went on: 1.5-10 ms of them
// before the governor first ran, most of the first second's budget.
func (g *governor) startLook(now time.Time) bool {
	return !g.looked && now.Sub(g.start) < startLookSpan
}

// startPoll is how often the waker looks while startLook; startLookSpan
// bounds how long (a program with no hot site never has a rate measured
// so soon).
const (
	startPoll     = time.Millisecond
	startLookSpan = 50 * time.Millisecond
)

// stormSpan bounds how long storm reports one storm; stormQuiet is how
// long it does after the last demotion.
const (
	stormSpan  = time.Second
	stormQuiet = 100 * time.Millisecond
)

// limit is the kernel's running cost sum at which the governor must be
// woken: when the tokens left would just pay for demoting the sites
// counted exactly (see reserve), or, in debt, when another tick's worth
// of budget has been spent on top; and, while sampled sites are in a
// window, when what their windows may still cost is spent (a burst in a
// window then ends it at once, rather than at its planned end).
func (g *governor) limit() float64 {
	slack := g.budget * float64(pollInterval)
	lim := max(g.tokens-g.reserve(), slack)
	if !g.looked {
		// No rate measured yet (at Start): a first look after a tenth of
		// the budget, so that the reserve is sized from the rates before
		// a storm spends the rest.
		lim = min(lim, g.perSecond*firstLook)
	}
	windows, open := 0.0, false
	for i := range g.sites {
		s := &g.sites[i]
		if s.inWindow() && !math.IsInf(s.allow, 1) {
			open = true
			windows += max(s.allow-g.siteCycle()-s.spent-s.peakLoad()*float64(g.overrun()), 0)
		}
	}
	if open {
		lim = min(lim, windows+slack)
	}
	return g.kernel + lim + 1
}

// spentSince is what was spent since t, as far as the accounts tell: since
// the latest account at or before t (t no more than a second ago).
func (g *governor) spentSince(t time.Time) float64 {
	from := g.recent[0].spent
	for _, r := range g.recent[1:] {
		if r.at.After(t) {
			break
		}
		from = r.spent
	}
	return g.spentTotal() - from + g.prior(t)
}

// reserve is what demoting the sites counted exactly would cost once the
// kernel wakes the governor: their traps until it runs and their
// breakpoints are gone (overrun, at their peak rates), and detaching their
// links; at most maxReserve of the second's budget, so that a program's
// burst is still counted.
func (g *governor) reserve() float64 {
	r, links := 0.0, 0
	var groups []int // not a map: a missing key would trap on our own probes
	overrun := g.tail + max(g.late, g.priorLate)
	for i := range g.sites {
		s := &g.sites[i]
		if !s.armed || s.sampled || s.pinned || s.disabled || !s.detachAt.IsZero() {
			continue
		}
		r += s.peakLoad() * float64(overrun)
		switch {
		case s.group == 0:
			links++
		case !slices.Contains(groups, s.group):
			groups = append(groups, s.group)
			links++
		}
	}
	r += float64(links) * g.cycle / 2
	return min(r, g.perSecond*maxReserve)
}

// ownLoad is the share of a CPU the Guard spent on its goroutines over
// the last second (since start in the first, over ownSpan at least): a
// load that goes on, like an exact site's, which the windows must leave
// room for. Its links are left out (half a cycle each attach or detach):
// a window's cost has its link's.
func (g *governor) ownLoad() float64 {
	r := g.recent[0]
	own := g.extra - r.extra - float64(g.linkOps-r.links)*g.cycle/2
	return max(own, 0) / float64(max(g.last.Sub(r.at), ownSpan))
}

// baseLoad is the share of a CPU that goes on whatever demote samples:
// the Guard's own work (ownLoad) and the pinned sites' hits. Left out of
// the test that samples a site serving events, the seeded service's
// nested-read site (4-5 ms a second) stayed counted exactly beside 2-3 ms
// of the Guard's own and 1 ms of pinned nil-map writes, and its seconds
// cost 9.5-10.6 ms of a 10-ms budget, the first 13.3.
func (g *governor) baseLoad() float64 {
	l := g.ownLoad()
	for i := range g.sites {
		if s := &g.sites[i]; s.pinned && s.armed {
			l += s.load()
		}
	}
	return l
}

// spentTotal is the CPU ns accounted since start: hits, and the extra
// (attaching, detaching, recalibrating, the Guard's goroutines).
func (g *governor) spentTotal() float64 { return g.kernel + g.extra }

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}
