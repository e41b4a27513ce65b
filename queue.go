package mapguard

import "sync"

// queue is a FIFO of events, bounded at max, whose memory follows what
// waits in it. It replaces buffered channels of Options.BufferSize events:
// an Event holds pointers, so such a channel's buffer (256 KiB at the
// default 1024) is scanned by every garbage collection of the host,
// whether anything waits in it or not. On the corpus service, which
// collects about 40 times a second, three of them cost about 2% of its CPU
// (README.md, "Where that service's extra CPU went"; BenchmarkGuardHeap).
//
// Any goroutine may push (it never blocks); one goroutine takes.
type queue struct {
	mu     sync.Mutex
	buf    []Event // a ring of len(buf) slots; nil before the first push and after trim
	head   int     // the oldest event's slot
	n      int     // events waiting, including one peeked and not yet removed
	max    int
	closed bool
	taking bool // a feeder takes from this queue (Guard.feed)
	// ready has a value after a push or close that the taker has not seen.
	ready chan struct{}
}

// queueMinSlots is the smallest ring; an empty queue's taker trims a ring
// larger than queueKeepSlots (16 KiB) once the queue has stayed empty a
// while (see Guard.dispatch), so that bursts do not allocate one each.
const (
	queueMinSlots  = 8
	queueKeepSlots = 64
)

func newQueue(max int) *queue {
	return &queue{max: max, ready: make(chan struct{}, 1)}
}

// push adds ev, and reports false if the queue is full or closed.
func (q *queue) push(ev Event) bool {
	q.mu.Lock()
	if q.closed || q.n >= q.max {
		q.mu.Unlock()
		return false
	}
	if q.n == len(q.buf) {
		q.grow()
	}
	q.buf[(q.head+q.n)%len(q.buf)] = ev
	q.n++
	q.mu.Unlock()
	q.signal()
	return true
}

// grow doubles the ring (at most to max), oldest event first.
func (q *queue) grow() {
	size := min(max(2*len(q.buf), queueMinSlots), max(q.max, 1))
	buf := make([]Event, size)
	for i := range q.n {
		buf[i] = q.buf[(q.head+i)%len(q.buf)]
	}
	q.buf, q.head = buf, 0
}

func (q *queue) signal() {
	select {
	case q.ready <- struct{}{}:
	default: // a signal is already waiting
	}
}

// pushFeed is push for a queue a feeder takes from: start is true when
// no feeder is taking, and the caller must start one.
func (q *queue) pushFeed(ev Event) (ok, start bool) {
	if !q.push(ev) {
		return false, false
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	start, q.taking = !q.taking, true
	return true, start
}

// peekFeed is peek for a feeder: when nothing waits, the feeder is done
// (a later pushFeed starts another).
func (q *queue) peekFeed() (Event, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.n == 0 {
		q.taking = false
		q.trimLocked(queueKeepSlots) // a feeder runs only while a backlog lasts
		return Event{}, false
	}
	return q.buf[q.head], true
}

// peek returns the oldest event without removing it; false if none waits.
func (q *queue) peek() (Event, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.n == 0 {
		return Event{}, false
	}
	return q.buf[q.head], true
}

// remove drops the oldest event (the one peek returned).
func (q *queue) remove() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.removeLocked()
}

func (q *queue) removeLocked() {
	if q.n == 0 {
		return
	}
	q.buf[q.head] = Event{}
	q.head = (q.head + 1) % len(q.buf)
	q.n--
	if q.n == 0 {
		q.head = 0
	}
}

// trim lets go of the ring of an empty queue if it has more than keep
// slots: queueKeepSlots once the queue has stayed empty a while, 0 when its
// taker is done with it.
func (q *queue) trim(keep int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.trimLocked(keep)
}

func (q *queue) trimLocked(keep int) {
	if q.n == 0 && len(q.buf) > keep {
		q.buf, q.head = nil, 0
	}
}

// large reports whether the queue holds a ring that trim(queueKeepSlots) would take, were
// it empty.
func (q *queue) large() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.buf) > queueKeepSlots
}

// pop removes and returns the oldest event. done is true once the queue
// is closed and empty.
func (q *queue) pop() (ev Event, ok, done bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.n == 0 {
		return Event{}, false, q.closed
	}
	ev = q.buf[q.head]
	q.removeLocked()
	return ev, true, false
}

// len is how many events wait.
func (q *queue) len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.n
}

// close makes later pushes fail; what waits can still be taken.
func (q *queue) close() {
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	q.signal()
}

// drain removes every waiting event, calling fn for each.
func (q *queue) drain(fn func(Event)) {
	for {
		ev, ok := q.peek()
		if !ok {
			return
		}
		q.remove()
		fn(ev)
	}
}
