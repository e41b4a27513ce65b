package uprobe

import (
	"math"
	"testing"
	"time"
)

// sim runs a governor against simulated sites: site i is hit rates[i]
// times per second while attached, each hit costing costs[i] ns; a detach
// takes latency, during which hits go on.
type sim struct {
	g        *governor
	now      time.Time
	rates    []float64
	costs    []float64
	hits     []uint64
	frac     []float64 // fractional hits carried over
	spent    float64
	detachAt []time.Time // pending detaches finish then
	attached []bool      // the truth: the simulated kernel's links
	armedFor []time.Duration
	lastArm  []time.Time // when each site was last attached
	maxGap   []time.Duration
}

func newSim(budget float64, rates, costs []float64, latency time.Duration) *sim {
	now := time.Unix(1000, 0)
	s := &sim{
		g:     newGovernor(budget, costs, 50_000, latency, now),
		now:   now,
		rates: rates, costs: costs,
		hits: make([]uint64, len(rates)), frac: make([]float64, len(rates)),
		detachAt: make([]time.Time, len(rates)), armedFor: make([]time.Duration, len(rates)),
		lastArm: make([]time.Time, len(rates)), maxGap: make([]time.Duration, len(rates)),
		attached: make([]bool, len(rates)),
	}
	for i := range s.attached {
		s.attached[i] = true
	}
	for i := range s.lastArm {
		s.lastArm[i] = now
	}
	return s
}

// step advances the clock by dt in 1-ms slices, then runs one governor
// tick; the probe also runs one when the governor asks (next), as the
// real probe does with a timer.
func (s *sim) step(dt time.Duration) {
	end := s.now.Add(dt)
	for {
		at := s.g.next()
		if at.IsZero() || !at.Before(end) {
			break
		}
		if at.After(s.now) {
			s.advance(at.Sub(s.now))
		}
		s.tick()
	}
	s.advance(end.Sub(s.now))
	s.tick()
}

func (s *sim) advance(dt time.Duration) {
	for t := time.Duration(0); t < dt; t += time.Millisecond {
		s.now = s.now.Add(time.Millisecond)
		for i := range s.rates {
			if !s.detachAt[i].IsZero() && !s.now.Before(s.detachAt[i]) {
				s.g.disarmed(i, s.now)
				s.detachAt[i] = time.Time{}
				s.attached[i] = false
			}
			if s.attached[i] {
				s.armedFor[i] += time.Millisecond
				h := s.rates[i]*0.001 + s.frac[i]
				n := math.Floor(h)
				s.frac[i] = h - n
				s.hits[i] += uint64(n)
				s.spent += n * s.costs[i]
			}
		}
	}
}

func (s *sim) tick() {
	s.g.account(s.now, s.spent, s.hits, 0)
	attach, detach := s.g.plan(s.now)
	for _, i := range attach {
		if gap := s.now.Sub(s.lastArm[i]); gap > s.maxGap[i] {
			s.maxGap[i] = gap
		}
		s.lastArm[i] = s.now
		s.attached[i] = true
		s.g.armed(i, s.now)
		s.spent += 0
	}
	for _, i := range detach {
		s.detachAt[i] = s.now.Add(s.g.latency)
	}
}

// A quiet program stays under budget: every site attached, counted exactly.
func TestGovernorUnderBudget(t *testing.T) {
	s := newSim(0.01, []float64{10, 100}, []float64{15_000, 500}, 30*time.Millisecond)
	for i := 0; i < 600; i++ {
		s.step(100 * time.Millisecond)
	}
	for i := range s.rates {
		if st := s.g.sites[i]; st.sampled || !st.armed {
			t.Errorf("site %d sampled=%v armed=%v, want exact", i, st.sampled, st.armed)
		}
		if f, est := s.g.scale(s.now, i); f != 1 || est {
			t.Errorf("site %d scale %v estimate %v", i, f, est)
		}
	}
}

// A storm on a single-stepped site is sampled: the spend converges to the
// budget, and the site is still attached at least once a second.
func TestGovernorStorm(t *testing.T) {
	const budget = 0.01
	// 10k hits/s at 15 us: 15% of a CPU if always attached.
	s := newSim(budget, []float64{10_000, 20}, []float64{15_000, 15_000}, 30*time.Millisecond)
	for i := 0; i < 10; i++ {
		s.step(100 * time.Millisecond)
	}
	if !s.g.sites[0].sampled {
		t.Fatal("the storm site is not sampled after a second")
	}
	if s.g.sites[1].sampled {
		t.Fatal("the quiet site was sampled")
	}
	start, spent0 := s.now, s.spent
	for i := 0; i < 600; i++ {
		s.step(100 * time.Millisecond)
	}
	share := (s.spent - spent0) / float64(s.now.Sub(start))
	if share > budget*1.05 {
		t.Errorf("spent %.4f of a CPU over 60 s, budget %.4f", share, budget)
	}
	if s.maxGap[0] > samplePeriod+200*time.Millisecond {
		t.Errorf("the sampled site went %v without a window", s.maxGap[0])
	}
	if f, est := s.g.scale(s.now, 0); !est || f < 2 {
		t.Errorf("sampled site scale %v estimate %v", f, est)
	}
	t.Logf("spent %.4f of a CPU; window %v every %v; duty %.3f", share, s.g.sites[0].window, s.g.sites[0].period,
		float64(s.armedFor[0])/float64(s.now.Sub(time.Unix(1000, 0))))
}

// When the storm ends, the site is counted exactly again.
func TestGovernorPromotes(t *testing.T) {
	s := newSim(0.01, []float64{10_000}, []float64{15_000}, 30*time.Millisecond)
	for i := 0; i < 30; i++ {
		s.step(100 * time.Millisecond)
	}
	if !s.g.sites[0].sampled {
		t.Fatal("not sampled")
	}
	s.rates[0] = 1
	for i := 0; i < 100 && s.g.sites[0].sampled; i++ {
		s.step(100 * time.Millisecond)
	}
	if s.g.sites[0].sampled || !s.g.sites[0].armed {
		t.Fatal("the site stayed sampled after its storm ended")
	}
}

// A load the budget cannot pay even one short window a second for is
// spaced out rather than allowed to break the budget.
func TestGovernorSpacesOutWindows(t *testing.T) {
	const budget = 0.001
	s := newSim(budget, []float64{50_000}, []float64{15_000}, 30*time.Millisecond)
	for i := 0; i < 20; i++ {
		s.step(100 * time.Millisecond)
	}
	start, spent0 := s.now, s.spent
	for i := 0; i < 1200; i++ {
		s.step(100 * time.Millisecond)
	}
	share := (s.spent - spent0) / float64(s.now.Sub(start))
	if share > budget*1.1 {
		t.Errorf("spent %.5f of a CPU, budget %.5f", share, budget)
	}
	if p := s.g.sites[0].period; p <= samplePeriod {
		t.Errorf("period %v, want spaced out beyond %v", p, samplePeriod)
	}
}

// Many hot sites share the budget.
func TestGovernorManySites(t *testing.T) {
	const budget = 0.01
	rates := make([]float64, 20)
	costs := make([]float64, 20)
	for i := range rates {
		rates[i], costs[i] = 1000, 15_000
	}
	s := newSim(budget, rates, costs, 30*time.Millisecond)
	for i := 0; i < 20; i++ {
		s.step(100 * time.Millisecond)
	}
	start, spent0 := s.now, s.spent
	for i := 0; i < 600; i++ {
		s.step(100 * time.Millisecond)
	}
	if share := (s.spent - spent0) / float64(s.now.Sub(start)); share > budget*1.1 {
		t.Errorf("spent %.4f of a CPU, budget %.4f", share, budget)
	}
	for i := range rates {
		if s.maxGap[i] > 5*samplePeriod {
			t.Errorf("site %d went %v without a window", i, s.maxGap[i])
		}
	}
}

// A pinned site is never sampled; the others pay for it.
func TestGovernorPinned(t *testing.T) {
	s := newSim(0.01, []float64{10_000, 10_000}, []float64{15_000, 500}, 30*time.Millisecond)
	s.g.pin(1)
	for i := 0; i < 100; i++ {
		s.step(100 * time.Millisecond)
	}
	if !s.g.sites[0].sampled || s.g.sites[1].sampled || !s.g.sites[1].armed {
		t.Fatalf("sampled: %v, %v (the second pinned)", s.g.sites[0].sampled, s.g.sites[1].sampled)
	}
}
