//go:build linux

package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/mapguard/mapguard/bench/corpus/record"
)

// seed is a bug planted in the service, found by its "// seed: KIND..."
// comment: an event of one of Kinds must name File:Line.
type seed struct {
	Kinds []string
	Site  string // normalized file:line
}

var seedRE = regexp.MustCompile(`//\s*seed:\s*(.*)$`)

// findSeeds reads the service's source for seed comments.
func findSeeds(src, name string) ([]seed, error) {
	b, err := os.ReadFile(src)
	if err != nil {
		return nil, err
	}
	var seeds []seed
	for i, line := range strings.Split(string(b), "\n") {
		if m := seedRE.FindStringSubmatch(line); m != nil {
			seeds = append(seeds, seed{Kinds: strings.Fields(m[1]), Site: name + ":" + strconv.Itoa(i+1)})
		}
	}
	return seeds, nil
}

// server is a running service process.
type server struct {
	cmd  *exec.Cmd
	addr string
}

func startServer(bin, mode, events string, args ...string) (*server, error) {
	cmd := exec.Command(bin, append([]string{"-mode", mode, "-events", events}, args...)...)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	addr, ok := strings.CutPrefix(strings.TrimSpace(line), "ready ")
	if err != nil || !ok {
		cmd.Process.Kill()
		cmd.Wait()
		return nil, fmt.Errorf("service did not start: %q %v", line, err)
	}
	go io.Copy(io.Discard, out)
	return &server{cmd: cmd, addr: addr}, nil
}

func (s *server) stop() error {
	s.cmd.Process.Signal(syscall.SIGTERM)
	return s.cmd.Wait()
}

// cpu returns the process's user+system CPU time so far (clock ticks of
// 10 ms, from /proc).
func (s *server) cpu() time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", s.cmd.Process.Pid))
	if err != nil {
		return 0
	}
	// Fields after the ")" that ends the command name; utime and stime are
	// fields 14 and 15 of the whole line.
	i := bytes.LastIndexByte(b, ')')
	f := strings.Fields(string(b[i+2:]))
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * 10 * time.Millisecond
}

// crashChild runs the service in -crash mode, which must die of concurrent
// map writes with its Guard watching.
func crashChild(bin, events string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "-crash", "-mode", record.Default, "-events", events)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err := cmd.Run()
	if !strings.Contains(stderr.String(), "concurrent map") {
		return fmt.Errorf("crash child did not die of concurrent map writes: %v: %.300s", err, stderr.String())
	}
	return nil
}

// seedRun starts the service (the first Guard after the crash child, so it
// delivers the PreviousCrash), triggers each seeded bug, and returns the
// records.
func seedRun(bin, mode, events string) ([]record.Record, error) {
	s, err := startServer(bin, mode, events)
	if err != nil {
		return nil, err
	}
	c := &http.Client{Timeout: 2 * time.Minute}
	get := func(path string) {
		if resp, err := c.Get("http://" + s.addr + path); err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	}
	post := func(body string) {
		if resp, err := c.Post("http://"+s.addr+"/order", "application/json", strings.NewReader(body)); err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	}
	for i := 0; i < 20; i++ {
		post(fmt.Sprintf(`{"id":%d,"user":"u%d","items":[{"sku":"fig","qty":2}],"coupon":"VIP"}`, i, i)) // nil-map write, recovered
		get("/limit?region=apac&plan=pro")                                                               // nested miss
		get("/limit?region=eu&plan=pro")
		time.Sleep(50 * time.Millisecond)
	}
	get("/grow?n=2200000") // past 1<<21 entries
	time.Sleep(2 * time.Second)
	s.stop()
	return readRecords(events)
}

// loadResult is one load run against one server.
type loadResult struct {
	Mode     string
	Requests int
	Errors   int
	Duration time.Duration
	P99      time.Duration
	CPU      time.Duration   // server CPU during the load
	Windows  []window        // one per second of the run
	Records  []record.Record // the server's
	// Done holds each request's end and latency (see phaseP99).
	Done []done
}

// done is one request's end (the wall clock) and latency.
type done struct {
	At  time.Time
	Lat time.Duration
}

type window struct {
	Requests int
	P99      time.Duration
	CPU      time.Duration
}

// load drives the server with n requests from conc workers (at most limit
// long): orders, a share bugs of them seeded bugs (a coupon that hits the
// nil-map write, a missing region), and records per-second throughput, p99
// and the server's CPU.
//
// load is one load run: start, drive, sample each second, stop; kept together so the timing reads whole.
func load(s *server, n, conc int, bugs float64, limit time.Duration) loadResult {
	tr := &http.Transport{MaxIdleConnsPerHost: conc, MaxConnsPerHost: conc}
	c := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	defer tr.CloseIdleConnections()
	type sample struct {
		at, lat time.Duration
		err     bool
	}
	samples := make([]sample, n)
	var next int64
	var mu sync.Mutex
	every := 0
	if bugs > 0 {
		every = int(1 / bugs)
	}
	start := time.Now()
	cpu0 := s.cpu()
	var cpus []time.Duration
	stopSampler := make(chan struct{})
	var sampler sync.WaitGroup
	sampler.Add(1)
	go func() {
		defer sampler.Done()
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				cpus = append(cpus, s.cpu())
			case <-stopSampler:
				return
			}
		}
	}()
	var wg sync.WaitGroup
	for w := 0; w < conc; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				mu.Lock()
				i := int(next)
				next++
				mu.Unlock()
				if i >= n || time.Since(start) > limit {
					return
				}
				var resp *http.Response
				var err error
				t0 := time.Now()
				switch {
				case every > 0 && i%every == every/2:
					resp, err = c.Post("http://"+s.addr+"/order", "application/json",
						strings.NewReader(fmt.Sprintf(`{"id":%d,"user":"u%d","items":[{"sku":"fig","qty":1}],"coupon":"SPRING"}`, i, i%100)))
				case every > 0 && i%every == 0:
					resp, err = c.Get("http://" + s.addr + "/limit?region=apac&plan=free")
				case i%7 == 0:
					resp, err = c.Get("http://" + s.addr + "/limit?region=us&plan=pro")
				default:
					resp, err = c.Post("http://"+s.addr+"/order", "application/json",
						strings.NewReader(fmt.Sprintf(`{"id":%d,"user":"u%d","items":[{"sku":"apple","qty":%d},{"sku":"pear","qty":1}]}`, i, i%100, i%5+1)))
				}
				if err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
				samples[i] = sample{at: time.Since(start), lat: time.Since(t0), err: err != nil}
			}
		}()
	}
	wg.Wait()
	res := loadResult{Duration: time.Since(start), CPU: s.cpu() - cpu0}
	close(stopSampler)
	sampler.Wait()
	var all []time.Duration
	perSec := map[int][]time.Duration{}
	for _, sm := range samples {
		if sm.at == 0 {
			continue // not sent (time limit)
		}
		res.Requests++
		if sm.err {
			res.Errors++
		}
		all = append(all, sm.lat)
		res.Done = append(res.Done, done{start.Add(sm.at), sm.lat})
		sec := int(sm.at / time.Second)
		perSec[sec] = append(perSec[sec], sm.lat)
	}
	res.P99 = p99(all)
	prev := cpu0
	for sec := 0; sec < len(cpus); sec++ {
		w := window{Requests: len(perSec[sec]), P99: p99(perSec[sec]), CPU: cpus[sec] - prev}
		prev = cpus[sec]
		res.Windows = append(res.Windows, w)
	}
	return res
}

func p99(d []time.Duration) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[(len(s)*99)/100]
}

// buildService builds the service from this repository.
func buildService(repo, work string) (string, error) {
	bin := filepath.Join(work, "service", "service")
	if _, err := goCmd(repo, "build", "-o", bin, "./bench/corpus/service"); err != nil {
		return "", err
	}
	return bin, nil
}
