//go:build linux

package main

import (
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mapguard/mapguard"
	"github.com/mapguard/mapguard/bench/corpus/record"
)

func TestLoadLabels(t *testing.T) {
	for _, tt := range []struct {
		name, text string
		want       map[key]label
		err        string
	}{
		{name: "verdicts and comments", text: "# header\n\ntrue nil-map-write a.go:1 main.f  # seeded\nintended missing-key-read b.go:2 p.g\nfalse shared-writers c.go:3\n",
			want: map[key]label{
				{"nil-map-write", "a.go:1"}:    {Verdict: True, Function: "main.f", Why: "seeded"},
				{"missing-key-read", "b.go:2"}: {Verdict: Intended, Function: "p.g"},
				{"shared-writers", "c.go:3"}:   {Verdict: False},
			}},
		{name: "unknown verdict", text: "maybe nil-map-read a.go:1\n", err: `verdict "maybe"`},
		{name: "too short", text: "true nil-map-read\n", err: "want VERDICT"},
		{name: "twice", text: "true nil-map-read a.go:1\nfalse nil-map-read a.go:1\n", err: "labelled twice"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "labels.txt")
			if err := os.WriteFile(p, []byte(tt.text), 0o644); err != nil {
				t.Fatal(err)
			}
			got, err := loadLabels(p)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("err = %v, want it to contain %q", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("got %+v\nwant %+v", got, tt.want)
			}
		})
	}
}

// The labels file in the repository parses, and names each site once.
func TestRepositoryLabels(t *testing.T) {
	labels, err := loadLabels("labels.txt")
	if err != nil {
		t.Fatal(err)
	}
	if len(labels) == 0 {
		t.Fatal("no labels")
	}
}

func TestNormalizer(t *testing.T) {
	n := &normalizer{}
	n.add("/usr/local/go", "GOROOT/")
	n.add("/root/go/pkg/mod", "")
	n.add("/work/repo", "mapguard/")
	n.add("/tmp/w/toml/src", "github.com/BurntSushi/toml@v1.6.0/")
	n.add("/tmp/w", "work/") // shorter than the suite's copy: must not win
	for _, tt := range []struct {
		frame mapguard.Frame
		want  string
	}{
		{mapguard.Frame{File: "/usr/local/go/src/net/http/server.go", Line: 7}, "GOROOT/src/net/http/server.go:7"},
		{mapguard.Frame{File: "/root/go/pkg/mod/github.com/!burnt!sushi/toml@v1.6.0/parse.go", Line: 682}, "github.com/BurntSushi/toml@v1.6.0/parse.go:682"},
		{mapguard.Frame{File: "/tmp/w/toml/src/parse.go", Line: 682}, "github.com/BurntSushi/toml@v1.6.0/parse.go:682"},
		{mapguard.Frame{File: "/work/repo/bench/corpus/service/main.go", Line: 89}, "mapguard/bench/corpus/service/main.go:89"},
		{mapguard.Frame{File: "/elsewhere/x.go", Line: 1}, "/elsewhere/x.go:1"},
		{mapguard.Frame{Function: "main.f"}, "main.f"},
		{mapguard.Frame{}, "?"},
	} {
		if got := n.site(tt.frame); got != tt.want {
			t.Errorf("site(%+v) = %q, want %q", tt.frame, got, tt.want)
		}
	}
}

// Every seed in the service has a kind and lies on a map operation's line.
func TestFindSeeds(t *testing.T) {
	seeds, err := findSeeds("service/main.go", "svc.go")
	if err != nil {
		t.Fatal(err)
	}
	src, _ := os.ReadFile("service/main.go")
	lines := strings.Split(string(src), "\n")
	kinds := map[string]bool{}
	for _, s := range seeds {
		if len(s.Kinds) == 0 {
			t.Errorf("seed at %s names no kind", s.Site)
		}
		for _, k := range s.Kinds {
			kinds[k] = true
		}
		var line int
		if _, after, ok := strings.Cut(s.Site, ":"); ok {
			for _, c := range after {
				line = line*10 + int(c-'0')
			}
		}
		if code := lines[line-1]; !strings.Contains(code, "[") {
			t.Errorf("seed at %s is not on a map operation: %q", s.Site, code)
		}
	}
	for _, k := range []string{"nil-map-write", "nil-map-read", "previous-crash", "map-growth"} {
		if !kinds[k] {
			t.Errorf("no seed reported as %s", k)
		}
	}
}

func TestInject(t *testing.T) {
	t.Run("own TestMain", func(t *testing.T) {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, "a_test.go"), []byte("package a_test\n\nfunc TestX(t *testing.T) {}\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		wrapped, err := inject(dir, "a", []string{"a_test.go"})
		if err != nil || wrapped {
			t.Fatalf("inject = %v, %v; want false, nil", wrapped, err)
		}
		b, _ := os.ReadFile(filepath.Join(dir, "zz_mapguard_corpus_test.go"))
		if !strings.HasPrefix(string(b), "// Code generated") || !strings.Contains(string(b), "package a\n") || !strings.Contains(string(b), "code := m.Run()") {
			t.Errorf("injected file:\n%s", b)
		}
	})
	t.Run("wraps the package's TestMain", func(t *testing.T) {
		dir := t.TempDir()
		orig := "package a_test\n\nfunc TestMain(m *testing.M) {\n\tos.Exit(m.Run())\n}\n"
		if err := os.WriteFile(filepath.Join(dir, "main_test.go"), []byte(orig), 0o644); err != nil {
			t.Fatal(err)
		}
		wrapped, err := inject(dir, "a", []string{"main_test.go"})
		if err != nil || !wrapped {
			t.Fatalf("inject = %v, %v; want true, nil", wrapped, err)
		}
		b, _ := os.ReadFile(filepath.Join(dir, "main_test.go"))
		if strings.Contains(string(b), "func TestMain(") || !strings.Contains(string(b), "func mapguardCorpusTestMain(m *testing.M)") {
			t.Errorf("renamed file:\n%s", b)
		}
		b, _ = os.ReadFile(filepath.Join(dir, "zz_mapguard_corpus_test.go"))
		if !strings.Contains(string(b), "package a_test\n") || !strings.Contains(string(b), "mapguardCorpusTestMain(m)") {
			t.Errorf("injected file:\n%s", b)
		}
	})
}

func TestDiffResults(t *testing.T) {
	a := map[string]string{"p TestA": "PASS", "p TestB": "FAIL", "p": "exit 1"}
	b := map[string]string{"p TestA": "PASS", "p TestB": "PASS", "p TestC": "SKIP", "p": "exit 0"}
	got := diffResults(a, b)
	want := []string{"p TestB: FAIL -> PASS", "p: exit 1 -> exit 0", "p TestC: none -> SKIP"}
	if len(got) != len(want) {
		t.Fatalf("got %q, want %q", got, want)
	}
	for _, w := range want {
		found := false
		for _, g := range got {
			found = found || g == w
		}
		if !found {
			t.Errorf("missing %q in %q", w, got)
		}
	}
	if d := diffResults(a, a); len(d) != 0 {
		t.Errorf("diffResults(a, a) = %q", d)
	}
}

func TestP99AndMedian(t *testing.T) {
	var d []time.Duration
	for i := 1; i <= 200; i++ {
		d = append(d, time.Duration(i))
	}
	if got := p99(d); got != 199 {
		t.Errorf("p99 = %d, want 199", got)
	}
	if got := median([]time.Duration{3, 1, 2, 10}); got != 2 {
		t.Errorf("median = %d, want 2 (of 2 and 3, truncated)", got)
	}
	if p99(nil) != 0 || median(nil) != 0 {
		t.Error("empty input should give 0")
	}
}

// phaseP99 takes the requests that ended within a phase, and none before
// or after it.
func TestPhaseP99(t *testing.T) {
	t0 := time.Unix(1000, 0)
	var reqs []done
	for i := range 300 {
		// 100 requests a second for 3 s; the second second's are slow.
		lat := time.Millisecond
		if i >= 100 && i < 200 {
			lat = 10 * time.Millisecond
		}
		reqs = append(reqs, done{At: t0.Add(time.Duration(i) * 10 * time.Millisecond), Lat: lat})
	}
	slices.Reverse(reqs) // printToggle sorts them
	slices.SortFunc(reqs, func(a, b done) int { return a.At.Compare(b.At) })
	for _, c := range []struct {
		from time.Duration
		want time.Duration
	}{{0, time.Millisecond}, {time.Second, 10 * time.Millisecond}, {2 * time.Second, time.Millisecond}, {5 * time.Second, 0}} {
		p := &record.Phase{Start: t0.Add(c.from), Wall: time.Second}
		if got := phaseP99(reqs, p); got != c.want {
			t.Errorf("p99 of the phase from %v = %v, want %v", c.from, got, c.want)
		}
	}
	if got := phaseP99(reqs, &record.Phase{Wall: time.Second}); got != 0 {
		t.Errorf("p99 of a phase without a start = %v, want 0", got)
	}
}
