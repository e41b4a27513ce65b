//go:build linux

package symbols

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"reflect"
	"runtime"
)

const selfPath = "/proc/self/exe"

// OpenSelf reads the function table of the running executable, through
// /proc/self/exe.
//
// Unlike Open, it checks the table against the running code: the load bias
// comes from the kernel's AT_ENTRY, and a function of this package, found
// both by name in the table and by its runtime address, must match in
// address and bytes; the base of the table is corrected if it does not.
// The entries of a few functions spread over the table, and the names of
// a few, are then checked with runtime.FuncForPC; so is the entry of every
// function Func returns.
//
// Errors wrap those of Open. On systems other than Linux, OpenSelf returns
// an error wrapping errors.ErrUnsupported.
func OpenSelf() (*Binary, error) {
	b, err := openFile(selfPath, true)
	if err != nil {
		return nil, fmt.Errorf("open self: %w", err)
	}
	if err := b.verifySelf(); err != nil {
		b.Close()
		return nil, fmt.Errorf("open self: %w", err)
	}
	return b, nil
}

// anchor is a function with a known runtime address, reflect.ValueOf(anchor).
//
//go:noinline
func anchor() int { return 0x5eed }

// selfSamples is how many functions, spread over the table, verifySelf
// checks against the runtime, besides the functions looked up. Each check
// faults in pages of the runtime's own copy of the table (64 kB with the
// kernel's fault-around), which stay resident: checking all the entries
// kept 8 MB more resident in a 95 MB program, checking 256 did too.
const selfSamples = 8

// verifySelf sets the load bias and checks the table against the running
// code, correcting textStart if needed.
func (b *Binary) verifySelf() error {
	atEntry, err := auxvEntry()
	if err != nil {
		return err
	}
	b.bias = atEntry - b.entry
	if !b.pie && b.bias != 0 {
		return fmt.Errorf("check load bias: non-PIE binary loaded at %#x, linked at %#x", atEntry, b.entry)
	}

	pc := uint64(reflect.ValueOf(anchor).Pointer())
	rf := runtime.FuncForPC(uintptr(pc))
	if rf == nil || uint64(rf.Entry()) != pc {
		return fmt.Errorf("check anchor: runtime does not know %#x as a function entry", pc)
	}
	name := rf.Name()
	// By address first: the name index holds only the runtime's names
	// (reading the rest costs milliseconds in a large program).
	f, ok := b.FuncAt(pc - b.bias)
	if !ok || f.Name != name || f.Entry+b.bias != pc {
		if f, ok = b.Func(name); !ok {
			return fmt.Errorf("check anchor: %s not in function table", name)
		}
	}
	if f.Entry+b.bias != pc {
		// The table's base is off, as with a stripped, externally linked
		// binary whose moduledata was not found: shift it so the anchor
		// lands where it runs.
		old := b.textStart
		start := b.textStart + (pc - b.bias - f.Entry)
		if err := b.setTextStart(start); err != nil {
			return fmt.Errorf("correct textStart from %#x to %#x: %w", old, start, err)
		}
		b.textSource = "anchor"
		if f, ok = b.Func(name); !ok || f.Entry+b.bias != pc {
			return fmt.Errorf("check anchor: %s at %#x+%#x after correction, runs at %#x", name, f.Entry, b.bias, pc)
		}
		if err := b.checkPadding(); err != nil {
			return fmt.Errorf("check corrected textStart %#x: %w", start, err)
		}
	}

	// Bytes at the file offset must be the running code: this catches a
	// wrong load bias that the correction above would have absorbed.
	code, err := b.Code(f)
	if err != nil {
		return fmt.Errorf("check anchor: %w", err)
	}
	mem, err := readMemory(pc, len(code))
	if err != nil {
		return fmt.Errorf("check anchor: %w", err)
	}
	if !bytes.Equal(code, mem) {
		return fmt.Errorf("check anchor: code of %s at file offset %#x differs from memory at %#x", name, f.FileOffset, pc)
	}

	// The runtime reads the same table with its own base: entries must
	// agree (Func checks the entry of every function it returns the same
	// way), and a few names too. Names are only compared for functions
	// whose first instruction is not inlined code.
	n := b.nfunc()
	for k := 0; k <= selfSamples; k++ {
		i := min(k*n/selfSamples, n-1)
		addr := uintptr(b.textStart + b.entryOff(i) + b.bias)
		if rf := runtime.FuncForPC(addr); rf == nil || rf.Entry() != addr {
			return fmt.Errorf("check function %d of %d: runtime has no function at %#x", i, n, addr)
		}
	}
	for _, n := range []string{"runtime.main", "runtime.goexit"} {
		f, ok := b.Func(n)
		if !ok {
			return fmt.Errorf("check %s: not in function table", n)
		}
		if rf := runtime.FuncForPC(uintptr(f.Entry + b.bias)); rf == nil || rf.Name() != n {
			return fmt.Errorf("check %s: runtime names %#x %s", n, f.Entry+b.bias, rf.Name())
		}
	}
	b.self = true
	return nil
}

// auxvEntry returns AT_ENTRY, the runtime address of the ELF entry point.
func auxvEntry() (uint64, error) {
	const atEntry = 9
	auxv, err := os.ReadFile("/proc/self/auxv")
	if err != nil {
		return 0, fmt.Errorf("read auxiliary vector: %w", err)
	}
	for i := 0; i+16 <= len(auxv); i += 16 {
		if binary.LittleEndian.Uint64(auxv[i:]) == atEntry {
			return binary.LittleEndian.Uint64(auxv[i+8:]), nil
		}
	}
	return 0, errors.New("read auxiliary vector: no AT_ENTRY")
}

// readMemory reads n bytes of this process's memory at addr. It goes
// through /proc/self/mem rather than unsafe, so a bad address is an error.
func readMemory(addr uint64, n int) ([]byte, error) {
	f, err := os.Open("/proc/self/mem")
	if err != nil {
		return nil, fmt.Errorf("read memory: %w", err)
	}
	defer f.Close()
	buf := make([]byte, n)
	if _, err := f.ReadAt(buf, int64(addr)); err != nil {
		return nil, fmt.Errorf("read memory at %#x: %w", addr, err)
	}
	return buf, nil
}
