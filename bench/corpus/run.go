//go:build linux

package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/mapguard/mapguard/bench/corpus/record"
)

// run is one run of a suite's test binaries in one mode.
type run struct {
	Mode string
	Rep  int
	CPU  time.Duration // user+system time of the test processes (rusage)
	// AfterStart is CPU less what the processes had spent when the Guard
	// had started (or, off, when TestMain began): the tests' own share.
	AfterStart time.Duration
	Wall       time.Duration
	Results    map[string]string // "pkg TestName/sub" -> PASS, FAIL, SKIP; "pkg" -> exit status
	Records    []record.Record
}

var resultRE = regexp.MustCompile(`(?m)^\s*--- (PASS|FAIL|SKIP): (\S+)`)

// runSuite runs every test binary of p once in mode, one after another.
func runSuite(ctx context.Context, p *prepared, mode string, rep int, out string, short bool, timeout time.Duration) (*run, error) {
	r := &run{Mode: mode, Rep: rep, Results: map[string]string{}}
	for i, pk := range p.Pkgs {
		if pk.Binary == "" {
			continue
		}
		events := filepath.Join(out, fmt.Sprintf("%s-%s-%d-%02d.jsonl", p.Name, mode, rep, i))
		os.Remove(events)
		args := []string{"-test.v", "-test.count=1", "-test.timeout=" + timeout.String()}
		if short {
			args = append(args, "-test.short")
		}
		cmd := exec.CommandContext(ctx, pk.Binary, args...)
		cmd.Dir = pk.Dir
		cmd.Env = append(os.Environ(), "MAPGUARD_CORPUS_MODE="+mode, "MAPGUARD_CORPUS_EVENTS="+events)
		var stdout bytes.Buffer
		cmd.Stdout = &stdout
		cmd.Stderr = &stdout
		start := time.Now()
		err := cmd.Run()
		r.Wall += time.Since(start)
		if cmd.ProcessState == nil {
			return nil, fmt.Errorf("run %s: %v", pk.ImportPath, err)
		}
		r.CPU += cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
		r.Results[pk.ImportPath] = fmt.Sprintf("exit %d", cmd.ProcessState.ExitCode())
		for _, m := range resultRE.FindAllSubmatch(stdout.Bytes(), -1) {
			r.Results[pk.ImportPath+" "+string(m[2])] = string(m[1])
		}
		recs, err := readRecords(events)
		if err != nil {
			return nil, err
		}
		r.Records = append(r.Records, recs...)
		cpu := cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
		for _, rec := range recs {
			if rec.Type == "started" {
				cpu -= rec.CPU
			}
		}
		r.AfterStart += cpu
	}
	return r, nil
}

// readRecords reads a record file; a missing file is no records.
func readRecords(path string) ([]record.Record, error) {
	f, err := os.Open(path)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var recs []record.Record
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		var rec record.Record
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
			return nil, fmt.Errorf("%s: %v", path, err)
		}
		recs = append(recs, rec)
	}
	return recs, sc.Err()
}

// diffResults lists the tests whose result differs between a and b.
func diffResults(a, b map[string]string) []string {
	var d []string
	for k, va := range a {
		if vb := b[k]; vb != va {
			d = append(d, fmt.Sprintf("%s: %s -> %s", k, va, orNone(vb)))
		}
	}
	for k, vb := range b {
		if _, ok := a[k]; !ok {
			d = append(d, fmt.Sprintf("%s: none -> %s", k, vb))
		}
	}
	return d
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}

// flakyCounts are the -test.count values flakyOff runs a test with, in
// turn, while flakyTime lasts: three single runs catch a test that fails
// one run in several, not go-metrics' TestExpDecaySampleNanosecondRegression,
// which averages a random reservoir (rand.Seed is a no-op since Go 1.24):
// alone it failed 22 runs of 5,000 without a Guard and 0 of 600 with a deep
// one; in the corpus, 2 of about 12 deep runs of its suite, and 0 of 16
// runs of the suite with a deep Guard outside the corpus.
var flakyCounts = []int{1, 1, 1, 30, 300, 1000}

const flakyTime = time.Minute

// flakyOff reports whether test of pkg, run alone without a Guard (three
// times, then up to 1,330 more as flakyTime allows), ever gives result:
// then a difference in that test is the test's own flakiness, not the
// Guard's doing.
func flakyOff(ctx context.Context, p *prepared, pkg, test, result string, timeout time.Duration) bool {
	var bin, dir string
	for _, pk := range p.Pkgs {
		if pk.ImportPath == pkg {
			bin, dir = pk.Binary, pk.Dir
		}
	}
	if bin == "" {
		return false
	}
	var pattern []string
	for _, part := range strings.Split(test, "/") {
		pattern = append(pattern, "^"+regexp.QuoteMeta(part)+"$")
	}
	start, runs := time.Now(), 0
	for _, n := range flakyCounts {
		// Only while n more runs fit in what is left of flakyTime, at the
		// pace of those so far.
		if took := time.Since(start); runs > 0 && n > 1 && took/time.Duration(runs)*time.Duration(n) > flakyTime-took {
			break
		}
		runs += n
		cmd := exec.CommandContext(ctx, bin, "-test.v", fmt.Sprintf("-test.count=%d", n), "-test.timeout="+timeout.String(), "-test.run="+strings.Join(pattern, "/"))
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), "MAPGUARD_CORPUS_MODE="+record.Off)
		out, _ := cmd.CombinedOutput()
		for _, m := range resultRE.FindAllSubmatch(out, -1) {
			if string(m[2]) == test && string(m[1]) == result {
				return true
			}
		}
	}
	return false
}
