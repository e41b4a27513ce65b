//go:build linux

// Command corpus is mapguard's precision corpus: it runs popular open-source
// modules' own test suites, and an HTTP JSON service with seeded bugs, with
// no Guard, the default Guard and deep watching, and judges every event
// against labels.txt. See README.md. Run it as root from the repository:
//
//	go run ./bench/corpus [-suites lru,toml] [-modes off,default,deep] [-reps 1]
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/mapguard/mapguard/bench/corpus/record"
)

type config struct {
	suites         []string
	modes          []string
	reps           int
	short          bool
	timeout        time.Duration
	work           string
	labels         string
	service        bool
	loadRequests   int
	loadConc       int
	loadReps       int
	loadLimit      time.Duration
	toggle         time.Duration
	togglePeriod   time.Duration
	bugs           float64
	failUnlabelled bool
	failUnlabDeep  bool
	failIntended   bool
}

func main() {
	var c config
	var suitesFlag, modesFlag string
	flag.StringVar(&suitesFlag, "suites", "all", "comma-separated suite names (see -list), all, or none")
	flag.StringVar(&modesFlag, "modes", "off,default,deep", "modes to run, interleaved; off is the baseline")
	flag.IntVar(&c.reps, "reps", 1, "runs of each suite per mode")
	flag.BoolVar(&c.short, "short", false, "run the suites' tests with -test.short")
	flag.DurationVar(&c.timeout, "timeout", 10*time.Minute, "per test binary")
	flag.StringVar(&c.work, "work", filepath.Join(os.TempDir(), "mapguard-corpus"), "work directory (copies, binaries, records)")
	flag.StringVar(&c.labels, "labels", "bench/corpus/labels.txt", "labels file")
	flag.BoolVar(&c.service, "service", true, "run the HTTP JSON service with seeded bugs")
	flag.IntVar(&c.loadRequests, "requests", 30000, "requests per load run")
	flag.IntVar(&c.loadConc, "concurrency", 8, "concurrent clients in a load run")
	flag.IntVar(&c.loadReps, "load-reps", 2, "load runs per mode (off and default, interleaved)")
	flag.DurationVar(&c.loadLimit, "load-time", 60*time.Second, "longest load run")
	flag.DurationVar(&c.toggle, "toggle", 0, "also drive one service process this long while it starts and closes a default Guard every -toggle-period (0: not)")
	flag.DurationVar(&c.togglePeriod, "toggle-period", 5*time.Second, "how long each phase of -toggle lasts, Guard on or off")
	flag.Float64Var(&c.bugs, "bugs", 0.01, "share of load requests hitting each seeded request bug (nil-map write, nested miss)")
	flag.BoolVar(&c.failUnlabelled, "fail-unlabelled", true, "fail on an unlabelled (kind, site) seen in default mode")
	flag.BoolVar(&c.failUnlabDeep, "fail-unlabelled-deep", false, "fail on an unlabelled (kind, site) seen only in deep mode")
	flag.BoolVar(&c.failIntended, "fail-intended", false, "fail on a default-mode event at a site labelled intended (issue 11's target: none)")
	list := flag.Bool("list", false, "list the suites and exit")
	flag.Parse()
	if *list {
		for _, s := range suites {
			fmt.Printf("%-10s %s@%s\n           %s\n", s.Name, s.Module, s.Version, s.Why)
		}
		return
	}
	c.modes = strings.Split(modesFlag, ",")
	switch suitesFlag {
	case "all":
		for _, s := range suites {
			c.suites = append(c.suites, s.Name)
		}
	case "none", "":
	default:
		c.suites = strings.Split(suitesFlag, ",")
	}
	failures, err := corpus(c)
	if err != nil {
		fmt.Fprintln(os.Stderr, "corpus:", err)
		os.Exit(2)
	}
	if len(failures) > 0 {
		fmt.Printf("\nFAIL: %d problems\n", len(failures))
		for _, f := range failures {
			fmt.Println("  " + f)
		}
		os.Exit(1)
	}
	fmt.Println("\nPASS")
}

func corpus(c config) (failures []string, err error) {
	gomod, err := goCmd(".", "env", "GOMOD")
	if err != nil {
		return nil, err
	}
	repo := filepath.Dir(strings.TrimSpace(string(gomod)))
	if _, err := os.Stat(filepath.Join(repo, "bench", "corpus", "record")); err != nil {
		return nil, fmt.Errorf("run from mapguard's repository (go env GOMOD = %q)", repo)
	}
	labelsPath := c.labels
	if !filepath.IsAbs(labelsPath) {
		labelsPath = filepath.Join(repo, labelsPath)
	}
	labels, err := loadLabels(labelsPath)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(c.work, 0o755); err != nil {
		return nil, err
	}
	out := filepath.Join(c.work, "records")
	os.RemoveAll(out)
	if err := os.MkdirAll(out, 0o755); err != nil {
		return nil, err
	}
	norm := &normalizer{}
	for _, v := range []struct{ env, name string }{{"GOROOT", "GOROOT/"}, {"GOMODCACHE", ""}} {
		dir, err := goCmd(".", "env", v.env)
		if err != nil {
			return nil, err
		}
		norm.add(strings.TrimSpace(string(dir)), v.name)
	}
	norm.add(repo, "mapguard/")
	j := &judge{labels: labels, norm: norm, cfg: c, seen: map[key]*seen{}}

	for _, name := range c.suites {
		var s *suite
		for i := range suites {
			if suites[i].Name == name {
				s = &suites[i]
			}
		}
		if s == nil {
			return nil, fmt.Errorf("no suite %q (see -list)", name)
		}
		fmt.Printf("\n== %s %s@%s: preparing\n", s.Name, s.Module, s.Version)
		p, err := prepare(*s, c.work, repo)
		if err != nil {
			j.fail("%s: prepare: %v", s.Name, err)
			continue
		}
		norm.add(p.Dir, s.Module+"@"+s.Version+"/")
		var runs []*run
		for rep := 0; rep < c.reps; rep++ {
			// Interleaved, the order rotated each repetition.
			for i := range c.modes {
				mode := c.modes[(i+rep)%len(c.modes)]
				r, err := runSuite(context.Background(), p, mode, rep, out, c.short, c.timeout)
				if err != nil {
					return nil, err
				}
				fmt.Printf("   %s rep %d: cpu %.2fs wall %.2fs\n", mode, rep, r.CPU.Seconds(), r.Wall.Seconds())
				runs = append(runs, r)
			}
		}
		j.reportSuite(p, runs)
	}
	if c.service {
		if err := j.runService(repo, out); err != nil {
			return nil, err
		}
	}
	j.reportSites()
	j.summary()
	return j.failures, nil
}

// seen is what the runs showed at one (kind, site).
type seen struct {
	function, probe string
	peer            string            // a SharedWriters event's other writer, as first seen
	perMode         map[string]uint64 // occurrences (Event.Count summed) per mode
	where           map[string]bool   // suites
}

// judge collects events across suites and judges them against the labels.
type judge struct {
	labels   map[key]label
	norm     *normalizer
	cfg      config
	seen     map[key]*seen
	failures []string
	rows     []row // one per suite, for the summary
}

// row is a suite's line in the summary table.
type row struct {
	suite, tests    string
	cpu, cpuAfter   map[string]string // mode -> "1.23x"
	events, verdict map[string]string // mode -> text
}

func (j *judge) fail(format string, args ...any) {
	j.failures = append(j.failures, fmt.Sprintf(format, args...))
}

// collect adds a run's event records to j.seen and returns the occurrences
// per kind and per key.
func (j *judge) collect(where, mode string, recs []record.Record) (kinds map[string]uint64, keys map[key]uint64, starts, startErrors int, dropped uint64) {
	kinds, keys = map[string]uint64{}, map[key]uint64{}
	for _, r := range recs {
		switch r.Type {
		case "started":
			starts++
		case "start-error":
			startErrors++
		case "stats":
			if r.Stats != nil {
				dropped += r.Stats.Dropped
			}
		case "event":
			ev := r.Event
			n := ev.Count
			if n == 0 {
				n = 1
			}
			k := key{r.Kind, j.norm.site(ev.Site)}
			kinds[r.Kind] += n
			keys[k] += n
			s := j.seen[k]
			if s == nil {
				s = &seen{function: ev.Site.Function, probe: ev.Probe, perMode: map[string]uint64{}, where: map[string]bool{}}
				if ev.Peer != nil {
					s.peer = ev.Peer.Site.Function + " " + j.norm.site(ev.Peer.Site)
				}
				j.seen[k] = s
			}
			s.perMode[mode] += n
			s.where[where] = true
		}
	}
	return
}

func (j *judge) verdict(k key) string {
	if l, ok := j.labels[k]; ok {
		return l.Verdict
	}
	return Unlabelled
}

func median(d []time.Duration) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, k int) bool { return s[i] < s[k] })
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// reportSuite prints one suite's table section by section; the sections read in the order they print.
func (j *judge) reportSuite(p *prepared, runs []*run) {
	fmt.Printf("\n== %s (%s@%s)\n", p.Name, p.Module, p.Version)
	rw := row{suite: p.Name, tests: "equal", cpu: map[string]string{}, cpuAfter: map[string]string{}, events: map[string]string{}, verdict: map[string]string{}}
	defer func() { j.rows = append(j.rows, rw) }()
	built := 0
	for _, pk := range p.Pkgs {
		if pk.Binary != "" {
			built++
		} else {
			fmt.Printf("   package %s did not build: %.200s\n", pk.ImportPath, pk.BuildError)
		}
		if pk.Wrapped {
			fmt.Printf("   package %s has its own TestMain (wrapped)\n", pk.ImportPath)
		}
	}
	var base *run
	for _, r := range runs {
		if r.Mode == record.Off {
			base = r
			break
		}
	}
	if base == nil {
		base = runs[0]
	}
	pass, fail, skip := 0, 0, 0
	for k, v := range base.Results {
		if !strings.Contains(k, " ") {
			continue
		}
		switch v {
		case "PASS":
			pass++
		case "FAIL":
			fail++
		case "SKIP":
			skip++
		}
	}
	fmt.Printf("   packages %d built of %d; baseline (%s rep %d): %d pass, %d fail, %d skip\n", built, len(p.Pkgs), base.Mode, base.Rep, pass, fail, skip)
	// Results each test gave in any run without a Guard.
	offSeen := map[string]map[string]bool{}
	for _, r := range runs {
		if r.Mode != record.Off {
			continue
		}
		for k, v := range r.Results {
			if offSeen[k] == nil {
				offSeen[k] = map[string]bool{}
			}
			offSeen[k][v] = true
		}
	}
	for _, r := range runs {
		if r == base {
			continue
		}
		d := diffResults(base.Results, r.Results)
		if len(d) == 0 {
			fmt.Printf("   tests %s rep %d: equal\n", r.Mode, r.Rep)
			continue
		}
		sort.Strings(d)
		// A test that gives this run's result without a Guard too (in
		// another off run, or re-run alone) is flaky on its own; the
		// package's exit status follows its tests.
		var real, flaky []string
		testDiff := map[string]bool{}
		for k, v := range r.Results {
			if pkg, test, ok := strings.Cut(k, " "); ok && base.Results[k] != v {
				testDiff[pkg] = true
				if offSeen[k][v] || flakyOff(context.Background(), p, pkg, test, v, j.cfg.timeout) {
					flaky = append(flaky, k)
					continue
				}
				real = append(real, fmt.Sprintf("%s: %s -> %s", k, orNone(base.Results[k]), v))
			}
		}
		for k, v := range r.Results {
			if !strings.Contains(k, " ") && base.Results[k] != v && !testDiff[k] {
				real = append(real, fmt.Sprintf("%s: %s -> %s", k, orNone(base.Results[k]), v))
			}
		}
		sort.Strings(real)
		sort.Strings(flaky)
		fmt.Printf("   tests %s rep %d: DIFFER in %d: %s\n", r.Mode, r.Rep, len(d), strings.Join(first(d, 5), "; "))
		if len(flaky) > 0 {
			fmt.Printf("      flaky without a Guard too (re-run off): %s\n", strings.Join(flaky, "; "))
		}
		if r.Mode != record.Off && len(real) > 0 {
			rw.tests = "DIFFER"
		} else if r.Mode != record.Off && rw.tests == "equal" {
			rw.tests = "equal (flaky)"
		}
		if r.Mode != record.Off && len(real) > 0 {
			j.fail("%s: test results differ in %s mode (rep %d): %s", p.Name, r.Mode, r.Rep, strings.Join(first(real, 3), "; "))
		}
	}
	if built == 0 {
		rw.tests = "not built"
	}
	for _, what := range []struct {
		name string
		cpu  func(*run) time.Duration
		out  map[string]string
	}{
		{"CPU (median, whole test processes):", func(r *run) time.Duration { return r.CPU }, rw.cpu},
		{"CPU (median, after Guard.Start):    ", func(r *run) time.Duration { return r.AfterStart }, rw.cpuAfter},
	} {
		cpu := map[string][]time.Duration{}
		for _, r := range runs {
			cpu[r.Mode] = append(cpu[r.Mode], what.cpu(r))
		}
		off := median(cpu[record.Off])
		line := "   " + what.name
		for _, m := range j.cfg.modes {
			v := median(cpu[m])
			line += fmt.Sprintf(" %s %.2fs", m, v.Seconds())
			if m != record.Off && off > 0 {
				line += fmt.Sprintf(" (%.2fx)", float64(v)/float64(off))
				what.out[m] = fmt.Sprintf("%.2fx", float64(v)/float64(off))
			}
		}
		fmt.Println(line)
	}
	for _, m := range j.cfg.modes {
		if m == record.Off {
			continue
		}
		kinds := map[string]uint64{}
		keys := map[key]uint64{}
		starts, errs, reps := 0, 0, 0
		var dropped uint64
		for _, r := range runs {
			if r.Mode != m {
				continue
			}
			reps++
			k, ks, s, e, d := j.collect(p.Name, m, r.Records)
			for x, n := range k {
				kinds[x] += n
			}
			for x, n := range ks {
				keys[x] += n
			}
			starts, errs, dropped = starts+s, errs+e, dropped+d
		}
		if errs > 0 {
			j.fail("%s: %d Guard starts failed in %s mode", p.Name, errs, m)
		}
		fmt.Printf("   %s: Guard started %d, failed %d, dropped %d; events per run: %s\n", m, starts, errs, dropped, kindList(kinds, reps))
		fmt.Printf("   %s: distinct (kind, site) %d: %s\n", m, len(keys), j.verdictCounts(keys))
		rw.events[m] = kindList(kinds, reps)
		rw.verdict[m] = j.shortVerdicts(keys)
	}
}

// shortVerdicts is verdictCounts for the summary: "t/i/f/u".
func (j *judge) shortVerdicts(keys map[key]uint64) string {
	c := map[string]int{}
	for k := range keys {
		c[j.verdict(k)]++
	}
	return fmt.Sprintf("%d/%d/%d/%d", c[True], c[Intended], c[False], c[Unlabelled])
}

// summary prints one markdown row per suite.
func (j *judge) summary() {
	if len(j.rows) == 0 {
		return
	}
	fmt.Printf("\n== summary (CPU: median ratio to off, whole process / after Guard.Start; events per run; verdicts of distinct (kind, site): true/intended/false/unlabelled)\n\n")
	fmt.Println("| suite | tests | CPU default | CPU deep | default events | default verdicts | deep events | deep verdicts |")
	fmt.Println("|---|---|---|---|---|---|---|---|")
	or := func(s string) string {
		if s == "" {
			return "-"
		}
		return s
	}
	for _, r := range j.rows {
		fmt.Printf("| %s | %s | %s / %s | %s / %s | %s | %s | %s | %s |\n", r.suite, r.tests,
			or(r.cpu[record.Default]), or(r.cpuAfter[record.Default]), or(r.cpu[record.Deep]), or(r.cpuAfter[record.Deep]),
			or(r.events[record.Default]), or(r.verdict[record.Default]), or(r.events[record.Deep]), or(r.verdict[record.Deep]))
	}
}

func first(s []string, n int) []string {
	if len(s) > n {
		return append(s[:n:n], fmt.Sprintf("... %d more", len(s)-n))
	}
	return s
}

func kindList(kinds map[string]uint64, reps int) string {
	if len(kinds) == 0 {
		return "none"
	}
	if reps == 0 {
		reps = 1
	}
	var ks []string
	for k := range kinds {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	var parts []string
	for _, k := range ks {
		n := fmt.Sprint((kinds[k] + uint64(reps)/2) / uint64(reps))
		if n == "0" {
			n = "<1"
		}
		parts = append(parts, k+" "+n)
	}
	return strings.Join(parts, ", ")
}

func (j *judge) verdictCounts(keys map[key]uint64) string {
	c := map[string]int{}
	for k := range keys {
		c[j.verdict(k)]++
	}
	return fmt.Sprintf("true %d, intended %d, false %d, unlabelled %d", c[True], c[Intended], c[False], c[Unlabelled])
}

// reportSites prints every distinct (kind, site) with its verdict and
// records the failures.
func (j *judge) reportSites() {
	var ks []key
	for k := range j.seen {
		ks = append(ks, k)
	}
	sort.Slice(ks, func(a, b int) bool {
		if va, vb := j.verdict(ks[a]), j.verdict(ks[b]); va != vb {
			return va < vb
		}
		if ks[a].Site != ks[b].Site {
			return ks[a].Site < ks[b].Site
		}
		return ks[a].Kind < ks[b].Kind
	})
	fmt.Printf("\n== distinct (kind, site), all suites: occurrences summed over runs per mode\n")
	var unlabelled []string
	for _, k := range ks {
		s := j.seen[k]
		v := j.verdict(k)
		var modes []string
		for _, m := range []string{record.Default, record.Deep} {
			if n := s.perMode[m]; n > 0 {
				modes = append(modes, fmt.Sprintf("%s %d", m, n))
			}
		}
		peer := ""
		if s.peer != "" {
			peer = "; peer " + s.peer
		}
		fmt.Printf("%-10s %-18s %s %s [%s; %s; probe %s%s]\n", v, k.Kind, k.Site, s.function, strings.Join(modes, ", "), strings.Join(keysOf(s.where), ","), s.probe, peer)
		switch {
		case v == False:
			j.fail("false attribution: %s at %s (%s)", k.Kind, k.Site, s.function)
		case v == Unlabelled && s.perMode[record.Default] > 0 && j.cfg.failUnlabelled:
			j.fail("unlabelled default-mode event: %s at %s (%s)", k.Kind, k.Site, s.function)
		case v == Intended && s.perMode[record.Default] > 0 && j.cfg.failIntended:
			j.fail("default-mode event on an intended idiom: %s at %s (%s)", k.Kind, k.Site, s.function)
		case v == Unlabelled && s.perMode[record.Default] == 0 && j.cfg.failUnlabDeep:
			j.fail("unlabelled deep-mode event: %s at %s (%s)", k.Kind, k.Site, s.function)
		}
		if v == Unlabelled {
			unlabelled = append(unlabelled, fmt.Sprintf("unlabelled %s %s %s  # %s", k.Kind, k.Site, s.function, strings.Join(keysOf(s.where), ",")))
		}
	}
	if len(unlabelled) > 0 {
		fmt.Printf("\n== unlabelled, in labels.txt's format (replace \"unlabelled\" by a verdict after reading the site)\n%s\n", strings.Join(unlabelled, "\n"))
	}
}

func keysOf(m map[string]bool) []string {
	var s []string
	for k := range m {
		s = append(s, k)
	}
	sort.Strings(s)
	return s
}
