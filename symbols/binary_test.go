package symbols

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"sync"
	"testing"
)

// The tests build real programs, once per test binary, in a directory that
// TestMain removes.
var tmpRoot string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "symbols-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	tmpRoot = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// targetSource is the program most tests inspect. It uses the map
// functions the tests look up, and not runtime.mapassign_fast32ptr, which
// amd64 programs never need.
const targetSource = `package main

import (
	"fmt"
	"os"
)

func main() {
	m := map[string]int{}
	for i, a := range os.Args {
		m[a] = i // runtime.mapassign_faststr
	}
	n := map[int64]string{}
	n[int64(len(os.Args))] = "x" // runtime.mapassign_fast64
	var nilMap map[string]int
	func() {
		defer func() { recover() }()
		nilMap["boom"] = 1 // runtime.gopanic
	}()
	fmt.Println(m["k"], n[1]) // runtime.mapaccess1_faststr, runtime.mapaccess1_fast64
}
`

type toolchain struct {
	name string // subtest name
	env  string // GOTOOLCHAIN setting
}

// The toolchain running the tests, and Go 1.25, whose linker still wrote
// runtime.text into the pclntab header. (CI runs the suite under Go 1.27
// too, where "local" is 1.27; the root package's build matrix opens every
// release's builds.)
var toolchains = []toolchain{
	{"local", "GOTOOLCHAIN=local"},
	{"go1.25", "GOTOOLCHAIN=go1.25.14"},
}

type variant struct {
	name     string
	pie      bool
	stripped bool
	external bool // linked by the C linker
}

var variants = []variant{
	{name: "default"},
	{name: "stripped", stripped: true},
	{name: "pie", pie: true},
	{name: "pie-stripped", pie: true, stripped: true},
	{name: "external", external: true},
	{name: "external-stripped", external: true, stripped: true},
	{name: "external-pie", external: true, pie: true},
	{name: "external-pie-stripped", external: true, pie: true, stripped: true},
}

// twin is the same build with a symbol table.
func (v variant) twin() variant {
	for _, w := range variants {
		if w.pie == v.pie && w.external == v.external && !w.stripped {
			return w
		}
	}
	panic("no twin for " + v.name)
}

func (v variant) flags() []string {
	var flags, ldflags []string
	if v.pie {
		flags = append(flags, "-buildmode=pie")
	}
	if v.stripped {
		ldflags = append(ldflags, "-s", "-w")
	}
	if v.external {
		ldflags = append(ldflags, "-linkmode=external")
	}
	if len(ldflags) > 0 {
		flags = append(flags, "-ldflags="+strings.Join(ldflags, " "))
	}
	return flags
}

func (v variant) env() string {
	if v.external {
		return "CGO_ENABLED=1"
	}
	return "CGO_ENABLED=0"
}

type once struct {
	sync.Once
	val  string
	skip string
	err  error
}

var (
	onceMu sync.Mutex
	onces  = map[string]*once{}
)

// memo runs fn once per key for the whole test binary. fn returns a value,
// a reason to skip, or an error.
func memo(t testing.TB, key string, fn func() (string, string, error)) string {
	t.Helper()
	onceMu.Lock()
	o := onces[key]
	if o == nil {
		o = new(once)
		onces[key] = o
	}
	onceMu.Unlock()
	o.Do(func() { o.val, o.skip, o.err = fn() })
	if o.err != nil {
		t.Fatal(o.err)
	}
	if o.skip != "" {
		t.Skip(o.skip)
	}
	return o.val
}

// goVersion returns the version of a toolchain, skipping if Go 1.25 cannot
// be obtained.
func goVersion(t testing.TB, tc toolchain) string {
	return memo(t, "version "+tc.name, func() (string, string, error) {
		// Only stdout: the first use of a toolchain prints "go: downloading
		// go1.N (linux/amd64)" on stderr.
		cmd := exec.Command("go", "env", "GOVERSION")
		cmd.Env = append(os.Environ(), tc.env)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			msg := fmt.Sprintf("toolchain %s unavailable: %v: %s", tc.env, err, stderr.String())
			if tc.name == "local" {
				return "", "", errors.New(msg)
			}
			return "", msg, nil
		}
		return strings.TrimSpace(string(out)), "", nil
	})
}

func needCC(t testing.TB, v variant) {
	if !v.external {
		return
	}
	if _, err := exec.LookPath("gcc"); err != nil {
		if _, err := exec.LookPath("cc"); err != nil {
			t.Skip("external linking needs a C compiler")
		}
	}
}

// goBuild builds pkg in dir, for linux/amd64.
func goBuild(tc toolchain, v variant, dir, pkg, out string) error {
	args := append([]string{"build", "-buildvcs=false", "-o", out}, v.flags()...)
	cmd := exec.Command("go", append(args, pkg)...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), tc.env, v.env(), "GOOS=linux", "GOARCH=amd64")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go %s: %v\n%s", strings.Join(cmd.Args[1:], " "), err, b)
	}
	return nil
}

// buildTarget returns the path of targetSource built with tc and v.
func buildTarget(t testing.TB, tc toolchain, v variant) string {
	t.Helper()
	goVersion(t, tc)
	needCC(t, v)
	src := memo(t, "source", func() (string, string, error) {
		dir := filepath.Join(tmpRoot, "src")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return "", "", err
		}
		if err := os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module target\n\ngo 1.25\n"), 0o644); err != nil {
			return "", "", err
		}
		return dir, "", os.WriteFile(filepath.Join(dir, "main.go"), []byte(targetSource), 0o644)
	})
	return memo(t, "target "+tc.name+" "+v.name, func() (string, string, error) {
		out := filepath.Join(tmpRoot, "target-"+tc.name+"-"+v.name)
		return out, "", goBuild(tc, v, src, ".", out)
	})
}

// buildSelfcheck returns the path of testdata/selfcheck built with tc and v.
func buildSelfcheck(t testing.TB, tc toolchain, v variant) string {
	t.Helper()
	goVersion(t, tc)
	needCC(t, v)
	return memo(t, "selfcheck "+tc.name+" "+v.name, func() (string, string, error) {
		out := filepath.Join(tmpRoot, "selfcheck-"+tc.name+"-"+v.name)
		return out, "", goBuild(tc, v, "..", "./symbols/testdata/selfcheck", out)
	})
}

// eachBuild runs fn for every toolchain and variant. Toolchains run in
// parallel: builds are the slow part, and each uses the cores it gets.
func eachBuild(t *testing.T, fn func(t *testing.T, tc toolchain, v variant)) {
	for _, tc := range toolchains {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			for _, v := range variants {
				t.Run(v.name, func(t *testing.T) { fn(t, tc, v) })
			}
		})
	}
}

// symtab is the ground truth from an unstripped build.
type symtab struct {
	funcs map[string]elf.Symbol
	text  uint64 // runtime.text
}

func readSymtab(t *testing.T, path string) symtab {
	t.Helper()
	ef, err := elf.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ef.Close()
	syms, err := ef.Symbols()
	if err != nil {
		t.Fatal(err)
	}
	st := symtab{funcs: map[string]elf.Symbol{}}
	for _, s := range syms {
		if s.Name == "runtime.text" {
			st.text = s.Value
		}
		if elf.ST_TYPE(s.Info) == elf.STT_FUNC {
			st.funcs[s.Name] = s
		}
	}
	if st.text == 0 {
		t.Fatalf("%s: no runtime.text", path)
	}
	return st
}

// sectionBytes reads [addr, addr+size) through the section headers, an
// independent path from the PT_LOAD segments that Binary uses.
func sectionBytes(t *testing.T, ef *elf.File, addr, size uint64) []byte {
	t.Helper()
	for _, s := range ef.Sections {
		if s.Flags&elf.SHF_EXECINSTR == 0 || addr < s.Addr || addr+size > s.Addr+s.Size {
			continue
		}
		buf := make([]byte, size)
		if _, err := s.ReadAt(buf, int64(addr-s.Addr)); err != nil {
			t.Fatal(err)
		}
		return buf
	}
	t.Fatalf("no executable section holds %#x-%#x", addr, addr+size)
	return nil
}

// mapFuncs are in every build of targetSource.
var mapFuncs = []string{
	"runtime.mapassign_faststr",
	"runtime.mapaccess1_faststr",
	"runtime.mapaccess1_fast64",
	"runtime.gopanic",
	"runtime.main",
}

func TestOpen(t *testing.T) {
	eachBuild(t, func(t *testing.T, tc toolchain, v variant) {
		path := buildTarget(t, tc, v)
		twin := buildTarget(t, tc, v.twin())
		version := goVersion(t, tc)

		b, err := Open(path)
		if err != nil {
			t.Fatal(err)
		}
		defer b.Close()
		t.Logf("%s: textStart %#x from %s, %d functions", filepath.Base(path), b.textStart, b.textSource, b.nfunc())

		if b.Path() != path || b.GoVersion() != version || b.PIE() != v.pie || b.Stripped() != v.stripped || b.LoadBias() != 0 {
			t.Errorf("Path %q GoVersion %q PIE %v Stripped %v LoadBias %#x; want %q %q %v %v 0",
				b.Path(), b.GoVersion(), b.PIE(), b.Stripped(), b.LoadBias(), path, version, v.pie, v.stripped)
		}
		st := readSymtab(t, twin)
		if b.textStart != st.text {
			t.Errorf("textStart %#x from %s, runtime.text is %#x", b.textStart, b.textSource, st.text)
		}
		if want := "symtab"; !v.stripped && b.textSource != want {
			t.Errorf("textStart from %s, want %s", b.textSource, want)
		}
		if err := b.checkPadding(); err != nil {
			t.Errorf("right textStart fails the padding check: %v", err)
		}

		ef, err := elf.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		defer ef.Close()
		text := ef.Section(".text")

		// Every Go function of the symbol table, entry and size. .symtab
		// names ABI0 functions and wrappers name.abi0; .gopclntab does not.
		matched, errs := 0, 0
		for name, s := range st.funcs {
			base := strings.TrimSuffix(name, ".abi0")
			if _, ok := b.Func(base); !ok || strings.HasPrefix(name, "go:") || s.Size == 0 {
				continue // C code, or markers
			}
			f, ok := b.FuncAt(s.Value)
			if !ok || f.Name != base || f.Entry != s.Value || f.End != s.Value+s.Size {
				if errs++; errs <= 10 {
					t.Errorf("FuncAt(%#x) = %+v, %v; symtab has %s size %#x", s.Value, f, ok, name, s.Size)
				}
				continue
			}
			matched++
		}
		if matched < 1000 {
			t.Errorf("only %d functions match the symbol table", matched)
		}

		// Every function's bytes, read through the sections.
		for i := range b.nfunc() {
			r, err := b.record(uint32(i))
			if err != nil {
				t.Fatal(err)
			}
			f, err := b.funcOf(r)
			if err != nil {
				t.Fatal(err)
			}
			code, err := b.Code(f)
			if err != nil {
				t.Fatal(err)
			}
			if want := sectionBytes(t, ef, f.Entry, f.End-f.Entry); !bytes.Equal(code, want) {
				t.Fatalf("Code(%s) differs from the section bytes", f.Name)
			}
		}

		for _, name := range mapFuncs {
			f, ok := b.Func(name)
			s := st.funcs[name]
			if !ok || f.Name != name || f.Entry != s.Value || f.End-f.Entry != s.Size {
				t.Errorf("Func(%s) = %+v, %v; symtab has %#x size %#x", name, f, ok, s.Value, s.Size)
				continue
			}
			if want := f.Entry - text.Addr + text.Offset; f.FileOffset != want {
				t.Errorf("%s: FileOffset %#x, want %#x", name, f.FileOffset, want)
			}
			code, err := b.Code(f)
			if err != nil {
				t.Fatal(err)
			}
			if !v.stripped {
				if want := sectionBytes(t, ef, s.Value, s.Size); !bytes.Equal(code, want) {
					t.Errorf("%s: Code differs from the symbol's bytes", name)
				}
			} else if uint64(len(code)) != s.Size {
				// Stripped builds place functions at the same addresses,
				// but data moves a little, so RIP-relative operands differ.
				t.Errorf("%s: %d bytes, twin has %d", name, len(code), s.Size)
			}
			for _, addr := range []uint64{f.Entry, f.Entry + 1, f.End - 1} {
				if g, ok := b.FuncAt(addr); !ok || g != f {
					t.Errorf("FuncAt(%#x) = %+v, %v; want %s", addr, g, ok, name)
				}
			}
			if g, ok := b.FuncAt(f.End); ok && g.Entry != f.End {
				t.Errorf("FuncAt(end of %s) = %+v", name, g)
			}
		}

		// Functions the program does not use are not linked in.
		if _, ok := st.funcs["runtime.mapassign_fast32ptr"]; ok {
			t.Fatal("target uses runtime.mapassign_fast32ptr: change the test")
		}
		for _, name := range []string{"runtime.mapassign_fast32ptr", "no.such.function", ""} {
			if f, ok := b.Func(name); ok {
				t.Errorf("Func(%q) = %+v", name, f)
			}
		}
		for _, addr := range []uint64{0, text.Addr - 1, ^uint64(0)} {
			if f, ok := b.FuncAt(addr); ok {
				t.Errorf("FuncAt(%#x) = %+v", addr, f)
			}
		}
	})
}

// TestFuncWrapped checks which of two functions sharing a name Func
// returns: the wrapped one, for assembly and for Go functions.
func TestFuncWrapped(t *testing.T) {
	tc, v := toolchains[0], variants[0]
	st := readSymtab(t, buildTarget(t, tc, v))
	b, err := Open(buildTarget(t, tc, v))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	for _, tt := range []struct {
		name string
		asm  bool
	}{
		{"runtime.reflectcall", true},
		{"runtime.asmcgocall", true},
		{"runtime.args", false},
		{"runtime.schedinit", false},
	} {
		// .symtab names the ABI0 function name.abi0 and the ABIInternal
		// one name. For assembly, ABI0 is the real function.
		name := tt.name
		real, wrapper := st.funcs[name+".abi0"], st.funcs[name]
		if !tt.asm {
			real, wrapper = wrapper, real
		}
		if real.Value == 0 || wrapper.Value == 0 {
			t.Fatalf("%s: no ABI wrapper in the symbol table", name)
		}
		if f, ok := b.Func(name); !ok || f.Entry != real.Value {
			t.Errorf("Func(%s) = %+v, %v; want the wrapped function at %#x", name, f, ok, real.Value)
		}
		if f, ok := b.FuncAt(wrapper.Value); !ok || f.Name != name {
			t.Errorf("FuncAt(wrapper of %s at %#x) = %+v, %v", name, wrapper.Value, f, ok)
		}
	}
}

// TestConcurrent uses one Binary from several goroutines; run with -race.
func TestConcurrent(t *testing.T) {
	b, err := Open(buildTarget(t, toolchains[0], variants[1]))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, name := range mapFuncs {
				f, ok := b.Func(name)
				if !ok {
					t.Errorf("%s not found", name)
					return
				}
				if g, ok := b.FuncAt(f.Entry); !ok || g != f {
					t.Errorf("FuncAt(%#x) = %+v, %v", f.Entry, g, ok)
				}
				if _, err := b.Code(f); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	wg.Wait()
}

// TestCheckPadding checks that a textStart off by a little, as .text is in
// externally linked binaries, is caught.
func TestCheckPadding(t *testing.T) {
	b, err := openFile(buildTarget(t, toolchains[0], variants[1]), false)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	start := b.textStart
	for _, delta := range []int64{-0x100, -0x20, -1, 1, 0x20, 0x100} {
		s := uint64(int64(start) + delta)
		if err := b.setTextStart(s); err != nil {
			continue // caught already
		}
		if err := b.checkPadding(); err == nil {
			t.Errorf("textStart %#x (off by %d) passes the padding check", s, delta)
		}
	}
	if err := b.setTextStart(start); err != nil {
		t.Fatal(err)
	}
	if err := b.checkPadding(); err != nil {
		t.Fatal(err)
	}
}

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	goBin, err := os.ReadFile(buildTarget(t, toolchains[0], variants[1]))
	if err != nil {
		t.Fatal(err)
	}
	arm := bytes.Clone(goBin)
	arm[18] = byte(elf.EM_AARCH64) // e_machine
	noMagic := bytes.Clone(goBin)
	ef, err := elf.NewFile(bytes.NewReader(goBin))
	if err != nil {
		t.Fatal(err)
	}
	copy(noMagic[ef.Section(".gopclntab").Offset:], "\x00\x00\x00\x00")

	for _, tt := range []struct {
		name string
		path string
		want error
	}{
		{"missing", filepath.Join(dir, "missing"), fs.ErrNotExist},
		{"empty", write("empty", nil), ErrFormat},
		{"text", write("text", []byte("#!/bin/sh\necho hello\n")), ErrFormat},
		{"truncated", write("truncated", goBin[:200]), ErrFormat},
		{"not go", write("notgo", synthELF(elf.EM_X86_64, nil, false)), ErrNotGo},
		{"arm64", write("arm64", arm), errors.ErrUnsupported},
		{"no pclntab", write("nopclntab", noMagic), ErrNotGo},
	} {
		t.Run(tt.name, func(t *testing.T) {
			b, err := Open(tt.path)
			if !errors.Is(err, tt.want) {
				t.Fatalf("Open = %v, %v; want %v", b, err, tt.want)
			}
			if !strings.HasPrefix(err.Error(), "open symbols: ") {
				t.Errorf("error %q lacks context", err)
			}
			t.Log(err)
		})
	}
}

// TestSynthetic opens a hand-made binary, whose every byte is known.
func TestSynthetic(t *testing.T) {
	p := filepath.Join(t.TempDir(), "synth")
	if err := os.WriteFile(p, synthELF(elf.EM_X86_64, synthPclntab(), true), 0o644); err != nil {
		t.Fatal(err)
	}
	b, err := Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if b.textSource != "moduledata" || b.textStart != synthText || b.GoVersion() != "go1.26.8" || b.PIE() || !b.Stripped() {
		t.Errorf("textStart %#x from %s, version %q, PIE %v, stripped %v", b.textStart, b.textSource, b.GoVersion(), b.PIE(), b.Stripped())
	}
	for _, want := range []Func{
		{"main.f", synthText, synthText + 0x10, synthTextOff},
		{"main.g", synthText + 0x20, synthText + 0x28, synthTextOff + 0x20},
	} {
		f, ok := b.Func(want.Name)
		if !ok || f != want {
			t.Errorf("Func(%s) = %+v, %v; want %+v", want.Name, f, ok, want)
		}
		code, err := b.Code(f)
		if err != nil || !bytes.Equal(code, bytes.Repeat([]byte{0x90}, int(want.End-want.Entry))) {
			t.Errorf("Code(%s) = %x, %v", want.Name, code, err)
		}
	}
	if f, ok := b.FuncAt(synthText + 0x18); ok {
		t.Errorf("FuncAt(padding) = %+v", f)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Code(Func{Name: "main.f", Entry: synthText, End: synthText + 0x10}); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Code after Close: %v", err)
	}
	if _, err := b.Code(Func{Name: "x", Entry: 1, End: 2}); err == nil {
		t.Error("Code outside the segments succeeded")
	}
}

func TestOpenSelf(t *testing.T) {
	if runtime.GOOS != "linux" || runtime.GOARCH != "amd64" {
		if _, err := OpenSelf(); !errors.Is(err, errors.ErrUnsupported) {
			t.Fatalf("OpenSelf on %s/%s: %v", runtime.GOOS, runtime.GOARCH, err)
		}
		return
	}
	b, err := OpenSelf()
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	bias := b.LoadBias()
	t.Logf("%s PIE %v stripped %v bias %#x textStart %#x from %s", b.GoVersion(), b.PIE(), b.Stripped(), bias, b.textStart, b.textSource)
	if b.Path() != "/proc/self/exe" || b.GoVersion() != runtime.Version() {
		t.Errorf("Path %q GoVersion %q", b.Path(), b.GoVersion())
	}

	// A function of the test, found by its runtime address.
	pc := uint64(reflect.ValueOf(TestOpenSelf).Pointer())
	name := runtime.FuncForPC(uintptr(pc)).Name()
	if f, ok := b.Func(name); !ok || f.Entry+bias != pc {
		t.Errorf("Func(%s) = %+v, %v; runs at %#x", name, f, ok, pc)
	}

	for _, name := range mapFuncs {
		f, ok := b.Func(name)
		if !ok {
			t.Errorf("%s not found", name)
			continue
		}
		addr := uintptr(f.Entry + bias)
		if rf := runtime.FuncForPC(addr); rf == nil || rf.Name() != name || rf.Entry() != addr {
			t.Errorf("%s: runtime has %v at %#x", name, rf, addr)
		}
		code, err := b.Code(f)
		if err != nil {
			t.Fatal(err)
		}
		if mem := readSelf(t, f.Entry+bias, len(code)); !bytes.Equal(code, mem) {
			t.Errorf("%s: file bytes differ from memory", name)
		}
	}

	// A PC inside runtime.mapassign_faststr, from the runtime's unwinder.
	pc = nilMapPanicPC(t)
	if f, ok := b.FuncAt(pc - bias); !ok || f.Name != "runtime.mapassign_faststr" {
		t.Errorf("FuncAt(%#x) = %+v, %v; want runtime.mapassign_faststr", pc-bias, f, ok)
	}
}

// TestOpenSelfCorrects checks that OpenSelf repairs a wrong textStart.
func TestOpenSelfCorrects(t *testing.T) {
	if runtime.GOOS != "linux" || runtime.GOARCH != "amd64" {
		t.Skip("needs linux/amd64")
	}
	b, err := openFile("/proc/self/exe", true)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	want := b.textStart
	// The first function then starts before .text, still in the segment.
	if err := b.setTextStart(want - 0x40); err != nil {
		t.Fatal(err)
	}
	// verifySelf exists on Linux only; the assertion keeps this file
	// compiling everywhere.
	v, ok := any(b).(interface{ verifySelf() error })
	if !ok {
		t.Skip("no verifySelf")
	}
	if err := v.verifySelf(); err != nil {
		t.Fatal(err)
	}
	if b.textStart != want || b.textSource != "anchor" {
		t.Errorf("textStart %#x from %s, want %#x from anchor", b.textStart, b.textSource, want)
	}
}

// TestSelfCheck runs testdata/selfcheck, which calls OpenSelf and checks the
// result against its running code, built every way TestOpen covers.
func TestSelfCheck(t *testing.T) {
	if runtime.GOOS != "linux" || runtime.GOARCH != "amd64" {
		t.Skip("runs linux/amd64 programs")
	}
	eachBuild(t, func(t *testing.T, tc toolchain, v variant) {
		out, err := exec.Command(buildSelfcheck(t, tc, v)).CombinedOutput()
		if err != nil || !bytes.HasPrefix(out, []byte("ok "+goVersion(t, tc)+" ")) {
			t.Fatalf("selfcheck: %v\n%s", err, out)
		}
		t.Logf("%s", bytes.TrimSpace(out))
	})
}

func readSelf(t *testing.T, addr uint64, n int) []byte {
	t.Helper()
	f, err := os.Open("/proc/self/mem")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, n)
	if _, err := f.ReadAt(buf, int64(addr)); err != nil {
		t.Fatal(err)
	}
	return buf
}

// nilMapPanicPC returns a PC in the frame of runtime.mapassign_faststr,
// taken while it panics on a nil map.
func nilMapPanicPC(t *testing.T) (pc uint64) {
	var nilMap map[string]int
	defer func() {
		recover()
		pcs := make([]uintptr, 64)
		frames := runtime.CallersFrames(pcs[:runtime.Callers(1, pcs)])
		for more := true; more; {
			var fr runtime.Frame
			fr, more = frames.Next()
			if fr.Function == "runtime.mapassign_faststr" {
				pc = uint64(fr.PC)
				return
			}
		}
		t.Fatal("runtime.mapassign_faststr not on the panic stack")
	}()
	nilMap[t.Name()] = 1
	return 0
}

// BenchmarkOpenSelf is the cost of reading the running binary's function
// table and looking up the functions a Guard probes (B/op is what it
// allocates; the table itself is read from the file, not kept).
func BenchmarkOpenSelf(b *testing.B) {
	if runtime.GOOS != "linux" || runtime.GOARCH != "amd64" {
		b.Skip("needs linux/amd64")
	}
	b.ReportAllocs()
	for b.Loop() {
		bin, err := OpenSelf()
		if err != nil {
			b.Fatal(err)
		}
		for _, name := range mapFuncs {
			if _, ok := bin.Func(name); !ok {
				b.Fatalf("%s not found", name)
			}
		}
		bin.Close()
	}
}

// TestSymbolValues finds symbols whose entries straddle the chunks
// .symtab is read in, and names that straddle .strtab's.
func TestSymbolValues(t *testing.T) {
	const nsyms = 40000 // 960 kB of symbols: four chunks
	le := binary.LittleEndian
	strtab := []byte{0}
	filler := len(strtab)
	strtab = append(strtab, "main.filler\x00"...)
	// Pad so that "runtime.text" straddles the first chunk's end.
	strtab = append(strtab, make([]byte, scanChunk-len(strtab)-5)...)
	want := map[string]uint64{"runtime.text": 0x401000, "runtime.pclntab": 0x800000, "runtime.epclntab": 0x900000}
	nameOff := map[string]int{}
	for _, n := range []string{"runtime.text", "runtime.pclntab", "runtime.epclntab"} {
		nameOff[n] = len(strtab)
		strtab = append(append(strtab, n...), 0)
	}
	symtab := make([]byte, nsyms*24)
	for i := range nsyms {
		le.PutUint32(symtab[24*i:], uint32(filler))
	}
	// Symbols cut by the first and third chunk ends, and the last one.
	for n, i := range map[string]int{"runtime.text": scanChunk / 24, "runtime.pclntab": 3 * scanChunk / 24, "runtime.epclntab": nsyms - 1} {
		le.PutUint32(symtab[24*i:], uint32(nameOff[n]))
		le.PutUint64(symtab[24*i+8:], want[n])
	}
	file := append(bytes.Clone(symtab), strtab...)
	ef := &elf.File{Sections: []*elf.Section{
		{SectionHeader: elf.SectionHeader{Type: elf.SHT_NULL}},
		{SectionHeader: elf.SectionHeader{Name: ".symtab", Type: elf.SHT_SYMTAB, Offset: 0, Size: uint64(len(symtab)), FileSize: uint64(len(symtab)), Link: 2}},
		{SectionHeader: elf.SectionHeader{Name: ".strtab", Type: elf.SHT_STRTAB, Offset: uint64(len(symtab)), Size: uint64(len(strtab)), FileSize: uint64(len(strtab))}},
	}}
	got := symbolValues(bytes.NewReader(file), ef, uint64(len(file)), "runtime.text", "runtime.pclntab", "runtime.epclntab")
	if !reflect.DeepEqual(got, want) {
		t.Errorf("symbolValues = %#v, want %#v", got, want)
	}
}

var callsToMap = map[string]int{"a": 1}

//go:noinline
func callsToRead(k string) int { return callsToMap[k] }

// CallsTo finds the direct calls of a function in the running test binary:
// every one it reports is a CALL rel32 to it in the file, in address
// order, and the call in callsToRead is among them.
func TestCallsTo(t *testing.T) {
	if runtime.GOOS != "linux" || runtime.GOARCH != "amd64" {
		t.Skip("linux/amd64 only")
	}
	_ = callsToRead("b")
	b, err := OpenSelf()
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	target, ok := b.Func("runtime.mapaccess1_faststr")
	if !ok {
		t.Fatal("no runtime.mapaccess1_faststr")
	}
	reader, ok := b.Func(runtime.FuncForPC(reflect.ValueOf(callsToRead).Pointer()).Name())
	if !ok {
		t.Fatal("callsToRead not found")
	}
	var calls []uint64
	err = b.CallsTo([]uint64{target.Entry}, func(call uint64, upto []byte) {
		if len(upto) < 5 || upto[len(upto)-5] != 0xe8 {
			t.Errorf("call at %#x: the bytes before it do not end with its CALL", call)
		}
		calls = append(calls, call)
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	inReader := false
	for i, c := range calls {
		if i > 0 && c <= calls[i-1] {
			t.Fatalf("calls out of order: %#x after %#x", c, calls[i-1])
		}
		code, err := b.Code(Func{Name: "call", Entry: c, End: c + 5})
		if err != nil {
			t.Fatal(err)
		}
		rel := int64(int32(binary.LittleEndian.Uint32(code[1:])))
		if code[0] != 0xe8 || uint64(int64(c)+5+rel) != target.Entry {
			t.Errorf("%#x: % x is not a CALL of %#x", c, code, target.Entry)
		}
		inReader = inReader || (c >= reader.Entry && c < reader.End)
	}
	if !inReader {
		t.Errorf("%d calls, none in %s (%#x-%#x)", len(calls), reader.Name, reader.Entry, reader.End)
	}
	t.Logf("%d calls of %s", len(calls), target.Name)

	// each runs after each chunk read; its error ends the scan.
	stop := errors.New("stop")
	chunks := 0
	err = b.CallsTo([]uint64{target.Entry}, func(uint64, []byte) {}, func() error { chunks++; return stop })
	if !errors.Is(err, stop) || chunks != 1 {
		t.Errorf("CallsTo with an each func that fails: %v after %d chunks, want %v after 1", err, chunks, stop)
	}
}
