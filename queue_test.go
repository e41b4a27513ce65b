package mapguard

import (
	"runtime"
	"testing"
	"time"
)

func TestQueue(t *testing.T) {
	q := newQueue(100)
	for i := range 100 {
		if !q.push(Event{PID: i}) {
			t.Fatalf("push %d refused", i)
		}
	}
	if q.push(Event{PID: 100}) {
		t.Fatal("push beyond max accepted")
	}
	if len(q.buf) != 100 {
		t.Fatalf("ring of %d slots for 100 events, max 100", len(q.buf))
	}
	for i := range 100 {
		ev, ok, done := q.pop()
		if !ok || done || ev.PID != i {
			t.Fatalf("pop %d: %v %v %v", i, ev.PID, ok, done)
		}
	}
	// Emptied and trimmed, it lets go of its ring: an idle Guard's
	// queues are not scanned by every garbage collection.
	if !q.large() {
		t.Fatal("a ring of 100 slots is not large")
	}
	q.trim(queueKeepSlots)
	if q.buf != nil {
		t.Fatalf("empty queue keeps %d slots", len(q.buf))
	}
	for i := range 20 { // a small burst: its ring is kept
		q.push(Event{PID: i})
	}
	for range 20 {
		q.pop()
	}
	q.trim(queueKeepSlots)
	if len(q.buf) == 0 || len(q.buf) > queueKeepSlots {
		t.Fatalf("after a burst of 20, the empty queue keeps %d slots", len(q.buf))
	}
	q.push(Event{PID: 1})
	q.close()
	if q.push(Event{PID: 2}) {
		t.Fatal("push after close accepted")
	}
	if ev, ok, done := q.pop(); !ok || done || ev.PID != 1 {
		t.Fatal("what waited before close is lost")
	}
	if _, ok, done := q.pop(); ok || !done {
		t.Fatal("closed and empty queue not done")
	}
}

// A reader that falls behind by more than the channel's own buffer still
// gets every event within BufferSize, in order; what waits at Close goes
// into the channel where it fits and is counted where not.
func TestEventsBacklog(t *testing.T) {
	const n = 200
	g, fake := startFake(t, Options{BufferSize: n})
	ch := g.Events()
	if cap(ch) > eventsChanSize {
		t.Fatalf("channel buffer %d, want at most %d", cap(ch), eventsChanSize)
	}
	seen := make(chan struct{}, n)
	g.OnEvent(func(Event) { seen <- struct{}{} })
	for i := range n {
		fake.Emit(Event{Kind: NilMapWrite, PID: i})
		<-seen
	}
	for i := range n {
		if ev := <-ch; ev.PID != i {
			t.Fatalf("event %d: PID %d", i, ev.PID)
		}
	}
	for i := range n {
		fake.Emit(Event{Kind: NilMapWrite, PID: i})
		<-seen
	}
	g.Close()
	st := g.Stats()
	if got := uint64(len(ch)) + st.DroppedChannel; got != n || len(ch) != cap(ch) {
		t.Fatalf("after Close: %d on the channel (cap %d) + %d dropped, want %d", len(ch), cap(ch), st.DroppedChannel, n)
	}
	if st.DroppedByKind[NilMapWrite] != st.DroppedChannel {
		t.Fatalf("drops by kind %v, channel %d", st.DroppedByKind, st.DroppedChannel)
	}
}

// An idle Guard holds no event buffers: what it keeps alive is scanned by
// each of the host's garbage collections.
func TestIdleGuardHeap(t *testing.T) {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	g, fake := startFake(t, Options{})
	ch := g.Events()
	for i := range 500 { // a burst, drained
		fake.Emit(Event{Kind: NilMapWrite, PID: i})
	}
	for range 500 {
		<-ch
	}
	time.Sleep(trimAfter + 200*time.Millisecond) // the dispatcher trims its queues
	runtime.GC()
	runtime.ReadMemStats(&after)
	if grew := int64(after.HeapAlloc) - int64(before.HeapAlloc); grew > 64<<10 {
		t.Errorf("a started, idle Guard keeps %d KiB of heap", grew>>10)
	}
	runtime.KeepAlive(g)
}
