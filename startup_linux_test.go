//go:build linux && amd64

package mapguard_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"github.com/mapguard/mapguard/internal/testutil"
)

// startupResult is what the programs of bench/startup print (package
// child's Result).
type startupResult struct {
	StartNs     int64 `json:"start_ns"`
	CloseNs     int64 `json:"close_ns"`
	StartCPUNs  int64 `json:"start_cpu_ns"`
	CloseCPUNs  int64 `json:"close_cpu_ns"`
	RSSBefore   int64 `json:"rss_before"`
	RSSPeak     int64 `json:"rss_peak"`
	RSSStarted  int64 `json:"rss_started"`
	RSSClosed   int64 `json:"rss_closed"`
	RSSClosedGC int64 `json:"rss_closed_gc"`
	ExeBytes    int64 `json:"exe_bytes"`
	StartAlloc  int64 `json:"start_alloc_bytes"`
}

// BenchmarkStartup measures Start and Close with the default options in a
// fresh process, as a service meets them: bin=small is the smallest
// program using mapguard (about 7 MB), bin=large a service-sized one (about
// 95 MB) importing client-go, the AWS S3 SDK and gRPC, built from the
// nested module bench/startup (its modules come from the module proxy the
// first time). Each iteration runs the program once; it measures itself.
//
// Metrics, per Start or Close: start-ms and close-ms of wall time;
// start-cpu-ms and close-cpu-ms of CPU time (user and system, all threads:
// on a busy machine wall time mostly measures the wait for a core);
// peak-MB, the most resident memory Start added (VmHWM, reset before
// Start, minus VmRSS before); started-MB, what it holds once started;
// closed-MB, what is left right after Close; closed-gc-MB, what is left
// after a GC and debug.FreeOSMemory; start-alloc-MB, the heap Start
// allocated (garbage included: the heap grows by it until the collector
// runs). ns/op is the whole child process.
//
// With MAPGUARD_BENCH_BASELINE set to another checkout of mapguard (for
// example a git archive of main), each program is also built against it
// (code=baseline), so that before and after run side by side.
func BenchmarkStartup(b *testing.B) {
	testutil.RequirePrivileged(b)
	codes := []struct{ name, root string }{{"this", testutil.ModuleRoot(b)}}
	if base := os.Getenv("MAPGUARD_BENCH_BASELINE"); base != "" {
		codes = append(codes, struct{ name, root string }{"baseline", base})
	}
	for _, prog := range []string{"small", "large"} {
		for _, code := range codes {
			b.Run("bin="+prog+"/code="+code.name, func(b *testing.B) {
				exe := buildStartupProgram(b, codes[0].root, code.name, code.root, prog)
				var sum startupResult
				for b.Loop() {
					r := runStartupProgram(b, exe)
					sum.StartNs += r.StartNs
					sum.CloseNs += r.CloseNs
					sum.StartCPUNs += r.StartCPUNs
					sum.CloseCPUNs += r.CloseCPUNs
					sum.RSSPeak += r.RSSPeak - r.RSSBefore
					sum.RSSStarted += r.RSSStarted - r.RSSBefore
					sum.RSSClosed += r.RSSClosed - r.RSSBefore
					sum.RSSClosedGC += r.RSSClosedGC - r.RSSBefore
					sum.ExeBytes = r.ExeBytes
					sum.StartAlloc += r.StartAlloc
				}
				n := float64(b.N)
				const ms, mb = 1e6, 1 << 20
				b.ReportMetric(float64(sum.StartNs)/n/ms, "start-ms")
				b.ReportMetric(float64(sum.CloseNs)/n/ms, "close-ms")
				b.ReportMetric(float64(sum.StartCPUNs)/n/ms, "start-cpu-ms")
				b.ReportMetric(float64(sum.CloseCPUNs)/n/ms, "close-cpu-ms")
				b.ReportMetric(float64(sum.RSSPeak)/n/mb, "peak-MB")
				b.ReportMetric(float64(sum.RSSStarted)/n/mb, "started-MB")
				b.ReportMetric(float64(sum.RSSClosed)/n/mb, "closed-MB")
				b.ReportMetric(float64(sum.RSSClosedGC)/n/mb, "closed-gc-MB")
				b.ReportMetric(float64(sum.ExeBytes)/mb, "exe-MB")
				b.ReportMetric(float64(sum.StartAlloc)/n/mb, "start-alloc-MB")
			})
		}
	}
}

func runStartupProgram(b *testing.B, exe string) startupResult {
	b.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(exe)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		b.Fatalf("%s: %v\n%s", exe, err, stderr.Bytes())
	}
	var r startupResult
	if err := json.Unmarshal(stdout.Bytes(), &r); err != nil {
		b.Fatalf("%s: %v\n%s", exe, err, stdout.Bytes())
	}
	if r.StartNs <= 0 || r.RSSBefore <= 0 || r.RSSPeak < r.RSSBefore {
		b.Fatalf("%s: implausible result %+v", exe, r)
	}
	return r
}

var startupBuilds sync.Map // key -> *startupBuild

type startupBuild struct {
	once sync.Once
	exe  string
	err  error
}

// buildStartupProgram builds bench/startup/<prog> of the checkout at here
// against mapguard at root, once per benchmark process. The module is
// copied to the user's cache directory with its replace pointing at root;
// the executable stays there, and go build relinks it only if it changed.
func buildStartupProgram(b *testing.B, here, name, root, prog string) string {
	b.Helper()
	v, _ := startupBuilds.LoadOrStore(name+"/"+prog, new(startupBuild))
	sb := v.(*startupBuild)
	sb.once.Do(func() { sb.exe, sb.err = buildStartup(here, name, root, prog) })
	if sb.err != nil {
		b.Fatal(sb.err)
	}
	return sb.exe
}

func buildStartup(here, name, root, prog string) (string, error) {
	cache, err := os.UserCacheDir()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(cache, "mapguard", "bench-startup", name)
	src := filepath.Join(dir, "src")
	if err := os.RemoveAll(src); err != nil {
		return "", err
	}
	if err := os.CopyFS(src, os.DirFS(filepath.Join(here, "bench", "startup"))); err != nil {
		return "", fmt.Errorf("copy bench/startup: %w", err)
	}
	abs, err := filepath.Abs(root)
	if err != nil {
		return "", err
	}
	exe := filepath.Join(dir, prog+".exe")
	for _, args := range [][]string{
		{"mod", "edit", "-replace", "github.com/mapguard/mapguard=" + abs},
		{"build", "-o", exe, "./" + prog},
	} {
		cmd := exec.Command("go", args...)
		cmd.Dir = src
		if out, err := cmd.CombinedOutput(); err != nil {
			return "", fmt.Errorf("go %v in %s: %v\n%s", args, src, err, out)
		}
	}
	return exe, nil
}
