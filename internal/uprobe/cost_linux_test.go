//go:build linux && amd64

package uprobe

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/arch/x86/x86asm"

	"github.com/mapguard/mapguard/decode"
	"github.com/mapguard/mapguard/internal/testutil"
	"github.com/mapguard/mapguard/internal/x86site"
	"github.com/mapguard/mapguard/probe"
	"github.com/mapguard/mapguard/symbols"
)

//go:noinline
func nilWrite() {
	defer func() { _ = recover() }()
	var m map[string]int
	m["k"] = 1
}

// attachEmpty attaches the empty BPF program at fn+off in this process.
func attachEmpty(b *testing.B, fn string, off func(code []byte, f symbols.Func) uint64) {
	b.Helper()
	bin, err := symbols.OpenSelf()
	if err != nil {
		b.Fatal(err)
	}
	defer bin.Close()
	f, ok := bin.Func(fn)
	if !ok {
		b.Fatalf("%s not in binary", fn)
	}
	code, err := bin.Code(f)
	if err != nil {
		b.Fatal(err)
	}
	spec, err := loadMapguard()
	if err != nil {
		b.Fatal(err)
	}
	prog, err := ebpf.NewProgram(spec.Programs[mapguardProgMapguardEmpty])
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { prog.Close() })
	ex, err := link.OpenExecutable(selfExe)
	if err != nil {
		b.Fatal(err)
	}
	l, err := ex.Uprobe("", prog, &link.UprobeOptions{Address: f.FileOffset + off(code, f), PID: os.Getpid()})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { l.Close() })
}

// BenchmarkHitCost is the cost of one probe hit on a recovered nil-map write
// (runtime.mapassign_faststr), by where the probe sits and what it runs.
// Subtract "none" for the per-hit cost; bench/run.sh prints the ratios.
func BenchmarkHitCost(b *testing.B) {
	testutil.RequirePrivileged(b)
	loop := func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			nilWrite()
		}
	}
	nilSite := func(code []byte, f symbols.Func) uint64 {
		s, err := x86site.NilMapSite(code, f.Entry, x86site.MapAssign, func(uint64) string { return "runtime.gopanic" })
		if err != nil {
			b.Fatal(err)
		}
		return s.Offset
	}
	// The nil block's first instruction (MOVQ errNilAssign(SB), CX,
	// single-stepped), where the site was before NilMapSite moved on to
	// the block's emulated JE: the instruction after a RET or JMP,
	// walking back from the site.
	blockStart := func(code []byte, f symbols.Func) uint64 {
		off := nilSite(code, f)
		insts, err := x86site.Decode(code)
		if err != nil {
			b.Fatal(err)
		}
		for i := len(insts) - 1; i > 0; i-- {
			if insts[i].Offset <= off && (insts[i-1].Op == x86asm.JMP || insts[i-1].Op == x86asm.RET) {
				return insts[i].Offset
			}
		}
		b.Fatal("no nil block start")
		return 0
	}
	b.Run("probe=none", loop)
	b.Run("probe=empty@nil-block-start", func(b *testing.B) {
		attachEmpty(b, "runtime.mapassign_faststr", blockStart)
		loop(b)
	})
	b.Run("probe=empty@nil-branch", func(b *testing.B) {
		attachEmpty(b, "runtime.mapassign_faststr", nilSite)
		loop(b)
	})
	b.Run("probe=mapguard@nil-branch", func(b *testing.B) {
		p := New(Config{Kinds: []decode.Kind{decode.NilMapWrite}, Budget: 1, BufferSize: 1 << 16})
		if err := p.Start(context.Background(), func(*decode.Event) {}); err != nil {
			b.Fatal(err)
		}
		defer p.Close()
		loop(b)
	})
	b.Run("probe=empty@entry", func(b *testing.B) {
		attachEmpty(b, "runtime.mapassign_faststr", func([]byte, symbols.Func) uint64 { return 0 })
		loop(b)
	})
	b.Run("probe=empty@after-stack-check", func(b *testing.B) {
		attachEmpty(b, "runtime.mapassign_faststr", func(code []byte, f symbols.Func) uint64 {
			s, err := x86site.EntrySite(code)
			if err != nil {
				b.Fatal(err)
			}
			return s.Offset
		})
		loop(b)
	})
}

var deepMap = map[string]int{"k": 0}

//go:noinline
func healthyWrite(i int) { deepMap["k"] = i }

// BenchmarkDeepHitCost is the cost of one hit at a deep site: a healthy
// write to a non-nil map (runtime.mapassign_faststr), with mapguard's deep
// program (counting the call site and tracking writers, with the whole CPU
// as budget so that it is never detached) against an empty program at the
// same emulated instruction (the floor) and at the function entry (what a
// naive attach or bpftrace pays).
func BenchmarkDeepHitCost(b *testing.B) {
	testutil.RequirePrivileged(b)
	loop := func(b *testing.B) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			healthyWrite(i)
			i++
		}
	}
	afterStackCheck := func(code []byte, f symbols.Func) uint64 {
		s, err := x86site.EntrySite(code)
		if err != nil {
			b.Fatal(err)
		}
		return s.Offset
	}
	b.Run("probe=none", loop)
	b.Run("probe=empty@after-stack-check", func(b *testing.B) {
		attachEmpty(b, "runtime.mapassign_faststr", afterStackCheck)
		loop(b)
	})
	// Both deep features, then each alone.
	for _, c := range []struct {
		name string
		cfg  Config
	}{
		{"mapguard-deep@after-stack-check", Config{Kinds: []decode.Kind{decode.SharedWriters}, OpStats: true, Budget: 1}},
		{"mapguard-opstats@after-stack-check", Config{Kinds: []decode.Kind{decode.NilMapWrite}, OpStats: true, Budget: 1}},
		{"mapguard-writers@after-stack-check", Config{Kinds: []decode.Kind{decode.SharedWriters}, Budget: 1}},
	} {
		b.Run("probe="+c.name, func(b *testing.B) {
			p := New(c.cfg)
			if err := p.Start(context.Background(), func(*decode.Event) {}); err != nil {
				b.Fatal(err)
			}
			defer p.Close()
			hits0 := deepHits(p)
			loop(b)
			b.StopTimer()
			st := p.Stats()
			if bs := st.Budget; bs != nil {
				b.ReportMetric(float64(bs.EmulatedCost.Nanoseconds()), "calibrated-emulated-ns/hit")
			}
			for _, s := range st.Sites {
				if s.Deep && s.Function == "runtime.mapassign_faststr" {
					b.ReportMetric(float64(s.Cost.Nanoseconds()), "accounted-ns/hit")
				}
			}
			// A loop that traps on every write spends a whole CPU on the
			// traps, over even a budget of 1: the governor samples the
			// site, and most writes are not hits. bench/table divides by
			// this.
			b.ReportMetric(float64(deepHits(p)-hits0)/float64(b.N), "hits/op")
		})
	}
	b.Run("probe=empty@entry", func(b *testing.B) {
		attachEmpty(b, "runtime.mapassign_faststr", func([]byte, symbols.Func) uint64 { return 0 })
		loop(b)
	})
}

// deepHits is the hits of p's deep sites in runtime.mapassign_faststr.
func deepHits(p probe.Probe) uint64 {
	var n uint64
	for _, s := range p.Stats().Sites {
		if s.Deep && s.Function == "runtime.mapassign_faststr" {
			n += s.Hits
		}
	}
	return n
}

// Two sites at one instruction share one trap while both are attached, or
// both are being detached with one link: it is charged to the first one
// only; once that one is detached (the governor samples them apart), the
// other bears it whole.
func TestSharedTrapCost(t *testing.T) {
	fn := symbols.Func{Name: "runtime.mapaccess1_faststr", FileOffset: 0x1000}
	at := func(i uint32, off uint64) *site {
		return &site{index: i, fn: fn, found: found{at: x86site.Site{Offset: off}}}
	}
	u := &uprobes{stepCost: 20 * time.Microsecond, emuCost: time.Microsecond}
	u.sites = []*site{at(0, 0x131), at(1, 0x131), at(2, 0x10b), at(3, 0x131)}
	for _, s := range u.sites {
		s.link = fakeLink{}
	}
	check := func(when string, want []float64) {
		t.Helper()
		for i, want := range want {
			if got := u.siteCost(u.sites[i]); got != want {
				t.Errorf("%s: site %d (+%#x): cost %v ns, want %v", when, i, u.sites[i].at.Offset, got, want)
			}
		}
	}
	check("all attached", []float64{20000, 0, 20000, 0})
	u.sites[0].link = nil // sampled apart: site 1 traps alone
	check("the first detached", []float64{20000, 20000, 20000, 0})
	// Detached with one link (Start's, demoted in a storm): the kernel
	// removes the breakpoint with the second site, and the two trap
	// together until then: the trap is still the first one's.
	start := &fakeLink{}
	for _, i := range []int{0, 1, 3} {
		u.sites[i].link, u.sites[i].closing = nil, start
	}
	check("detached together", []float64{20000, 0, 20000, 0})
	u.sites[3].closing = &fakeLink{} // its own link: it may outlast the others
	check("detached with two links", []float64{20000, 0, 20000, 20000})
}

// fakeLink stands for an attached link where only its presence counts.
type fakeLink struct{ link.Link }

// The calibration's eviction buffer is sized from the caches a core has
// to itself, as sysfs describes them.
func TestEvictionSize(t *testing.T) {
	mk := func(caches map[string][2]string) string {
		dir := t.TempDir()
		for name, lv := range caches {
			d := filepath.Join(dir, name)
			if err := os.MkdirAll(d, 0o755); err != nil {
				t.Fatal(err)
			}
			os.WriteFile(filepath.Join(d, "level"), []byte(lv[0]+"\n"), 0o644)
			os.WriteFile(filepath.Join(d, "size"), []byte(lv[1]+"\n"), 0o644)
		}
		return dir
	}
	for _, c := range []struct {
		name   string
		caches map[string][2]string
		want   int
	}{
		{"epyc", map[string][2]string{"index0": {"1", "32K"}, "index1": {"1", "32K"}, "index2": {"2", "512K"}, "index3": {"3", "32768K"}}, 768 << 10},
		{"big L2", map[string][2]string{"index0": {"1", "48K"}, "index2": {"2", "4M"}, "index3": {"3", "64M"}}, evictMax},
		{"L1 only", map[string][2]string{"index0": {"1", "32K"}}, evictMin},
		{"unreadable", map[string][2]string{"index0": {"1", "lots"}}, evictDefault},
	} {
		if got := evictionSize(mk(c.caches)); got != c.want {
			t.Errorf("%s: evictionSize %d, want %d", c.name, got, c.want)
		}
	}
	if got := evictionSize(filepath.Join(t.TempDir(), "none")); got != evictDefault {
		t.Errorf("no sysfs: evictionSize %d, want %d", got, evictDefault)
	}
}
