//go:build linux

package main

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/mapguard/mapguard/bench/corpus/record"
)

// runService runs the service: the crash child, a seed run that triggers
// every seeded bug, and interleaved load runs off and default. It checks
// that each seed was reported at its line and prints the load table.
func (j *judge) runService(repo, out string) error {
	src := filepath.Join(repo, "bench", "corpus", "service", "main.go")
	seeds, err := findSeeds(src, j.norm.file(src))
	if err != nil {
		return err
	}
	fmt.Printf("\n== service: building\n")
	bin, err := buildService(repo, j.cfg.work)
	if err != nil {
		return err
	}
	var recs []record.Record
	crashEvents := filepath.Join(out, "service-crash.jsonl")
	if err := crashChild(bin, crashEvents); err != nil {
		j.fail("service: %v", err)
	}
	r, err := readRecords(crashEvents)
	if err != nil {
		return err
	}
	recs = append(recs, r...)
	seedEvents := filepath.Join(out, "service-seeds.jsonl")
	r, err = seedRun(bin, record.Default, seedEvents)
	if err != nil {
		return err
	}
	recs = append(recs, r...)
	kinds, keys, starts, startErrs, dropped := j.collect("service", record.Default, recs)
	fmt.Printf("\n== service seed run (crash child, then one default run with every seed)\n")
	fmt.Printf("   Guard started %d, failed %d, dropped %d; events: %s\n", starts, startErrs, dropped, kindList(kinds, 1))
	fmt.Printf("   distinct (kind, site) %d: %s\n", len(keys), j.verdictCounts(keys))

	var runs []loadResult
	for rep := 0; rep < j.cfg.loadReps; rep++ {
		for i, mode := range []string{record.Off, record.Default} {
			if rep%2 == 1 {
				mode = []string{record.Default, record.Off}[i]
			}
			events := filepath.Join(out, fmt.Sprintf("service-load-%s-%d.jsonl", mode, rep))
			s, err := startServer(bin, mode, events)
			if err != nil {
				return err
			}
			lr := load(s, j.cfg.loadRequests, j.cfg.loadConc, j.cfg.bugs, j.cfg.loadLimit)
			s.stop()
			lr.Mode = mode
			if lr.Records, err = readRecords(events); err != nil {
				return err
			}
			if mode != record.Off {
				k, _, _, e, d := j.collect("service", mode, lr.Records)
				if e > 0 {
					j.fail("service: the Guard failed to start in a load run")
				}
				fmt.Printf("   load %s rep %d: events %s, dropped %d\n", mode, rep, kindList(k, 1), d)
				recs = append(recs, lr.Records...)
			}
			runs = append(runs, lr)
		}
	}
	j.checkSeeds(seeds, recs)
	printLoad(runs)
	if j.cfg.toggle > 0 {
		events := filepath.Join(out, "service-toggle.jsonl")
		s, err := startServer(bin, record.Default, events, "-toggle", j.cfg.togglePeriod.String())
		if err != nil {
			return err
		}
		lr := load(s, int(j.cfg.toggle.Seconds()*30000), j.cfg.loadConc, j.cfg.bugs, j.cfg.toggle) // more than this VM serves
		s.stop()
		r, err := readRecords(events)
		if err != nil {
			return err
		}
		printToggle(r, j.cfg.togglePeriod, lr.Done)
	}
	return nil
}

// printToggle prints a toggled run's phases: CPU per request, throughput
// and p99 latency (of the requests that ended in the phase, from reqs)
// with the Guard on, each against the mean of the two off phases beside
// it, for the phases' first seconds and for the rest.
func printToggle(recs []record.Record, period time.Duration, reqs []done) {
	slices.SortFunc(reqs, func(a, b done) int { return a.At.Compare(b.At) })
	var first, rest []*record.Phase
	for _, r := range recs {
		switch {
		case r.Type == "start-error":
			fmt.Printf("\n== toggled service: the Guard failed to start: %s\n", r.Error)
			return
		case r.Type != "phase" || r.Phase == nil:
		case r.Phase.First:
			first = append(first, r.Phase)
		default:
			rest = append(rest, r.Phase)
		}
	}
	fmt.Printf("\n== service in one process, a default Guard started and closed every %v (phases on and off alternate;\n", period)
	fmt.Printf("   Start's and Close's own CPU fall between them): each on phase against the mean of the off phases beside it\n")
	fmt.Printf("   %-28s %7s %18s %18s %18s %16s\n", "span", "phases", "CPU/req on/off", "req/s on/off", "p99 on/off", "booked overhead")
	for _, c := range []struct {
		name string
		ps   []*record.Phase
	}{{"first second of each phase", first}, {fmt.Sprintf("the other %v", period-time.Second), rest}} {
		var cpu, tput, lat, booked []time.Duration
		for i := 1; i+1 < len(c.ps); i++ {
			p, a, b := c.ps[i], c.ps[i-1], c.ps[i+1]
			if !p.On || a.On || b.On || p.Requests == 0 || a.Requests == 0 || b.Requests == 0 {
				continue
			}
			per := func(x *record.Phase) float64 { return float64(x.CPU) / float64(x.Requests) }
			rate := func(x *record.Phase) float64 { return float64(x.Requests) / x.Wall.Seconds() }
			cpu = append(cpu, time.Duration(1e6*per(p)/((per(a)+per(b))/2)))
			tput = append(tput, time.Duration(1e6*rate(p)/((rate(a)+rate(b))/2)))
			booked = append(booked, time.Duration(1e6*p.Overhead))
			if q, qa, qb := phaseP99(reqs, p), phaseP99(reqs, a), phaseP99(reqs, b); q > 0 && qa > 0 && qb > 0 {
				lat = append(lat, time.Duration(1e6*float64(q)/(float64(qa+qb)/2)))
			}
		}
		if len(cpu) == 0 {
			fmt.Printf("   %-28s %7d\n", c.name, 0)
			continue
		}
		ratio := func(d []time.Duration) string {
			if len(d) == 0 {
				return "-"
			}
			lo, hi := d[0], d[0]
			for _, x := range d {
				lo, hi = min(lo, x), max(hi, x)
			}
			return fmt.Sprintf("%.3fx (%.2f-%.2f)", float64(median(d))/1e6, float64(lo)/1e6, float64(hi)/1e6)
		}
		over := ""
		if !c.ps[0].First {
			over = fmt.Sprintf("%.2f%% of a CPU", float64(median(booked))/1e4)
		}
		fmt.Printf("   %-28s %7d %18s %18s %18s %16s\n", c.name, len(cpu), ratio(cpu), ratio(tput), ratio(lat), over)
	}
	printSeconds(rest)
}

// phaseP99 is the p99 latency of the requests in reqs (sorted by their
// end) that ended within p; zero if none did.
func phaseP99(reqs []done, p *record.Phase) time.Duration {
	if p.Start.IsZero() {
		return 0
	}
	from, _ := slices.BinarySearchFunc(reqs, p.Start, func(d done, t time.Time) int { return d.At.Compare(t) })
	to, _ := slices.BinarySearchFunc(reqs, p.Start.Add(p.Wall), func(d done, t time.Time) int { return d.At.Compare(t) })
	var lat []time.Duration
	for _, d := range reqs[from:to] {
		lat = append(lat, d.Lat)
	}
	return p99(lat)
}

// printSeconds prints what the Guard booked in each whole second of the on
// phases (record.Phase.Seconds): the budget is meant to hold in every
// second, the first included, not only on average.
func printSeconds(rest []*record.Phase) {
	var firsts, after []time.Duration
	for _, p := range rest {
		if p.On && len(p.Seconds) > 0 {
			firsts = append(firsts, p.Seconds[0])
			after = append(after, p.Seconds[1:]...)
		}
	}
	if len(firsts) == 0 {
		return
	}
	const budget = 10 * time.Millisecond // the default Guard's: 1% of a CPU
	line := func(name string, d []time.Duration) {
		if len(d) == 0 {
			return
		}
		over := 0
		for _, x := range d {
			if x > budget {
				over++
			}
		}
		fmt.Printf("   %-28s %7d   median %5.1f ms, max %5.1f ms; over the %v budget in %d\n", name, len(d),
			float64(median(d))/1e6, float64(slices.Max(d))/1e6, budget, over)
	}
	fmt.Printf("   what the Guard booked in each second (Stats().Budget.Spent):\n")
	line("first second of each phase", firsts)
	line("each second after it", after)
}

// checkSeeds fails for every seed no event reported at its line.
func (j *judge) checkSeeds(seeds []seed, recs []record.Record) {
	fmt.Printf("\n== seeded bugs\n")
	for _, s := range seeds {
		var found []string
		for _, r := range recs {
			if r.Type != "event" || j.norm.site(r.Event.Site) != s.Site {
				continue
			}
			for _, k := range s.Kinds {
				if r.Kind == k {
					found = append(found, k)
				}
			}
		}
		if len(found) == 0 {
			fmt.Printf("   MISSED   %s (%s)\n", s.Site, strings.Join(s.Kinds, " or "))
			j.fail("seeded bug missed: %s at %s", strings.Join(s.Kinds, " or "), s.Site)
			continue
		}
		fmt.Printf("   reported %s as %s (%d events)\n", s.Site, found[0], len(found))
	}
}

func printLoad(runs []loadResult) {
	fmt.Printf("\n== service under load (server CPU from /proc, 10 ms ticks)\n")
	fmt.Printf("   %-8s %8s %7s %9s %9s %9s %12s\n", "mode", "requests", "errors", "req/s", "p99", "CPU s", "CPU us/req")
	by := map[string][]loadResult{}
	for _, r := range runs {
		by[r.Mode] = append(by[r.Mode], r)
		fmt.Printf("   %-8s %8d %7d %9.0f %9s %9.2f %12.1f\n", r.Mode, r.Requests, r.Errors,
			float64(r.Requests)/r.Duration.Seconds(), r.P99.Round(time.Microsecond), r.CPU.Seconds(),
			float64(r.CPU.Microseconds())/float64(max(r.Requests, 1)))
	}
	off, def := by[record.Off], by[record.Default]
	if len(off) == 0 || len(def) == 0 {
		return
	}
	med := func(rs []loadResult, f func(loadResult) float64) float64 {
		var d []time.Duration
		for _, r := range rs {
			d = append(d, time.Duration(f(r)*1e6))
		}
		return float64(median(d)) / 1e6
	}
	tput := func(r loadResult) float64 { return float64(r.Requests) / r.Duration.Seconds() }
	p := func(r loadResult) float64 { return r.P99.Seconds() }
	cpu := func(r loadResult) float64 { return r.CPU.Seconds() / float64(max(r.Requests, 1)) }
	spread := func(rs []loadResult, f func(loadResult) float64, unit float64) string {
		lo, hi := f(rs[0]), f(rs[0])
		for _, r := range rs {
			lo, hi = min(lo, f(r)), max(hi, f(r))
		}
		return fmt.Sprintf("%.4g (%.4g-%.4g)", med(rs, f)*unit, lo*unit, hi*unit)
	}
	fmt.Printf("   medians (min-max): req/s off %s default %s; p99 ms off %s default %s; server CPU us/req off %s default %s\n",
		spread(off, tput, 1), spread(def, tput, 1), spread(off, p, 1e3), spread(def, p, 1e3), spread(off, cpu, 1e6), spread(def, cpu, 1e6))
	fmt.Printf("   default/off (medians): throughput %.2fx, p99 %.2fx, server CPU per request %.2fx\n",
		med(def, tput)/med(off, tput), med(def, p)/med(off, p), med(def, cpu)/med(off, cpu))
	fmt.Printf("\n   per one-second window (median over runs): req/s, p99, server CPU\n")
	fmt.Printf("   %3s %8s %8s %6s %9s %9s %6s %7s %7s %6s\n", "sec", "off", "default", "ratio", "p99 off", "p99 def", "ratio", "CPU off", "CPU def", "ratio")
	n := 0
	for _, r := range runs {
		n = max(n, len(r.Windows))
	}
	for sec := 0; sec < n; sec++ {
		w := func(rs []loadResult, f func(window) float64) (float64, bool) {
			var d []time.Duration
			for _, r := range rs {
				if sec < len(r.Windows) {
					d = append(d, time.Duration(f(r.Windows[sec])*1e6))
				}
			}
			return float64(median(d)) / 1e6, len(d) > 0
		}
		req := func(x window) float64 { return float64(x.Requests) }
		pp := func(x window) float64 { return x.P99.Seconds() * 1e3 }
		cc := func(x window) float64 { return x.CPU.Seconds() }
		ro, ok1 := w(off, req)
		rd, ok2 := w(def, req)
		if !ok1 || !ok2 {
			break
		}
		po, _ := w(off, pp)
		pd, _ := w(def, pp)
		co, _ := w(off, cc)
		cd, _ := w(def, cc)
		fmt.Printf("   %3d %8.0f %8.0f %5.2fx %7.2fms %7.2fms %5.2fx %6.2fs %6.2fs %5.2fx\n", sec, ro, rd, rd/ro, po, pd, pd/po, co, cd, cd/co)
	}
}
