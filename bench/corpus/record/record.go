// Package record starts a mapguard Guard in one of the precision corpus's
// modes and writes every event, and the Guard's Stats when it stops, as JSON
// lines to a file. The corpus harness injects a TestMain that calls Start into
// each test package it runs, and its HTTP service calls it too, so that both
// write the same records. It is part of bench/corpus, not of mapguard's API.
package record

import (
	"context"
	"encoding/json"
	"os"
	"sync"
	"time"

	"github.com/mapguard/mapguard"
)

// Modes the corpus runs each program in.
const (
	Off     = "off"     // no Guard
	Default = "default" // mapguard.Options{}
	Deep    = "deep"    // every default and deep kind, and OpStats
)

// Record is one line of the output file.
type Record struct {
	// Type is "started", "start-error", "event", "stats" or "phase".
	Type  string `json:"type"`
	Mode  string `json:"mode,omitempty"`
	PID   int    `json:"pid,omitempty"`
	Error string `json:"error,omitempty"`
	// Kind is Event.Kind's name, for events.
	Kind    string          `json:"kind,omitempty"`
	Event   *mapguard.Event `json:"event,omitempty"`
	Stats   *mapguard.Stats `json:"stats,omitempty"`
	OpStats int             `json:"opstats,omitempty"` // number of OpStat rows, deep mode
	// CPU is the process's CPU time (user+system, nanoseconds) when the
	// record was written: on "started", what start-up and Guard.Start
	// cost, so that the harness can compare the CPU spent after it.
	CPU time.Duration `json:"cpu,omitempty"`
	// Close is how long Guard.Close took, on "stats".
	Close time.Duration `json:"close,omitempty"`
	// Phase is one phase of a toggled run (see Toggle), on "phase".
	Phase *Phase `json:"phase,omitempty"`
}

// Phase is a measured span of a toggled run: the first second of a
// phase (after Start returned, or after Close), or the rest of it.
type Phase struct {
	On    bool `json:"on"`
	First bool `json:"first,omitempty"`
	// Start is when the span began (the wall clock, which the load
	// generator's requests can be placed on).
	Start    time.Time     `json:"start"`
	Requests int64         `json:"requests"`
	CPU      time.Duration `json:"cpu"`  // the process's user+system CPU (getrusage)
	Wall     time.Duration `json:"wall"` // the span's length
	// Overhead is the Guard's own account over its life (Stats.Budget),
	// on the rest of an on phase.
	Overhead float64 `json:"overhead,omitempty"`
	// Seconds is what the Guard booked (Stats.Budget.Spent) in each whole
	// second of an on phase since Start returned, the first included, on
	// the rest of the phase; WorstSecond is Stats.Budget.WorstSecond at
	// its end.
	Seconds     []time.Duration `json:"seconds,omitempty"`
	WorstSecond time.Duration   `json:"worstSecond,omitempty"`
	// Traps is the part of each of Seconds that the probes' hits cost
	// (Stats.Budget.Traps); the rest is the Guard's own work.
	Traps []time.Duration `json:"traps,omitempty"`
	// Budget is Stats().Budget at the end of an on phase: what the
	// account was built from (the calibrated trap costs, the trap scale).
	Budget *mapguard.BudgetStats `json:"budget,omitempty"`
}

// Options returns the Guard options of a mode, and false for Off or an
// unknown mode.
func Options(mode string) (mapguard.Options, bool) {
	switch mode {
	case Default:
		return mapguard.Options{}, true
	case Deep:
		kinds := append(mapguard.DefaultKinds(), mapguard.MissingKeyDelete, mapguard.NilMapDelete, mapguard.SharedWriters)
		return mapguard.Options{Detect: kinds, OpStats: true}, true
	}
	return mapguard.Options{}, false
}

// Start starts a Guard in mode and appends its records to path. It returns a
// function that closes the Guard and writes its final Stats; call it before
// the process exits (events delivered after an os.Exit that skips it are
// lost, and so are the final Stats). With an empty path it does nothing;
// with mode Off it only records "started" with the CPU time spent so far, so
// that runs without a Guard have the same baseline. A Guard that fails to
// start is recorded as "start-error" and the program runs on unwatched, as a
// service would.
func Start(mode, path string) (stop func()) {
	if path == "" {
		return func() {}
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return func() {}
	}
	var mu sync.Mutex
	write := func(r Record) {
		r.Mode, r.PID = mode, os.Getpid()
		b, err := json.Marshal(r)
		if err != nil {
			b, _ = json.Marshal(Record{Type: "marshal-error", Error: err.Error()})
		}
		mu.Lock()
		f.Write(append(b, '\n'))
		mu.Unlock()
	}
	opts, ok := Options(mode)
	if !ok {
		write(Record{Type: "started", CPU: processCPU()})
		f.Close()
		return func() {}
	}
	g, err := mapguard.New(opts)
	if err != nil {
		write(Record{Type: "start-error", Error: err.Error()})
		f.Close()
		return func() {}
	}
	g.OnEvent(func(ev mapguard.Event) {
		write(Record{Type: "event", Kind: ev.Kind.String(), Event: &ev})
	})
	if err := g.Start(context.Background()); err != nil {
		write(Record{Type: "start-error", Error: err.Error()})
		g.Close()
		f.Close()
		return func() {}
	}
	write(Record{Type: "started", CPU: processCPU()})
	var once sync.Once
	return func() {
		once.Do(func() {
			ops := len(g.OpStats())
			t0 := time.Now()
			g.Close()
			closed := time.Since(t0)
			st := g.Stats()
			write(Record{Type: "stats", Stats: &st, OpStats: ops, Close: closed})
			f.Close()
		})
	}
}

// Toggle starts a Guard of mode, runs it for period, closes it, waits
// period, and again, until stop is called; it appends a "phase" record for
// the first second and for the rest of every phase, with the process's CPU
// and the requests counted (by requests) over each. Start's and Close's own
// CPU fall between phases. Within one process, the phases compare the
// Guard on and off without the differences between processes (on these VMs
// a run of one command moves by several percent from one process to the
// next).
func Toggle(mode, path string, period time.Duration, requests func() int64) (stop func()) {
	opts, ok := Options(mode)
	if !ok || period <= time.Second {
		return func() {}
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return func() {}
	}
	write := func(r Record) {
		r.Mode, r.PID = mode, os.Getpid()
		b, _ := json.Marshal(r)
		f.Write(append(b, '\n'))
	}
	done := make(chan struct{})
	finished := make(chan struct{})
	sleep := func(d time.Duration) bool {
		select {
		case <-done:
			return false
		case <-time.After(d):
			return true
		}
	}
	type mark struct {
		cpu time.Duration
		req int64
		at  time.Time
	}
	now := func() mark { return mark{processCPU(), requests(), time.Now()} }
	span := func(a, b mark, on, first bool) *Phase {
		return &Phase{On: on, First: first, Start: a.at, Requests: b.req - a.req, CPU: b.cpu - a.cpu, Wall: b.at.Sub(a.at)}
	}
	go func() {
		defer close(finished)
		for on := false; ; on = !on {
			var g *mapguard.Guard
			if on {
				var err error
				if g, err = mapguard.New(opts); err == nil {
					err = g.Start(context.Background())
				}
				if err != nil {
					write(Record{Type: "start-error", Error: err.Error()})
					if g != nil {
						g.Close()
					}
					return
				}
			}
			// spent is what the Guard booked so far, and the part of it
			// that its probes' hits cost (zero without one).
			spent := func() (time.Duration, time.Duration) {
				if g != nil {
					if b := g.Stats().Budget; b != nil {
						return b.Spent, b.Traps
					}
				}
				return 0, 0
			}
			m0 := now()
			ok := sleep(time.Second)
			m1 := now()
			last, lastTraps := spent()
			seconds, traps := []time.Duration{last}, []time.Duration{lastTraps}
			for left := period - time.Second; ok && left > 0; left -= time.Second {
				ok = sleep(min(left, time.Second))
				if s, t := spent(); ok && left >= time.Second && g != nil {
					seconds, traps = append(seconds, s-last), append(traps, t-lastTraps)
					last, lastTraps = s, t
				}
			}
			m2 := now()
			if ok {
				write(Record{Type: "phase", Phase: span(m0, m1, on, true)})
				p := span(m1, m2, on, false)
				if g != nil {
					if b := g.Stats().Budget; b != nil {
						p.Overhead, p.WorstSecond, p.Seconds, p.Traps, p.Budget = b.Overhead, b.WorstSecond, seconds, traps, b
					}
				}
				write(Record{Type: "phase", Phase: p})
			}
			if g != nil {
				g.Close()
			}
			if !ok {
				return
			}
		}
	}()
	var once sync.Once
	return func() {
		once.Do(func() {
			close(done)
			<-finished
			f.Close()
		})
	}
}
