//go:build linux && amd64

package mapguard_test

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mapguard/mapguard/internal/testutil"
)

// go125 is the Go 1.25 toolchain the tests build with, from the module proxy.
const go125 = "go1.25.14"

// buildVariant is one way of building a program that imports mapguard.
type buildVariant struct {
	name      string
	toolchain string // GOTOOLCHAIN; "local" is the installed Go
	flags     []string
	env       []string
}

func buildVariants() []buildVariant {
	var vs []buildVariant
	for _, tc := range []string{"local", go125} {
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
	return vs
}

// build compiles ./internal/testprog for v into dir.
func (v buildVariant) build(t *testing.T, root, dir string) string {
	t.Helper()
	out := filepath.Join(dir, strings.ReplaceAll(v.name, "/", "-"))
	args := append([]string{"build", "-o", out}, v.flags...)
	cmd := exec.Command("go", append(args, "./internal/testprog")...)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "GOTOOLCHAIN="+v.toolchain)
	cmd.Env = append(cmd.Env, v.env...)
	if b, err := cmd.CombinedOutput(); err != nil {
		if v.toolchain != "local" && strings.Contains(string(b), "download") {
			t.Skipf("toolchain %s unavailable: %s", v.toolchain, b)
		}
		t.Fatalf("go build %s: %v\n%s", v.name, err, b)
	}
	return out
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
// and build mode, runs it, and requires that it either watches correctly or
// refuses with a typed error: nothing in between.
func TestBuildMatrix(t *testing.T) {
	testutil.RequirePrivileged(t)
	if testing.Short() {
		t.Skip("builds a dozen binaries")
	}
	root := testutil.ModuleRoot(t)
	dir := t.TempDir()
	for _, v := range buildVariants() {
		t.Run(v.name, func(t *testing.T) {
			bin := v.build(t, root, dir)
			out, err := exec.Command(bin).Output()
			if err != nil {
				t.Fatalf("%s: %v\n%s", bin, err, out)
			}
			var res testprogResult
			if err := json.Unmarshal(out, &res); err != nil {
				t.Fatalf("output %q: %v", out, err)
			}
			if res.Error != "" {
				if !res.NotSupported && !res.Permission && !res.Layout {
					t.Fatalf("%s: untyped error: %s", res.GoVersion, res.Error)
				}
				t.Logf("%s refused with a typed error: %s", res.GoVersion, res.Error)
				return
			}
			wantKinds := []string{"nil-map-write", "missing-key-read", "nil-map-read", "missing-key-read", "unhashable-key", "map-growth", "map-bloat",
				"missing-key-delete", "nil-map-delete", "shared-writers"}
			wantTypes := []string{"map[string]int", "map[string]map[int64]bool", "map[int64]bool", "map[int64]string", "map[interface {}]int", "map[int64]int64", "map[int64]int64",
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
		})
	}
}
