//go:build linux && amd64

package mapguard_test

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/mapguard/mapguard/internal/testutil"
)

// The Go releases the matrix builds with, from the module proxy: the
// oldest supported, the installed one, and the newest.
var matrixToolchains = []string{"go1.25.14", "go1.26.8", "go1.27.3"}

// buildVariant is one way of building a program that imports mapguard.
type buildVariant struct {
	name      string
	toolchain string // GOTOOLCHAIN
	flags     []string
	env       []string
	// refused lists what Start's ErrNotSupported must name for a build
	// that cannot be watched in full (the build setting and the kinds);
	// empty means every kind must be watched.
	refused []string
}

func buildVariants() []buildVariant {
	var vs []buildVariant
	for _, tc := range matrixToolchains {
		for _, v := range []buildVariant{
			{name: "default"},
			{name: "stripped", flags: []string{"-ldflags=-s -w"}},
			{name: "pie", flags: []string{"-buildmode=pie"}},
			{name: "pie-stripped", flags: []string{"-buildmode=pie", "-ldflags=-s -w"}},
			{name: "race", flags: []string{"-race"}},
			{name: "nocgo", env: []string{"CGO_ENABLED=0"}},
		} {
			v.toolchain = tc
			v.name = tc + "/" + v.name
			vs = append(vs, v)
		}
	}
	return append(vs,
		buildVariant{name: "go1.27.3/mapsplitgroup", toolchain: "go1.27.3", env: []string{"GOEXPERIMENT=mapsplitgroup"}},
		buildVariant{name: "go1.26.8/trimpath", toolchain: "go1.26.8", flags: []string{"-trimpath"}},
		buildVariant{name: "go1.27.3/noopt", toolchain: "go1.27.3", flags: []string{"-gcflags=all=-N -l"},
			refused: []string{"-gcflags=all=-N -l", "nil-map-read", "missing-key-read"}},
		buildVariant{name: "go1.26.8/amd64v3", toolchain: "go1.26.8", env: []string{"GOAMD64=v3"}},
	)
}

// build compiles ./internal/testprog for v into dir.
func (v buildVariant) build(root, dir string) (string, error) {
	out := filepath.Join(dir, strings.ReplaceAll(v.name, "/", "-"))
	args := append([]string{"build", "-o", out}, v.flags...)
	cmd := exec.Command("go", append(args, "./internal/testprog")...)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "GOTOOLCHAIN="+v.toolchain)
	cmd.Env = append(cmd.Env, v.env...)
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build %s: %v\n%s", v.name, err, b)
	}
	return out, nil
}

// buildAll builds every variant, two at a time (the build cache is shared),
// and returns each binary or its build error.
func buildAll(vs []buildVariant, root, dir string) ([]string, []error) {
	bins, errs := make([]string, len(vs)), make([]error, len(vs))
	var wg sync.WaitGroup
	sem := make(chan struct{}, 2)
	for i := range vs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			bins[i], errs[i] = vs[i].build(root, dir)
		}()
	}
	wg.Wait()
	return bins, errs
}

type testprogResult struct {
	GoVersion    string
	Error        string
	NotSupported bool
	Permission   bool
	Layout       bool
	Events       []struct {
		Kind, Function, File, MapType string
		Line, WantLine                int
		GoroutineOK                   bool
	}
	Sites    int
	Inactive []string
}

// TestBuildMatrix builds a program that watches itself with each Go version
// and build mode, runs it, and requires that it watches every kind, with
// the right site and map type, or, for the builds listed as refused, that
// Start refuses with ErrNotSupported naming the build and the kinds.
func TestBuildMatrix(t *testing.T) {
	testutil.RequirePrivileged(t)
	if testing.Short() {
		t.Skip("builds two dozen binaries")
	}
	root := testutil.ModuleRoot(t)
	vs := buildVariants()
	bins, errs := buildAll(vs, root, t.TempDir())
	for i, v := range vs {
		t.Run(v.name, func(t *testing.T) {
			if errs[i] != nil {
				t.Fatal(errs[i])
			}
			checkWatches(t, bins[i], v.refused)
		})
	}
}

// checkWatches runs a testprog binary and checks its report: every kind
// watched, or a refusal that names each of refused.
func checkWatches(t *testing.T, bin string, refused []string) {
	t.Helper()
	out, err := exec.Command(bin).Output()
	if err != nil {
		t.Fatalf("%s: %v\n%s", bin, err, out)
	}
	var res testprogResult
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("output %q: %v", out, err)
	}
	if len(refused) > 0 {
		if !res.NotSupported {
			t.Fatalf("%s: want ErrNotSupported naming %q, got error %q and %d events", res.GoVersion, refused, res.Error, len(res.Events))
		}
		for _, w := range refused {
			if !strings.Contains(res.Error, w) {
				t.Errorf("%s: refusal %q does not name %q", res.GoVersion, res.Error, w)
			}
		}
		t.Logf("%s refused: %s", res.GoVersion, res.Error)
		return
	}
	if res.Error != "" {
		t.Fatalf("%s: %s (%d events; inactive %v)", res.GoVersion, res.Error, len(res.Events), res.Inactive)
	}
	wantKinds := []string{"nil-map-write", "missing-key-read", "nested-map-miss", "nil-map-read", "missing-key-read", "unhashable-key", "map-growth", "map-bloat",
		"missing-key-delete", "nil-map-delete", "shared-writers"}
	wantTypes := []string{"map[string]int", "map[string]map[int64]bool", "map[int64]bool", "map[string]int", "map[int64]string", "map[interface {}]int", "map[int64]int64", "map[int64]int64",
		"map[string]int", "map[int64]bool", "map[int32]int"}
	if len(res.Events) != len(wantKinds) {
		t.Fatalf("%d events, want %d: %+v", len(res.Events), len(wantKinds), res)
	}
	for i, ev := range res.Events {
		if ev.Kind != wantKinds[i] || ev.MapType != wantTypes[i] || ev.Line != ev.WantLine ||
			!strings.HasSuffix(ev.File, "internal/testprog/main.go") || !ev.GoroutineOK {
			t.Errorf("event %d: %+v, want %s of %s at line %d on the provoking goroutine", i, ev, wantKinds[i], wantTypes[i], ev.WantLine)
		}
	}
	t.Logf("%s: %d sites, inactive %v", res.GoVersion, res.Sites, res.Inactive)
}

// TestNextGo builds the test program with the newest Go toolchain it is
// given, MAPGUARD_NEXT_GO (a GOTOOLCHAIN value such as go1.28rc1; CI sets
// the newest supported release), and reports each kind as watched or not,
// with the reason. A new Go release thus shows up here as a failure that
// says which kinds it breaks, before a user meets it.
func TestNextGo(t *testing.T) {
	testutil.RequirePrivileged(t)
	next := os.Getenv("MAPGUARD_NEXT_GO")
	if next == "" {
		t.Skip("MAPGUARD_NEXT_GO (a GOTOOLCHAIN value) is not set")
	}
	v := buildVariant{name: next, toolchain: next}
	bin, err := v.build(testutil.ModuleRoot(t), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bin).Output()
	if err != nil {
		t.Fatalf("%s: %v\n%s", bin, err, out)
	}
	var res testprogResult
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("output %q: %v", out, err)
	}
	watched := map[string]string{}
	for _, ev := range res.Events {
		if ev.Line == ev.WantLine && ev.MapType != "" {
			watched[ev.Kind] = fmt.Sprintf("%s:%d %s", filepath.Base(ev.File), ev.Line, ev.MapType)
		}
	}
	failed := false
	for _, kind := range []string{"nil-map-write", "missing-key-read", "nil-map-read", "unhashable-key", "map-growth", "map-bloat",
		"missing-key-delete", "nil-map-delete", "shared-writers"} {
		if at, ok := watched[kind]; ok {
			t.Logf("%s %-18s watched (%s)", res.GoVersion, kind, at)
			continue
		}
		failed = true
		reason := res.Error
		if reason == "" {
			reason = "no event at the right line"
		}
		t.Errorf("%s %-18s NOT watched: %s", res.GoVersion, kind, reason)
	}
	if failed {
		t.Logf("inactive functions: %v", res.Inactive)
	}
}
