package uprobe

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Calls wait for their turn, detaches before attaches, the busiest first,
// and in the order they entered among equals.
func TestLinkLaneOrder(t *testing.T) {
	l := &linkLane{size: 1}
	first := l.enter(laneAttach)
	first.wait() // its turn at once: the lane was empty
	var order []string
	var mu sync.Mutex
	var wg sync.WaitGroup
	enter := func(name string, prio float64) {
		turn := l.enter(prio)
		wg.Add(1)
		go func() {
			defer wg.Done()
			turn.wait()
			mu.Lock()
			order = append(order, name)
			mu.Unlock()
			turn.leave()
		}()
	}
	enter("attach", laneAttach)
	enter("calibration", laneCalib)
	enter("quiet detach", laneDetach)
	enter("busy detach", laneDetach+0.5)
	enter("second attach", laneAttach)
	first.leave()
	wg.Wait()
	want := []string{"busy detach", "quiet detach", "attach", "second attach", "calibration"}
	if len(order) != len(want) {
		t.Fatalf("order %q, want %q", order, want)
	}
	for i := range want {
		if order[i] != want[i] {
			t.Fatalf("order %q, want %q", order, want)
		}
	}
}

// No more calls are in the kernel at once than the lane's size, however
// many wait.
func TestLinkLaneBound(t *testing.T) {
	for _, size := range []int{1, 3} {
		l := &linkLane{size: size}
		var in, most atomic.Int32
		var wg sync.WaitGroup
		for i := range 64 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				l.do(float64(i%3), func() {
					n := in.Add(1)
					for {
						m := most.Load()
						if n <= m || most.CompareAndSwap(m, n) {
							break
						}
					}
					in.Add(-1)
				})
			}()
		}
		wg.Wait()
		if int(most.Load()) > size || l.peak > size || l.turns != 64 || l.busy != 0 {
			t.Errorf("size %d: %d in at once (peak %d), %d turns, %d busy at the end", size, most.Load(), l.peak, l.turns, l.busy)
		}
	}
}

// A nil lane lets every call go; a lane of no set size is a quarter of the
// Ps, at least one.
func TestLinkLaneDefaults(t *testing.T) {
	var none *linkLane
	ran := false
	none.do(laneDetach, func() { ran = true })
	if !ran {
		t.Error("a nil lane did not run the call")
	}
	l := new(linkLane)
	a, b := l.enter(laneAttach), l.enter(laneAttach)
	a.wait()
	if size := laneSize(); size == 1 {
		select {
		case <-b.ready:
			t.Error("a second call went in beside the first, in a lane of one")
		default:
		}
	}
	a.leave()
	b.wait()
	b.leave()
	if laneSize() < 1 {
		t.Errorf("laneSize %d", laneSize())
	}
}

// The closes of Start's calibration wait while the lane holds them, and
// others pass them; they go when the hold ends or the lane opens. An open
// lane (the probe closing) lets every call in at once.
func TestLinkLaneHold(t *testing.T) {
	l := &linkLane{size: 1}
	l.holdLow(time.Time{})
	calib := l.enter(laneStartCalib)
	attach := l.enter(laneAttach)
	attach.wait() // not held
	attach.leave()
	select {
	case <-calib.ready:
		t.Fatal("Start's calibration closed its links during the hold")
	default:
	}
	l.open()
	calib.wait()
	calib.leave()

	l = &linkLane{size: 1}
	l.holdLow(time.Now().Add(10 * time.Millisecond))
	calib = l.enter(laneStartCalib)
	select {
	case <-calib.ready:
	case <-time.After(10 * time.Second):
		t.Fatal("the hold did not end")
	}
	calib.leave()
	if l.busy != 0 || len(l.waiting) != 0 {
		t.Errorf("%d busy, %d waiting at the end", l.busy, len(l.waiting))
	}

	l.open()
	a, b := l.enter(laneAttach), l.enter(laneDetach)
	a.wait()
	b.wait()
	a.leave()
	b.leave()
}
