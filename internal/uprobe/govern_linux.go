//go:build linux && amd64

package uprobe

// The cost governor at work: calibrating what a trap costs here, keeping
// the kernel's per-site costs current, and attaching and detaching sites
// as the governor (governor.go) decides, with attaches and detaches off
// the lock.

import (
	"cmp"
	"errors"
	"fmt"
	"os"
	"runtime"
	"slices"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"

	"github.com/mapguard/mapguard/decode"
	"github.com/mapguard/mapguard/internal/rt"
	"github.com/mapguard/mapguard/probe"
)

const (
	calibrationStepFunc = "github.com/mapguard/mapguard/internal/uprobe.calibrationStep"
	calibrationEmuFunc  = "github.com/mapguard/mapguard/internal/uprobe.calibrationEmu"
	// Calls per calibration run, each timed alone with the caches
	// evicted before it (75-95 us of CPU each on the project's VMs, so
	// few: 4 x 3 x 15 calls, 10-15 ms): a single-stepped trap costs 6-23
	// us there, an emulated one 0.5-6 us.
	calibrationStepCalls = 15
	calibrationEmuCalls  = 15
	calibrationRuns      = 3
	// initialLatency is what one detach is assumed to take until one was
	// measured (uprobe_multi: 28-36 ms on the project's VMs).
	initialLatency = 30 * time.Millisecond
)

// recalibrateEvery: trap costs move from day to day (and with load); the
// floors are measured again this often. A variable for tests.
var recalibrateEvery = time.Minute

// startGovernorLocked attaches every site and starts the governor with
// 30% of a second's budget to spend (see newGovernor), at the costs
// Start's calibration measured (assumed ones if it failed, until the
// waker's first tick calibrates).
func (u *uprobes) startGovernorLocked(now time.Time) error {
	if u.calibrations == 0 {
		u.assumeCostsLocked()
	}
	costs := make([]float64, len(u.sites))
	for i, s := range u.sites {
		costs[i] = u.siteCost(s)
	}
	u.gov = newGovernor(u.cfg.budget(), costs, float64(u.linkCost), initialLatency, now)
	u.gov.shareLink(u.startShared)
	for i, s := range u.sites {
		switch {
		case s.flags&siteGrowth != 0:
			// A table split rehashes about a thousand entries: the trap is a
			// few percent of the work that makes it fire, and sampling it
			// would miss the crossing of the growth threshold.
			u.gov.pin(i)
		case !s.deep && (s.kind == decode.NilMapWrite || s.kind == decode.UnhashableKey || s.kind == decode.ConcurrentMisuse):
			// Every hit is a bug that panics (or kills the process): each
			// is an event, and the panic's own cost bounds how often it can
			// happen. Sampled, such a site (its rate misread from a single
			// hit, the canary's) missed a nil-map write for seconds on the
			// slow 6.1 VM. Its hits are still spent from the budget.
			u.gov.pin(i)
		case !s.deep && u.watched[s.kind] && !u.statsOnly[s.kind]:
			// Its hits are events the user asked for, not statistics.
			u.gov.prioritize(i)
		}
	}
	for _, s := range u.sites {
		if s.link == nil {
			if err := u.armLocked(s); err != nil {
				return fmt.Errorf("attach %s+%#x: %w", s.fn.Name, s.at.Offset, err)
			}
		}
	}
	u.govStart = now
	return u.pushCostsLocked(true)
}

// pushCostsLocked writes the per-site costs and the spend limit the BPF
// program wakes the governor at.
func (u *uprobes) pushCostsLocked(all bool) error {
	changed := all
	for i, s := range u.sites {
		c := u.siteCost(s)
		u.gov.setCost(i, c)
		if old := float64(u.costs[s.index]); c > old*1.05 || c < old*0.95 {
			u.costs[s.index] = uint64(c)
			changed = true
		}
	}
	if changed {
		if err := u.costVar.Set(u.costs); err != nil {
			return err
		}
	}
	limit := uint64(u.gov.limit())
	if err := u.limitVar.Set(limit); err != nil {
		return err
	}
	u.limit.Store(limit)
	// The kernel wakes the governor when a hit crosses the limit. In a
	// storm the spend can pass the new limit before it is set (a
	// millisecond of slack is a few dozen single-stepped hits): then no
	// hit crosses it, and the governor would wait for the next tick
	// (seen: 65 ms of traps in one 100-ms tick). Run it again at once.
	// Only while it has a site left to sample: a storm on pinned sites
	// (nil-map writes) would otherwise run it in a loop.
	var spent uint64
	if err := u.spentVar.Get(&spent); err == nil && spent >= limit && u.wakeFile != nil && u.gov.demotable() {
		u.wakeAt = time.Now()
		u.wakeFile.SetReadDeadline(past)
	}
	return nil
}

// overLimit reports whether the kernel's spend has passed the limit last
// set (a wake-up due): two loads, no lock.
func (u *uprobes) overLimit() bool {
	var spent uint64
	if err := u.spentVar.Get(&spent); err != nil {
		return true
	}
	return spent >= u.limit.Load()
}

// governLocked runs the governor once: books the hits since the last
// tick, then attaches and detaches what it decides. Detaches run in
// goroutines of their own, off u.mu (each waits tens of ms for the kernel
// while the site's traps go on); the governor books their hits as they
// come. u.counters must be current.
func (u *uprobes) governLocked(now time.Time) {
	if u.bookLocked(now) {
		u.planLocked(now)
	}
}

// planLocked runs the governor's plan on what was booked (bookLocked), and
// attaches and detaches what it decides.
func (u *uprobes) planLocked(now time.Time) {
	u.lastPlan = now
	attach, detach, move := u.gov.plan(now)
	// Windows end first (a move attaches its sites' new link before their
	// old one, which others may share, is detached), then others open: an
	// attach takes 0.04-21 ms under load (seeded service: median 12 ms),
	// and a hot site's window ending behind one trapped all along.
	for _, group := range move {
		detach = u.moveGroupLocked(group, detach, now)
	}
	var batches []detachBatch
	for _, group := range detach {
		if b, ok := u.detachBatchLocked(group); ok {
			batches = append(batches, b)
		}
	}
	u.startDetachesLocked(batches)
	for _, group := range attach {
		u.attachGroupLocked(group)
	}
	for i := range u.sites {
		sampled := u.gov.sites[i].sampled
		if sampled && !u.sampled[i].Load() {
			u.log.V(1).Info("probe site sampled: over the budget", "function", u.sites[i].fn.Name,
				"rate", u.gov.sites[i].rate, "cost", time.Duration(u.gov.sites[i].cost),
				"window", u.gov.sites[i].window, "period", u.gov.sites[i].period)
		}
		u.sampled[i].Store(sampled)
	}
	if err := u.pushCostsLocked(false); err != nil {
		u.log.V(1).Info("set probe costs", "error", err.Error())
	}
	u.rescheduleLocked()
	if !u.lastCalib.IsZero() && u.calibrationDueLocked(now) && u.wakeFile != nil {
		// Recalibrations run on the waker, off u.mu (calibrateDue).
		u.wakeAt = now
		u.wakeFile.SetReadDeadline(past)
	}
}

// bookLocked books the hits and the Guard's own CPU since the governor's
// last run (u.counters must be current); false if there is no governor
// or the kernel's spend cannot be read.
func (u *uprobes) bookLocked(now time.Time) bool {
	if u.gov == nil {
		return false
	}
	var spent uint64
	if err := u.spentVar.Get(&spent); err != nil {
		return false
	}
	hits := u.hits[:0] // account does not keep it
	for _, s := range u.sites {
		hits = append(hits, u.counters[s.index].Hits)
	}
	u.hits = hits
	// Attaching and recalibrating run here, on the reader's or the
	// waker's thread: their CPU is in ownCPU. Detaches run on threads of
	// their own and book theirs in u.extra.
	extra := u.extra + time.Duration(u.ownCPU.Swap(0))
	u.extra = 0
	u.gov.noteCrossing(now, float64(spent), float64(u.limit.Load()))
	u.gov.account(now, float64(spent), hits, float64(extra))
	for i, s := range u.sites {
		u.gov.noteFiltered(i, u.counters[s.index].Filtered)
		// Deep sites serve OpStats's counts, read when asked: never idle.
		if s.deep || (int(s.index) < len(u.useful) && u.useful[s.index].Swap(false)) {
			u.gov.useful(i)
		}
	}
	if u.aggsFlushed {
		u.gov.flushed()
		u.aggsFlushed = false
	}
	return true
}

// planDueLocked reports whether the reader's tick must plan too, not only
// book the hits (bookLocked): the waker runs the whole governor whenever
// the kernel or a window asks, so a tick plans only when that has not
// happened for planInterval, or when the spend or a window needs it now.
// A run that plans cost the seeded service's Guard about 130 us of CPU
// (cold caches: the same work in a benchmark's loop takes 7 us), ten
// times a second from the ticks alone; booking is a third of it. Call
// after bookLocked.
func (u *uprobes) planDueLocked(now time.Time) bool {
	g := u.gov
	if now.Sub(u.lastPlan) >= planInterval || u.overLimit() || g.storm(now) || g.tokens < g.reserve() {
		return true
	}
	next := g.next()
	return !next.IsZero() && !now.Before(next)
}

// attachGroupLocked attaches the sites of one group the governor planned,
// off u.mu, in a goroutine of its own (attachAsync): with uprobe_multi,
// in one link per BPF program (a link's cost is mostly per link), else
// one by one. An attach takes 0.04-21 ms under load (an RCU grace period,
// unless a link was attached or detached in the last few ms): under the
// lock, Stats, the readers and the governor waited for it. Until it is
// done the sites count as not attached; a site whose attach or detach is
// in flight waits for its next window.
func (u *uprobes) attachGroupLocked(group []int) {
	job := attachJob{multi: u.multi, ex: u.ex}
	for _, i := range group {
		s := u.sites[i]
		if s.link != nil || s.closing != nil || s.attaching {
			continue
		}
		s.attaching = true
		job.sites = append(job.sites, s)
		if d := boolInt(s.deep); job.progs[d] == nil {
			job.progs[d] = u.program(s.deep)
		}
	}
	if len(job.sites) == 0 {
		return
	}
	job.turn = u.lane.enter(laneAttach) // after this run's detaches
	u.detaches.Add(1)                   // teardown waits for it
	go u.attachAsync(job)
}

// attachJob is what attachAsync needs, read under u.mu.
type attachJob struct {
	multi bool
	ex    *link.Executable
	progs [2]*ebpf.Program // always-on, deep
	sites []*site
	turn  *laneTicket
}

// attachAsync attaches a group's sites (see attachGroupLocked) in its turn
// in the link lane, then hands their links to the probe and tells the
// governor, booking the CPU the attaches took (measured on this
// goroutine's thread). If the probe is closing meanwhile, it closes them.
func (u *uprobes) attachAsync(job attachJob) {
	defer u.detaches.Done()
	job.turn.wait()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	c0 := threadCPU()
	// One link for the sites of each program (uprobe_multi), or one each.
	var groups [][]*site
	if job.multi && len(job.sites) > 1 {
		var byProg [2][]*site
		for _, s := range job.sites {
			byProg[boolInt(s.deep)] = append(byProg[boolInt(s.deep)], s)
		}
		for _, g := range byProg {
			if len(g) > 0 {
				groups = append(groups, g)
			}
		}
	} else {
		for _, s := range job.sites {
			groups = append(groups, []*site{s})
		}
	}
	type attached struct {
		sites []*site
		link  link.Link
		err   error
		took  time.Duration
	}
	done := make([]attached, 0, len(groups))
	for _, g := range groups {
		prog := job.progs[boolInt(g[0].deep)]
		t0 := time.Now()
		var a attached
		if len(g) == 1 {
			a.link, a.err = attachSite(job.ex, job.multi, g[0], prog)
		} else {
			a.link, a.err = attachMultiSites(job.ex, g, prog)
		}
		a.sites, a.took = g, time.Since(t0)
		done = append(done, a)
	}
	job.turn.leave()
	cpu := threadCPU() - c0
	u.mu.Lock()
	defer u.mu.Unlock()
	u.extra += cpu
	now := time.Now()
	var closing []link.Link
	for _, a := range done {
		for _, s := range a.sites {
			s.attaching = false
		}
		switch {
		case a.err != nil:
			for _, s := range a.sites {
				if !u.stopping {
					u.log.Error(a.err, "attach probe", "function", s.fn.Name)
					u.gov.failed(int(s.index))
				}
			}
		case u.stopping:
			closing = append(closing, a.link)
		default:
			u.gov.noteAttach(a.took)
			for _, s := range a.sites {
				s.link = a.link
				u.gov.armed(int(s.index), now)
			}
		}
	}
	if u.stopping {
		u.mu.Unlock()
		for _, l := range closing {
			l.Close()
		}
		u.mu.Lock()
		return
	}
	if err := u.pushCostsLocked(false); err != nil {
		u.log.V(1).Info("set probe costs", "error", err.Error())
	}
	u.rescheduleLocked()
}

// moveGroupLocked moves the sites of one move group, counted exactly, off
// the link they share with sites that are about to be detached, before
// that detach begins: it attaches them with a new link carrying their next
// generation in its cookies, then makes that generation the one the
// kernel counts (site_gen; until then the old link counts, after it the
// new one: one trap runs both programs, and one counts it). A site whose
// link no site outside the group shares keeps it. Sites that cannot be
// moved are added to the detach group of their link and told to the
// governor (unmoved); it returns detach, so extended.
func (u *uprobes) moveGroupLocked(group []int, detach [][]int, now time.Time) [][]int {
	inGroup := func(s *site) bool { return slices.Contains(group, int(s.index)) }
	var progs [2][]*site // always-on, deep
	for _, i := range group {
		s := u.sites[i]
		if s.link == nil || s.closing != nil {
			continue // not attached: nothing to keep
		}
		shared := false
		for _, t := range u.sites {
			shared = shared || (t.link == s.link && !inGroup(t))
		}
		if shared {
			progs[boolInt(s.deep)] = append(progs[boolInt(s.deep)], s)
		}
	}
	for deep, sites := range progs {
		if len(sites) == 0 {
			continue
		}
		for _, s := range sites {
			s.gen++
		}
		l, err := u.attachMulti(sites, u.program(deep == 1))
		if err == nil {
			err = u.genVar.Set(u.siteGens())
			if err != nil {
				l.Close() // the old link still counts: nothing was lost
			}
		}
		if err != nil {
			u.log.Error(err, "move probe to a link of its own", "function", sites[0].fn.Name)
			for _, s := range sites {
				s.gen--
				u.gov.unmoved(int(s.index), now)
				detach = joinDetach(u.sites, detach, s)
			}
			continue
		}
		for _, s := range sites {
			s.link = l
		}
	}
	return detach
}

// siteGens is site_gen as it must be: each site's generation, that of
// its link.
func (u *uprobes) siteGens() (gens [maxSites]uint8) {
	for _, s := range u.sites {
		gens[s.index] = s.gen
	}
	return gens
}

// joinDetach adds s to the detach group in detach that holds s's link (its
// other sites' link), or as a group of its own.
func joinDetach(sites []*site, detach [][]int, s *site) [][]int {
	for k, group := range detach {
		for _, i := range group {
			if sites[i].link == s.link {
				detach[k] = append(group, int(s.index))
				return detach
			}
		}
	}
	return append(detach, []int{int(s.index)})
}

// detachBatch is one detach group's sites and their links (each once:
// sites attached together share one).
type detachBatch struct {
	sites []*site
	links []link.Link
	load  float64 // its busiest site's heat (see startDetachesLocked)
	turn  *laneTicket
}

// detachBatchLocked takes a group's sites off their links for a detach;
// they count as attached (the governor books their hits) until the
// kernel is done. ok is false if none was attached.
func (u *uprobes) detachBatchLocked(group []int) (b detachBatch, ok bool) {
	var (
		links []link.Link
		sites []*site
	)
	for _, i := range group {
		s := u.sites[i]
		if s.link == nil {
			continue
		}
		if !slices.Contains(links, s.link) {
			links = append(links, s.link)
		}
		s.link, s.closing = nil, s.link
		sites = append(sites, s)
		if int(s.index) < len(u.gov.sites) {
			b.load = max(b.load, u.gov.sites[s.index].heat())
		}
	}
	if len(sites) == 0 {
		return b, false
	}
	u.detaching += len(sites)
	b.sites, b.links = sites, links
	return b, true
}

// startDetachesLocked detaches the batches off u.mu, the busiest first,
// each in its turn in the link lane (their places taken here, before this
// run's attaches), each in a goroutine that starts the next one before its own close: a
// new goroutine runs next on its P, and the one it displaced goes to the
// back of the queue. Started together from the governor, the second of
// two detaches waited 12-14 ms for a P in a saturated service (its
// breakpoints trapping all along), the first 0.1 ms; chained, each starts
// once the one before blocks in the kernel.
func (u *uprobes) startDetachesLocked(batches []detachBatch) {
	if len(batches) == 0 {
		return
	}
	slices.SortStableFunc(batches, func(a, b detachBatch) int { return cmp.Compare(b.load, a.load) })
	for i := range batches {
		batches[i].turn = u.lane.enter(laneDetach + batches[i].load)
	}
	u.detaches.Add(len(batches))
	go u.detachChain(batches)
}

// detachChain starts the rest of batches, then detaches the first.
func (u *uprobes) detachChain(batches []detachBatch) {
	if len(batches) > 1 {
		go u.detachChain(batches[1:])
	}
	u.detach(batches[0].sites, batches[0].links, batches[0].turn)
}

// detach closes links in its turn in the link lane and tells the governor
// when it is done, booking the CPU the closes took (measured on this
// goroutine's thread).
func (u *uprobes) detach(sites []*site, links []link.Link, turn *laneTicket) {
	defer u.detaches.Done()
	t0 := time.Now() // the wait for its turn is part of the detach's latency
	turn.wait()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	c0 := threadCPU()
	for _, l := range links {
		if err := l.Close(); err != nil {
			u.log.Error(err, "detach probe", "function", sites[0].fn.Name)
		}
	}
	turn.leave()
	cpu := threadCPU() - c0
	u.mu.Lock()
	defer u.mu.Unlock()
	// This thread's CPU, and what each link's cycle costs the rest of the
	// process (see calibrateLocked); the attach's own CPU was metered on
	// the governor's thread.
	u.extra += cpu + time.Duration(len(links))*u.linkOthers
	now := time.Now()
	for _, s := range sites {
		s.closing = nil
		u.detaching--
		if u.gov != nil {
			u.gov.disarmed(int(s.index), now)
		}
	}
	if u.gov != nil {
		u.gov.latency = (u.gov.latency + now.Sub(t0)) / 2
	}
}

// startWakerLocked starts the goroutine that the BPF program wakes when
// the budget is spent, so that the governor acts at once rather than at
// the next tick.
func (u *uprobes) startWakerLocked() error {
	r, err := ringbuf.NewReader(u.coll.Maps[mapguardMapWakeups])
	if err != nil {
		return err
	}
	f, err := pollFile(u.coll.Maps[mapguardMapWakeups].FD(), "mapguard-wakeups")
	if err != nil {
		r.Close()
		return err
	}
	u.wakeReader, u.wakeFile = r, f
	u.wakeDone = make(chan struct{})
	ready := make(chan error, 1)
	go u.runWaker(r, ready)
	return <-ready
}

// runWaker runs the governor whenever the BPF program asks (the budget is
// spent: a record in the wakeups ring, submitted with a wake-up) and
// whenever a sampled site's window opens or closes (the read deadline),
// until the probe closes. It waits in Go's netpoller on the ring's file
// descriptor, not in a system call (poll_linux.go). Its name is in
// mapguard.GoroutineFunctions.
func (u *uprobes) runWaker(r *ringbuf.Reader, ready chan<- error) {
	defer close(u.wakeDone)
	cpu := startCPUMeter(&u.ownCPU, false)
	defer cpu.stop()
	ready <- u.ignoreLocked(rt.GoID()) // Start holds u.mu
	u.mu.Lock()
	f := u.wakeFile
	u.mu.Unlock()
	rc, err := f.SyscallConn()
	if err != nil {
		u.log.Error(err, "governor waker")
		return
	}
	var rec ringbuf.Record
	for {
		cpu.begin()
		u.mu.Lock()
		var next time.Time
		polling := false // the deadline is a storm's look, not the governor's
		var govNext time.Time
		if u.gov != nil {
			next = u.gov.next()
			govNext = next
			if govNext.IsZero() {
				govNext = time.Now().Add(time.Hour)
			}
			if now := time.Now(); u.gov.startLook(now) {
				// Start's storm (see startLook): look every startPoll.
				if t := now.Add(startPoll); next.IsZero() || t.Before(next) {
					next, polling = t, true
				}
			} else if u.gov.storm(now) {
				// The kernel's wake-up reaches a goroutine through Go's
				// netpoller, which a saturated process polls late (seen:
				// 60-90 ms while traps spent 60 ms of CPU); a timer is
				// run on time. While the budget is under pressure, look
				// every stormPoll as well.
				if t := now.Add(stormPoll); next.IsZero() || t.Before(next) {
					next, polling = t, true
				}
			}
		}
		u.wakeAt = next
		if !next.IsZero() && !polling {
			// Rounded up a millisecond, as a ring buffer's wait would be.
			next = next.Add(time.Millisecond)
		}
		f.SetReadDeadline(next) // zero: no deadline
		u.mu.Unlock()
		cpu.book()
		// Wait until the ring has a record or the deadline passes
		// (rescheduleLocked moves it earlier).
		err := rc.Read(func(uintptr) bool { return r.AvailableBytes() > 0 })
		if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			// Closed by teardown ("use of closed file" when the wait was
			// under way, which is not os.ErrClosed): no error to log.
			u.mu.Lock()
			closing := u.stopping
			u.mu.Unlock()
			if !closing && !errors.Is(err, os.ErrClosed) {
				// Not in the netpoller: the reader's ticks still run the
				// governor, every poll interval.
				u.log.Error(err, "governor waker: cannot wait on the wakeups ring")
			}
			return
		}
		cpu.begin()
		if r.AvailableBytes() == 0 {
			// Woken by the deadline: how late, for the windows' costs.
			u.mu.Lock()
			if u.gov != nil && !u.wakeAt.IsZero() && !polling {
				u.gov.noteLate(time.Since(u.wakeAt))
			}
			u.mu.Unlock()
		}
		if polling && r.AvailableBytes() == 0 && !u.overLimit() && time.Now().Before(govNext) {
			continue // a storm's look: the kernel would not have woken us
		}
		if !drain(r, &rec, func([]byte) {}) {
			return
		}
		u.wake()
		cpu.book()
		cpu.begin()
		if ran, first := u.calibrateDue(time.Now()); ran {
			cpu.skip = first // the first calibration is start-up's cost, not the budget's
		}
		cpu.book()
	}
}

// rescheduleLocked wakes the waker when the governor needs to run before
// the waker's deadline (a window was scheduled).
func (u *uprobes) rescheduleLocked() {
	next := u.gov.next()
	if u.wakeFile == nil || next.IsZero() || (!u.wakeAt.IsZero() && !next.Before(u.wakeAt)) {
		return
	}
	u.wakeAt = next
	u.wakeFile.SetReadDeadline(next.Add(time.Millisecond)) // the waker's wait ends then
}

// budgetStatsLocked describes the governor.
func (u *uprobes) budgetStatsLocked(now time.Time) *probe.BudgetStats {
	if u.gov == nil {
		return nil
	}
	b := &probe.BudgetStats{
		Budget:       u.cfg.budget(),
		StepCost:     u.stepCost,
		EmulatedCost: u.emuCost,
		LinkCost:     u.linkCost,
		Spent:        time.Duration(u.gov.spentTotal()),
		Traps:        time.Duration(u.gov.kernel),
		Elapsed:      now.Sub(u.govStart),
		WorstSecond:  time.Duration(u.gov.worst),
		Calibrations: u.calibrations,
		TrapScale:    1,
	}
	if p := u.samp; p != nil {
		b.Sampler, b.TrapScale, b.TrapSamples = true, p.pool.scale, p.inTraps
	}
	for i := range u.gov.sites {
		if u.gov.sites[i].sampled {
			b.Sampled++
		}
	}
	if b.Elapsed > 0 {
		b.Overhead = float64(b.Spent) / float64(b.Elapsed)
	}
	return b
}
