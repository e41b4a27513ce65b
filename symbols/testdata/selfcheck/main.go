// Command selfcheck reads its own function table with symbols.OpenSelf and
// checks it against the running code. The symbols tests build it in several
// modes (PIE, stripped, externally linked, Go 1.25 and 1.26) and run it. It
// prints a line starting with "ok" on success and exits 1 on failure.
package main

import (
	"bytes"
	"fmt"
	"os"
	"runtime"

	"github.com/mapguard/mapguard/symbols"
)

func main() {
	b, err := symbols.OpenSelf()
	if err != nil {
		fail("%v", err)
	}
	defer b.Close()
	bias := b.LoadBias()

	// Map operations, so that the linker keeps the functions checked below.
	m := map[string]int{}
	m[os.Args[0]] = len(os.Args)
	n := map[int64]int{int64(len(os.Args)): 1}
	sink := m["x"] + n[1]

	names := []string{
		"runtime.mapassign_faststr",
		"runtime.mapaccess1_faststr",
		"runtime.mapaccess1_fast64",
		"runtime.gopanic",
		"runtime.main",
		"main.main",
	}
	for _, name := range names {
		f, ok := b.Func(name)
		if !ok {
			fail("%s not found", name)
		}
		pc := f.Entry + bias
		rf := runtime.FuncForPC(uintptr(pc))
		if rf == nil || rf.Name() != name || uint64(rf.Entry()) != pc {
			fail("%s: runtime has %v at %#x", name, rf, pc)
		}
		code, err := b.Code(f)
		if err != nil {
			fail("%s: %v", name, err)
		}
		mem, err := readMemory(pc, len(code))
		if err != nil {
			fail("%s: %v", name, err)
		}
		if !bytes.Equal(code, mem) {
			fail("%s: file bytes at %#x differ from memory at %#x", name, f.FileOffset, pc)
		}
		if g, ok := b.FuncAt(f.Entry + (f.End-f.Entry)/2); !ok || g != f {
			fail("%s: FuncAt(middle) = %+v, %v", name, g, ok)
		}
	}

	// A PC inside runtime.mapassign_faststr, from the runtime's unwinder.
	pc := nilMapPanicPC()
	if f, ok := b.FuncAt(pc - bias); !ok || f.Name != "runtime.mapassign_faststr" {
		fail("FuncAt(%#x - %#x) = %+v, %v; want runtime.mapassign_faststr", pc, bias, f, ok)
	}
	if _, ok := b.Func("runtime.mapassign_fast32ptr"); ok {
		fail("runtime.mapassign_fast32ptr found, but nothing uses it on amd64")
	}
	if b.PIE() != (bias != 0) {
		fail("PIE %v with load bias %#x", b.PIE(), bias)
	}

	f, _ := b.Func("runtime.mapassign_faststr")
	fmt.Printf("ok %s pie=%v stripped=%v bias=%#x mapassign_faststr=%#x-%#x offset=%#x sink=%d\n",
		b.GoVersion(), b.PIE(), b.Stripped(), bias, f.Entry, f.End, f.FileOffset, sink)
}

// nilMapPanicPC returns a PC in the frame of runtime.mapassign_faststr,
// taken while it panics on a nil map.
func nilMapPanicPC() (pc uint64) {
	var nilMap map[string]int
	defer func() {
		recover()
		pcs := make([]uintptr, 64)
		frames := runtime.CallersFrames(pcs[:runtime.Callers(1, pcs)])
		for {
			fr, more := frames.Next()
			if fr.Function == "runtime.mapassign_faststr" {
				pc = uint64(fr.PC)
				return
			}
			if !more {
				fail("runtime.mapassign_faststr not on the panic stack")
			}
		}
	}()
	nilMap[os.Args[0]] = 1
	return 0
}

func readMemory(addr uint64, n int) ([]byte, error) {
	f, err := os.Open("/proc/self/mem")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	buf := make([]byte, n)
	_, err = f.ReadAt(buf, int64(addr))
	return buf, err
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "selfcheck: "+format+"\n", args...)
	os.Exit(1)
}
