package symbols

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"slices"
	"sort"
	"sync"
)

var (
	// ErrNotGo is returned when a file is an ELF binary but not a Go one: it
	// has no Go build information or no Go function table.
	ErrNotGo = errors.New("not a Go binary")
	// ErrFormat is returned when a file is not a well-formed ELF file, or its
	// Go function table is malformed or inconsistent with its segments.
	ErrFormat = errors.New("malformed binary")
)

// Func is one function of a Go binary. Addresses are link-time virtual
// addresses; add [Binary.LoadBias] to get runtime addresses.
type Func struct {
	Name       string
	Entry      uint64 // link-time virtual address of the first instruction
	End        uint64 // one past the last byte of code, padding excluded
	FileOffset uint64 // offset of Entry in the ELF file: what a uprobe attaches to
}

// Binary is the function table of one Go ELF binary.
//
// A Binary is read-only once Open or OpenSelf returns, and safe for
// concurrent use. It keeps the file open for Code and for lookups, which
// read the function table from the file as they need it; Close releases it.
//
// What it holds in memory is bounded by the number of functions, about 16
// bytes each: the function table's entries and a hash of each function's
// name. Names, sizes and code are read from the file on demand.
type Binary struct {
	path      string
	file      *os.File
	goVersion string
	pie       bool
	stripped  bool
	entry     uint64 // ELF header entry point
	bias      uint64
	segs      []segment

	tab        pclntab
	textStart  uint64
	textSource string // where textStart came from, for tests and errors

	ftab   []byte   // the pclntab's function table: nfunc+1 (entry offset, _func offset) pairs
	byHash []uint64 // hash of each indexed function's name << 32 | its index, sorted
	// rest is byHash for the functions whose names are not indexed at
	// Open, built by the first lookup of such a name.
	restOnce sync.Once
	rest     []uint64 // nil if the file could not be read

	mu    sync.Mutex
	known []knownRecord // functions already read, by index

	// self is set once OpenSelf has checked the table against the running
	// code: Func then checks each function with the runtime too.
	self bool
}

// funcRecord is what a lookup reads of one function; it does not depend on
// textStart.
type funcRecord struct {
	name       string
	entry, end uint64 // offsets from textStart
	funcID     uint8
}

// segment is an executable PT_LOAD segment, clipped to its file-backed part.
type segment struct {
	vaddr, off, filesz uint64
}

// Open reads the function table of the Go binary at path. Only 64-bit
// x86-64 ELF files built by Go 1.18 or newer are supported.
//
// Errors wrap ErrNotGo for ELF files that are not Go binaries, ErrFormat for
// malformed files and errors.ErrUnsupported for other architectures and
// older function tables, as well as errors from the file system.
func Open(path string) (*Binary, error) {
	b, err := openFile(path, false)
	if err != nil {
		return nil, fmt.Errorf("open symbols: %w", err)
	}
	return b, nil
}

// Close closes the underlying file. Code fails after Close, and so do
// lookups of functions not looked up before; other methods keep working.
func (b *Binary) Close() error {
	return b.file.Close()
}

// Path returns the path the binary was opened from. For OpenSelf it is
// /proc/self/exe, which names the running executable even if it was
// replaced or deleted on disk.
func (b *Binary) Path() string { return b.path }

// GoVersion returns the version of the toolchain that built the binary, for
// example "go1.26.8".
func (b *Binary) GoVersion() string { return b.goVersion }

// PIE reports whether the binary is position-independent (ELF type ET_DYN).
func (b *Binary) PIE() bool { return b.pie }

// Stripped reports whether the binary has no .symtab section, as with
// binaries built by go test, go run or with -ldflags=-s.
func (b *Binary) Stripped() bool { return b.stripped }

// LoadBias returns the difference between runtime and link-time addresses.
// It is 0 unless the Binary came from OpenSelf and the process is PIE.
func (b *Binary) LoadBias() uint64 { return b.bias }

// Func returns the function with exactly this name, such as
// "runtime.mapassign_faststr" or "internal/runtime/maps.(*Map).growToTable".
// ok is false if the binary does not contain it; the linker drops functions a
// program never calls. If an ABI wrapper shares the name, Func returns the
// wrapped function. ok is also false if the file cannot be read and, for a
// Binary from OpenSelf, if the running program's own function table has no
// function starting at the same address. Names outside the runtime's
// packages are indexed by the first lookup of one: it reads the whole name
// table (milliseconds in a large program), which Open reads only for the
// runtime's names.
func (b *Binary) Func(name string) (f Func, ok bool) {
	nb := []byte(name)
	keys := b.byHash
	if !indexed(nb) {
		b.restOnce.Do(func() { b.rest, _ = b.hashNames(false) })
		keys = b.rest
	}
	h := uint64(nameHash(nb))
	i, _ := slices.BinarySearch(keys, h<<32)
	var bestID uint8
	for ; i < len(keys) && keys[i]>>32 == h; i++ {
		r, err := b.record(uint32(keys[i]))
		if err != nil || r.name != name {
			continue
		}
		// The wrapper of an ABI0/ABIInternal pair has the same name and
		// funcID FuncIDWrapper, always the largest FuncID: prefer the
		// smaller one, which is the wrapped function. Between two
		// wrappers, prefer the larger: ABI wrappers are small trampolines.
		g, err := b.funcOf(r)
		if err != nil {
			continue
		}
		if !ok || r.funcID < bestID || (r.funcID == bestID && g.End-g.Entry > f.End-f.Entry) {
			f, bestID, ok = g, r.funcID, true
		}
	}
	if ok && b.self && !runtimeHasEntry(f.Entry+b.bias) {
		return Func{}, false
	}
	return f, ok
}

// runtimeHasEntry reports whether the running program's own function
// table has a function starting at pc. (Its name for pc is that of inlined
// code if the function starts with some, so names are not compared.)
func runtimeHasEntry(pc uint64) bool {
	rf := runtime.FuncForPC(uintptr(pc))
	return rf != nil && uint64(rf.Entry()) == pc
}

// FuncAt returns the function whose code contains the link-time address
// addr, that is Entry <= addr < End. ok is false for addresses outside
// functions, including the padding between them, and if the file cannot be
// read.
func (b *Binary) FuncAt(addr uint64) (f Func, ok bool) {
	if addr < b.textStart || addr-b.textStart >= 1<<32 {
		return Func{}, false
	}
	rel := addr - b.textStart
	n := b.nfunc()
	i := sort.Search(n, func(i int) bool { return b.entryOff(i) > rel }) - 1
	if i < 0 {
		return Func{}, false
	}
	r, err := b.record(uint32(i))
	if err != nil || rel >= r.end {
		return Func{}, false
	}
	f, err = b.funcOf(r)
	return f, err == nil
}

// Code returns the bytes of f, from Entry to End, read from the file. It
// never reads memory, so uprobes already attached do not show. It is safe to
// call concurrently.
func (b *Binary) Code(f Func) ([]byte, error) {
	if f.End < f.Entry {
		return nil, fmt.Errorf("read code of %s: end %#x before entry %#x", f.Name, f.End, f.Entry)
	}
	size := f.End - f.Entry
	off, ok := b.fileOffset(f.Entry, size)
	if !ok {
		return nil, fmt.Errorf("read code of %s: %#x-%#x is outside the executable segments", f.Name, f.Entry, f.End)
	}
	buf := make([]byte, size)
	if _, err := b.file.ReadAt(buf, int64(off)); err != nil {
		return nil, fmt.Errorf("read code of %s: %w", f.Name, err)
	}
	return buf, nil
}

// fileOffset maps [vaddr, vaddr+size) to a file offset, if the range lies in
// the file-backed part of one executable segment.
func (b *Binary) fileOffset(vaddr, size uint64) (uint64, bool) {
	for _, s := range b.segs {
		if vaddr < s.vaddr {
			continue
		}
		rel := vaddr - s.vaddr
		if rel <= s.filesz && size <= s.filesz-rel {
			return s.off + rel, true
		}
	}
	return 0, false
}

// CallsTo calls fn with the address (link-time) of every direct call
// (CALL rel32, opcode 0xE8) in the executable segments whose target is one
// of targets, in address order, and with the bytes read before it, up to
// the call's end (from the start of the chunk read; at most 1 MiB, valid
// only during the call). It scans the bytes, not decoded code: an 0xE8
// inside another instruction whose next four bytes happen to point at a
// target is reported too, so callers must decode the function around each
// address before they trust it. The file is read in 1 MiB chunks; after
// each, each (if not nil) is called, and an error it returns ends the
// scan and is returned: a caller paces a long scan, or stops it, so.
func (b *Binary) CallsTo(targets []uint64, fn func(call uint64, upto []byte), each func() error) error {
	if len(targets) == 0 {
		return nil
	}
	lo, hi := slices.Min(targets), slices.Max(targets)
	const chunk = 1 << 20
	buf := make([]byte, chunk+4)
	for _, s := range b.segs {
		for off := uint64(0); off < s.filesz; off += chunk {
			n := min(chunk+4, s.filesz-off)
			p := buf[:n]
			if _, err := b.file.ReadAt(p, int64(s.off+off)); err != nil {
				return fmt.Errorf("scan calls: %w", err)
			}
			for i := 0; i+5 <= len(p) && uint64(i) < chunk; {
				j := bytes.IndexByte(p[i:], 0xe8)
				if j < 0 {
					break
				}
				i += j
				if i+5 > len(p) || uint64(i) >= chunk {
					break
				}
				at := s.vaddr + off + uint64(i)
				rel := int64(int32(binary.LittleEndian.Uint32(p[i+1:])))
				t := uint64(int64(at) + 5 + rel)
				if t >= lo && t <= hi && slices.Contains(targets, t) {
					fn(at, p[:i+5])
				}
				i++
			}
			if each != nil {
				if err := each(); err != nil {
					return err
				}
			}
		}
	}
	return nil
}
