package uprobe

import (
	"runtime"
	"slices"
	"sync"
	"time"
)

// linkLane lets a few link system calls (a probe link's attach or close)
// be in the kernel at once, the most urgent first.
//
// Such a call blocks for a grace period or more (on the project's VM under
// the seeded service's load: an attach 7-16 ms, a close 16-72 ms, of one
// site or twenty), and the Go runtime counts a thread in a system call as
// running: its P goes to another thread only when sysmon retakes it, up to
// two of sysmon's sleeps later (10 ms each once it has backed off, as it
// does in a program that seldom blocks). With the governor's calls in
// parallel, two at once held both Ps of a two-CPU process, and the whole
// program stood still meanwhile. golang-lru's expirable package, whose
// ExampleLRU needs a 100-us ticker to tick 99 times in 100 ms, failed 7
// runs of 20 in deep mode (its sampled sites' windows attach and close
// links all along), and none of 20 without a Guard, with a budget large
// enough that no site is sampled, with GOMAXPROCS=4 (a P left over), or
// with the calls one at a time (interleaved runs).
//
// A call waits for its turn; one in the kernel is never interrupted, so
// what may wait behind it matters. Detaches go before attaches (a detach
// ends traps, an attach begins them), the busiest first. The calibration's
// links take turns in a lane of their own (the probe's calibLane, one at
// a time), apart from the governor's: in one lane, the two closes of
// Start's calibration, right after Start, made the governor's detaches in
// Start's storm wait behind them, and the seeded service's first second
// booked 28 ms (median of 27 starts) against 7 with every call in
// parallel; held a second, they did the same to the second second (26-32
// ms in 3 of 27 starts). So on a two-P process at most two link calls of
// the lanes are in the kernel at once (the governor's and, at Start and a
// minute apart, the calibration's), besides those made under the probe's
// lock (a move's attach, Start's).
//
// What waiting costs: a detach behind another lets its sites trap that
// much longer; once its close begins they stop (a debug build read the
// hit counters at both ends of each close: at most two hits more). On the
// seeded service the second detach of Start's storm, of the map-bloat
// site's link (net/http's emptied maps, 10,000-14,000 a second) behind
// Start's shared link, waited 2-22 ms, and a window's detach at most 26.
// Against the calls in parallel, there, in 3
// interleaved runs of 100 s each way (27 toggled starts each): the first
// second booked a median 7.2 ms against 6.6 (over the 10-ms budget in 2
// starts against 1), the seconds after it 4.4 ms against 5.6 (over it in
// 2 of 108 against none); CPU per request in the first seconds,
// against the phases without a Guard beside them: 1.006-1.024x against
// 1.009-1.018x.
type linkLane struct {
	mu      sync.Mutex
	size    int // calls in the kernel at once, at most; 0: laneSize()
	busy    int
	waiting []*laneTicket // in the order they entered
	peak    int           // the most in the kernel at once (tests)
	turns   int           // calls let in (tests)
	// lowHeld: calls at laneStartCalib wait until lowAfter (holdLow).
	lowHeld  bool
	lowAfter time.Time
	unbound  bool // open: the probe is closing
	lowTimer *time.Timer
}

// laneTicket is one call's place in the lane.
type laneTicket struct {
	lane  *linkLane
	prio  float64
	ready chan struct{}
}

// Priorities: a detach's is laneDetach plus its busiest site's heat.
const (
	laneAttach = 0
	laneDetach = 1
	// laneCalib and laneStartCalib: the calibration's own links (on
	// functions no one else calls), in calibLane; Start's closes are held
	// (holdLow).
	laneCalib      = -1
	laneStartCalib = -2
)

// laneSize is how many link calls may be in the kernel at once: a quarter
// of the Ps, at least one (one P of two, the most a two-CPU process can
// spare). It is read at each turn: GOMAXPROCS can change.
func laneSize() int {
	return max(1, runtime.GOMAXPROCS(0)/4)
}

// enter takes a place in the lane at once (so that the order of calls
// decided together is kept); wait then blocks until it is the call's turn.
// A nil lane lets every call go at once.
func (l *linkLane) enter(prio float64) *laneTicket {
	if l == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	t := &laneTicket{lane: l, prio: prio, ready: make(chan struct{})}
	l.waiting = append(l.waiting, t)
	l.grantLocked()
	return t
}

// wait blocks until t's call may go into the kernel; leave must follow.
func (t *laneTicket) wait() {
	if t != nil {
		<-t.ready
	}
}

// leave ends t's call: the next one may go.
func (t *laneTicket) leave() {
	if t == nil {
		return
	}
	l := t.lane
	l.mu.Lock()
	defer l.mu.Unlock()
	l.busy--
	l.grantLocked()
}

// do runs f in its turn.
func (l *linkLane) do(prio float64, f func()) {
	t := l.enter(prio)
	t.wait()
	defer t.leave()
	f()
}

// holdLow makes the closes of Start's calibration (laneStartCalib) wait
// until until (the zero time: until the next holdLow), or until open: its
// links, on functions no one else calls, cost nothing while they stay.
func (l *linkLane) holdLow(until time.Time) {
	if l == nil {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lowHeld, l.lowAfter = true, until
	if l.lowTimer != nil {
		l.lowTimer.Stop()
		l.lowTimer = nil
	}
	if !until.IsZero() {
		l.lowTimer = time.AfterFunc(time.Until(until), l.holdEnded)
	}
}

// holdEnded lets the held calls go, in their turns, once the hold's time
// has come. It runs on a goroutine of its own (its name is in
// mapguard.GoroutineFunctions).
func (l *linkLane) holdEnded() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.grantLocked()
}

// open ends a hold (holdLow) and the bound: the probe is closing (or
// Start failed), and every call waiting goes at once, beside teardown's
// own closes, which run in parallel (Close waits for them all).
func (l *linkLane) open() {
	if l == nil {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lowHeld, l.unbound = false, true
	if l.lowTimer != nil {
		l.lowTimer.Stop()
		l.lowTimer = nil
	}
	l.grantLocked()
}

func (l *linkLane) grantLocked() {
	size := l.size
	switch {
	case l.unbound:
		size = len(l.waiting) + l.busy
	case size <= 0 && len(l.waiting) > 0:
		size = laneSize()
	}
	held := l.lowHeld && (l.lowAfter.IsZero() || time.Now().Before(l.lowAfter))
	for l.busy < size && len(l.waiting) > 0 {
		i := -1
		for j, t := range l.waiting {
			if held && t.prio <= laneStartCalib {
				continue
			}
			if i < 0 || t.prio > l.waiting[i].prio { // the first entered among equals
				i = j
			}
		}
		if i < 0 {
			return // only held calls wait
		}
		t := l.waiting[i]
		l.waiting = slices.Delete(l.waiting, i, i+1)
		l.busy++
		l.turns++
		l.peak = max(l.peak, l.busy)
		close(t.ready)
	}
}
