package symbols

import (
	"bytes"
	"debug/buildinfo"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
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
	byHash []uint64 // hash of each function's name << 32 | its index, sorted

	mu    sync.Mutex
	known map[uint32]funcRecord // functions already read, by index

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
// function starting at the same address.
func (b *Binary) Func(name string) (f Func, ok bool) {
	h := uint64(nameHash([]byte(name)))
	i, _ := slices.BinarySearch(b.byHash, h<<32)
	var bestID uint8
	for ; i < len(b.byHash) && b.byHash[i]>>32 == h; i++ {
		r, err := b.record(uint32(b.byHash[i]))
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

// openFile opens and indexes path. If trustSection is set and no base for
// textStart passes the checks, the start of .text is used anyway: OpenSelf
// then corrects it against the running code.
func openFile(path string, trustSection bool) (b *Binary, err error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			f.Close()
		}
	}()
	// debug/elf and debug/buildinfo read untrusted data; turn any panic of
	// theirs into an error.
	defer func() {
		if r := recover(); r != nil {
			b, err = nil, fmt.Errorf("parse %s: %w: panic: %v", path, ErrFormat, r)
		}
	}()

	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	ef, err := elf.NewFile(f)
	if err != nil {
		return nil, fmt.Errorf("parse ELF %s: %w: %w", path, ErrFormat, err)
	}
	if ef.Class != elf.ELFCLASS64 || ef.Machine != elf.EM_X86_64 {
		return nil, fmt.Errorf("parse ELF %s: %v %v: %w", path, ef.Class, ef.Machine, errors.ErrUnsupported)
	}
	if ef.Type != elf.ET_EXEC && ef.Type != elf.ET_DYN {
		return nil, fmt.Errorf("parse ELF %s: type %v is not an executable: %w", path, ef.Type, ErrFormat)
	}

	b = &Binary{
		path:     path,
		file:     f,
		pie:      ef.Type == elf.ET_DYN,
		stripped: ef.SectionByType(elf.SHT_SYMTAB) == nil,
		entry:    ef.Entry,
		known:    map[uint32]funcRecord{},
	}
	size := uint64(st.Size())
	for _, p := range ef.Progs {
		if p.Type != elf.PT_LOAD || p.Flags&elf.PF_X == 0 {
			continue
		}
		// Segments reaching past the end of the file are malformed;
		// ignoring them makes any function inside fail the checks below.
		if p.Off > size || p.Filesz > size-p.Off {
			continue
		}
		b.segs = append(b.segs, segment{p.Vaddr, p.Off, p.Filesz})
	}

	bi, err := buildinfo.Read(f)
	if err != nil {
		return nil, fmt.Errorf("read build info of %s: %w: %w", path, ErrNotGo, err)
	}
	b.goVersion = bi.GoVersion

	// Only three symbols are wanted: read .symtab in passes of bounded
	// memory rather than decode all of it. A broken .symtab only costs
	// these shortcuts.
	var syms map[string]uint64
	if !b.stripped {
		syms = symbolValues(f, ef, size, "runtime.text", "runtime.pclntab", "runtime.epclntab")
	}
	tab, err := findPclntab(f, ef, syms, size)
	if err != nil {
		return nil, fmt.Errorf("find function table in %s: %w", path, err)
	}
	b.tab = *tab
	if len(b.segs) == 0 {
		return nil, fmt.Errorf("parse ELF %s: no executable segment: %w", path, ErrFormat)
	}
	if err := b.index(); err != nil {
		return nil, fmt.Errorf("index functions of %s: %w", path, err)
	}

	cands := textStartCandidates(f, ef, syms, tab, size)
	var errs []error
	for _, c := range cands {
		err := b.setTextStart(c.addr)
		if err == nil && c.source != "symtab" {
			err = b.checkPadding()
		}
		if err == nil {
			b.textSource = c.source
			return b, nil
		}
		errs = append(errs, fmt.Errorf("textStart %#x from %s: %w", c.addr, c.source, err))
	}
	if trustSection && len(cands) > 0 {
		c := cands[len(cands)-1]
		if err := b.setTextStart(c.addr); err == nil {
			b.textSource = c.source + " (unverified)"
			return b, nil
		}
	}
	if len(errs) == 0 {
		errs = append(errs, errors.New("no candidate for textStart"))
	}
	return nil, fmt.Errorf("index functions of %s: %w", path, errors.Join(errs...))
}

type candidate struct {
	addr   uint64
	source string
}

// textStartCandidates lists the possible values of runtime.text, the base of
// function entries, most reliable first.
func textStartCandidates(r io.ReaderAt, ef *elf.File, syms map[string]uint64, tab *pclntab, size uint64) []candidate {
	var cands []candidate
	if v, ok := syms["runtime.text"]; ok {
		cands = append(cands, candidate{v, "symtab"})
	}
	if text, ok := moduledataText(r, ef, tab, size); ok {
		cands = append(cands, candidate{text, "moduledata"})
	}
	// Go 1.18 to 1.25 store runtime.text in the header; 1.26 stores 0.
	if tab.hdr.textStart != 0 {
		cands = append(cands, candidate{tab.hdr.textStart, "pcheader"})
	}
	if s := ef.Section(".text"); s != nil {
		cands = append(cands, candidate{s.Addr, "section"})
	}
	return cands
}

// moduledataText finds runtime.firstmoduledata, the runtime's own record of
// the module layout, by its pointers to the pclntab, and returns its text
// field. This is the address the runtime itself adds to function entries.
func moduledataText(r io.ReaderAt, ef *elf.File, tab *pclntab, size uint64) (uint64, bool) {
	if tab.addr == 0 {
		return 0, false
	}
	// Offsets in moduledata, unchanged from Go 1.18 to 1.27: pcHeader,
	// funcnametab, cutab, filetab, pctab, pclntable, ftab (slices of 24
	// bytes), findfunctab, minpc, maxpc, text.
	const (
		offFuncnametab = 8
		offFtab        = 8 + 5*24
		offMinpc       = 8 + 6*24 + 8
		offText        = offMinpc + 16
	)
	want0 := tab.addr
	want1 := tab.addr + tab.hdr.funcnameOff
	wantFtab := tab.addr + tab.hdr.pclnOff
	le := binary.LittleEndian
	// Go 1.26 has a section of its own; older versions keep it in
	// .noptrdata. Others are a fallback for unusual linkers.
	for _, name := range []string{".go.module", ".noptrdata", ".data.rel.ro", ".data"} {
		s := ef.Section(name)
		if s == nil || s.Type != elf.SHT_PROGBITS {
			continue
		}
		var text uint64
		scanSection(r, s, size, offText+8, func(d []byte, _ uint64) bool {
			for i := 0; i+offText+8 <= len(d); i += 8 {
				if le.Uint64(d[i:]) != want0 || le.Uint64(d[i+offFuncnametab:]) != want1 || le.Uint64(d[i+offFtab:]) != wantFtab {
					continue
				}
				t, minpc := le.Uint64(d[i+offText:]), le.Uint64(d[i+offMinpc:])
				if t != 0 && t <= minpc {
					text = t
					return true
				}
			}
			return false
		})
		if text != 0 {
			return text, true
		}
	}
	return 0, false
}

// scanChunk is the size of the buffer sections are scanned through.
const scanChunk = 256 << 10

// scanSection calls fn with the section's file-backed bytes, in chunks of
// at most scanChunk bytes that overlap by overlap bytes, so that a record
// of that size is whole in one of them. Chunks start at multiples of 8
// from the section's start; off is the chunk's offset in the section. It
// stops when fn returns true, or at a read error.
func scanSection(r io.ReaderAt, s *elf.Section, fileSize uint64, overlap int, fn func(d []byte, off uint64) bool) {
	if s.Type == elf.SHT_NOBITS || s.Offset > fileSize || s.FileSize > fileSize-s.Offset {
		return
	}
	step := uint64(scanChunk-overlap) &^ 7
	buf := make([]byte, scanChunk)
	for off := uint64(0); off < s.FileSize; off += step {
		d := buf[:min(uint64(scanChunk), s.FileSize-off)]
		if _, err := r.ReadAt(d, int64(s.Offset+off)); err != nil {
			return
		}
		if fn(d, off) || off+uint64(len(d)) == s.FileSize {
			return
		}
	}
}

// symbolValues returns the values of the named symbols in .symtab. It
// finds the names in the string table first, then the symbols pointing at
// them, each in one pass through a buffer of bounded size.
func symbolValues(r io.ReaderAt, ef *elf.File, fileSize uint64, names ...string) map[string]uint64 {
	symtab := ef.SectionByType(elf.SHT_SYMTAB)
	if symtab == nil || symtab.Link == 0 || int(symtab.Link) >= len(ef.Sections) {
		return nil
	}
	strtab := ef.Sections[symtab.Link]
	longest := 0
	for _, n := range names {
		longest = max(longest, len(n)+2)
	}
	byOff := map[uint64]string{}
	scanSection(r, strtab, fileSize, longest, func(d []byte, off uint64) bool {
		for _, n := range names {
			pat := "\x00" + n + "\x00"
			for i := 0; ; {
				j := bytes.Index(d[i:], []byte(pat))
				if j < 0 {
					break
				}
				byOff[off+uint64(i+j+1)] = n
				i += j + 1
			}
		}
		return false
	})
	if len(byOff) == 0 {
		return nil
	}
	const symSize = 24 // Elf64_Sym
	vals := map[string]uint64{}
	le := binary.LittleEndian
	scanSection(r, symtab, fileSize, symSize, func(d []byte, off uint64) bool {
		// Chunks start at multiples of 8; symbols at multiples of 24. A
		// symbol cut at a chunk's end is whole in the next one.
		i := int((symSize - off%symSize) % symSize)
		for ; i+symSize <= len(d); i += symSize {
			if n, ok := byOff[uint64(le.Uint32(d[i:]))]; ok {
				if _, dup := vals[n]; !dup {
					vals[n] = le.Uint64(d[i+8:])
				}
			}
		}
		return len(vals) == len(names)
	})
	return vals
}

// index reads the function table and hashes every function's name. It
// checks that entries are in order.
func (b *Binary) index() error {
	h := b.tab.hdr
	ftab, err := b.readTab(h.pclnOff, (2*h.nfunc+1)*4)
	if err != nil {
		return err
	}
	b.ftab = ftab
	le := binary.LittleEndian
	funcs := window{r: b.file, start: b.tab.off, end: b.tab.off + b.tab.size}
	names := window{r: b.file, start: b.tab.off, end: b.tab.off + b.tab.size}
	keys := make([]uint64, h.nfunc)
	prev := uint64(0)
	for i := range keys {
		entry := uint64(le.Uint32(ftab[8*i:]))
		if entry < prev {
			return fmt.Errorf("%w: function %d at %#x out of order", ErrFormat, i, entry)
		}
		prev = entry
		d, err := funcs.at(h.pclnOff+uint64(le.Uint32(ftab[8*i+4:])), 8)
		if err != nil {
			return err
		}
		if uint64(le.Uint32(d)) != entry {
			return fmt.Errorf("%w: function %d: entry %#x in the table, %#x in its record", ErrFormat, i, entry, le.Uint32(d))
		}
		name, err := names.cstring(h.funcnameOff + uint64(le.Uint32(d[4:])))
		if err != nil {
			return err
		}
		keys[i] = uint64(nameHash(name))<<32 | uint64(i)
	}
	if uint64(le.Uint32(ftab[8*h.nfunc:])) < prev {
		return fmt.Errorf("%w: end of text before the last function", ErrFormat)
	}
	slices.Sort(keys)
	b.byHash = keys
	return nil
}

// nameHash is FNV-1a, 32 bits.
func nameHash(name []byte) uint32 {
	h := uint32(2166136261)
	for _, c := range name {
		h ^= uint32(c)
		h *= 16777619
	}
	return h
}

func (b *Binary) nfunc() int { return int(b.tab.hdr.nfunc) }

// entryOff is the entry of function i, or the end of text for nfunc, as
// an offset from textStart.
func (b *Binary) entryOff(i int) uint64 {
	return uint64(binary.LittleEndian.Uint32(b.ftab[8*i:]))
}

// setTextStart makes textStart the base of function entries. It fails if
// any function would lie outside the executable segments.
func (b *Binary) setTextStart(textStart uint64) error {
	n := b.nfunc()
	for i := 0; i < n; i++ {
		entry, next := textStart+b.entryOff(i), textStart+b.entryOff(i+1)
		if _, ok := b.fileOffset(entry, next-entry); ok {
			continue
		}
		// Up to the next entry includes the padding; the function's own
		// bytes may end a segment.
		r, err := b.record(uint32(i))
		if err != nil {
			return err
		}
		if _, ok := b.fileOffset(entry, r.end-r.entry); !ok {
			return fmt.Errorf("%w: function %s at %#x-%#x is outside the executable segments", ErrFormat, r.name, entry, textStart+r.end)
		}
	}
	b.textStart = textStart
	return nil
}

// record reads function i: its name, funcID and exact size, from the SP
// delta table's end (it covers exactly the function's code). Without one
// the function ends at the next entry. Records are kept once read.
func (b *Binary) record(i uint32) (funcRecord, error) {
	b.mu.Lock()
	r, ok := b.known[i]
	b.mu.Unlock()
	if ok {
		return r, nil
	}
	if int(i) >= b.nfunc() {
		return funcRecord{}, fmt.Errorf("%w: no function %d", ErrFormat, i)
	}
	const (
		funcSize  = 44 // fixed part of runtime._func
		offName   = 4
		offPcsp   = 16
		offFuncID = 40
	)
	le := binary.LittleEndian
	h := b.tab.hdr
	d, err := b.readTab(h.pclnOff+uint64(le.Uint32(b.ftab[8*i+4:])), funcSize)
	if err != nil {
		return funcRecord{}, err
	}
	r = funcRecord{entry: b.entryOff(int(i)), end: b.entryOff(int(i) + 1), funcID: d[offFuncID]}
	if pcsp := uint64(le.Uint32(d[offPcsp:])); pcsp != 0 {
		if s := b.pcvalueEnd(h.pctabOff + pcsp); s != 0 && s <= r.end-r.entry {
			r.end = r.entry + s
		}
	}
	name, err := b.cstring(h.funcnameOff + uint64(le.Uint32(d[offName:])))
	if err != nil {
		return funcRecord{}, err
	}
	r.name = string(name)
	b.mu.Lock()
	b.known[i] = r
	b.mu.Unlock()
	return r, nil
}

// funcOf places a record at textStart.
func (b *Binary) funcOf(r funcRecord) (Func, error) {
	f := Func{Name: r.name, Entry: b.textStart + r.entry, End: b.textStart + r.end}
	off, ok := b.fileOffset(f.Entry, f.End-f.Entry)
	if !ok {
		return Func{}, fmt.Errorf("%w: function %s at %#x-%#x is outside the executable segments", ErrFormat, f.Name, f.Entry, f.End)
	}
	f.FileOffset = off
	return f, nil
}

// checkPadding checks textStart: the linker fills the gaps between amd64
// functions with int3, and code does not start with int3. With a wrong
// base, gaps would hold code or entries int3. A few exceptions, such as
// runtime.breakpoint, are tolerated. The check needs exact function sizes,
// so it passes for tables without them.
func (b *Binary) checkPadding() error {
	const (
		samples = 64
		tries   = 16 * samples // bounds the reads for tables without gaps
	)
	checked, bad := 0, 0
	var buf []byte
	for i := 0; i+1 < b.nfunc() && i < tries && checked < samples; i++ {
		r, err := b.record(uint32(i))
		if err != nil {
			return err
		}
		next, err := b.record(uint32(i + 1))
		if err != nil {
			return err
		}
		if next.entry <= r.end || next.entry-r.end > 64 || next.end == next.entry {
			continue
		}
		// The gap and the first byte of the next function.
		n := next.entry - r.end + 1
		off, ok := b.fileOffset(b.textStart+r.end, n)
		if !ok {
			continue
		}
		buf = append(buf[:0], make([]byte, n)...)
		if _, err := b.file.ReadAt(buf, int64(off)); err != nil {
			return fmt.Errorf("read padding after %s: %w", r.name, err)
		}
		checked++
		if len(bytes.Trim(buf[:n-1], "\xcc")) != 0 || buf[n-1] == 0xcc {
			bad++
		}
	}
	if bad*4 > checked {
		return fmt.Errorf("%w: %d of %d gaps between functions are not int3 padding", ErrFormat, bad, checked)
	}
	return nil
}

// pclntab is where the Go 1.18+ function table is in the file.
type pclntab struct {
	off, size uint64 // in the file
	addr      uint64 // link-time address of the table, 0 if unknown
	hdr       pcHeader
}

// pcHeader is the Go 1.18+ header of .gopclntab, in runtime/symtab.go.
type pcHeader struct {
	quantum     uint64
	nfunc       uint64
	textStart   uint64 // 0 since Go 1.26
	funcnameOff uint64
	pctabOff    uint64
	pclnOff     uint64
}

// pcHeaderSize is the size of the Go 1.18+ header: a magic word and eight
// words.
const pcHeaderSize = 8 + 8*8

// findPclntab locates the Go function table. It is usually the .gopclntab
// section; PIE binaries of Go 1.25 and older name it .data.rel.ro.gopclntab,
// or, when externally linked, merge it into .data.rel.ro.
func findPclntab(r io.ReaderAt, ef *elf.File, syms map[string]uint64, size uint64) (*pclntab, error) {
	for _, name := range []string{".gopclntab", ".data.rel.ro.gopclntab"} {
		s := ef.Section(name)
		if s == nil || s.Type == elf.SHT_NOBITS {
			continue
		}
		if s.Offset > size || s.FileSize > size-s.Offset {
			return nil, fmt.Errorf("read %s: %w: section is not in the file", name, ErrFormat)
		}
		return parsePclntab(r, s.Offset, s.FileSize, s.Addr)
	}

	start, end := syms["runtime.pclntab"], syms["runtime.epclntab"]
	if start != 0 && end > start {
		for _, s := range ef.Sections {
			if s.Type != elf.SHT_PROGBITS || start < s.Addr || end-s.Addr > s.Size || end-s.Addr > s.FileSize {
				continue
			}
			if s.Offset > size || s.FileSize > size-s.Offset {
				return nil, fmt.Errorf("read %s: %w: section is not in the file", s.Name, ErrFormat)
			}
			return parsePclntab(r, s.Offset+start-s.Addr, end-start, start)
		}
	}

	// Stripped: look for the header in the read-only data.
	for _, s := range ef.Sections {
		if s.Type != elf.SHT_PROGBITS || s.Flags&elf.SHF_ALLOC == 0 || s.Flags&elf.SHF_EXECINSTR != 0 {
			continue
		}
		var tab *pclntab
		scanSection(r, s, size, 8, func(d []byte, off uint64) bool {
			for i := 0; i+8 <= len(d); i += 8 {
				if !isPclntabMagic(d[i:]) {
					continue
				}
				at := off + uint64(i)
				if t, err := parsePclntab(r, s.Offset+at, s.FileSize-at, s.Addr+at); err == nil {
					tab = t
					return true
				}
			}
			return false
		})
		if tab != nil {
			return tab, nil
		}
	}
	return nil, ErrNotGo
}

func isPclntabMagic(d []byte) bool {
	if len(d) < 8 || d[4] != 0 || d[5] != 0 || d[6] != 1 || d[7] != 8 {
		return false
	}
	switch binary.LittleEndian.Uint32(d) {
	case 0xfffffffb, 0xfffffffa, 0xfffffff0, 0xfffffff1:
		return true
	}
	return false
}

// parsePclntab reads and checks the header of the table at file offset off,
// size bytes long, at link-time address addr: nothing is allocated or read
// according to it before it is known to fit.
func parsePclntab(r io.ReaderAt, off, size, addr uint64) (*pclntab, error) {
	d := make([]byte, min(size, pcHeaderSize))
	if _, err := r.ReadAt(d, int64(off)); err != nil {
		return nil, fmt.Errorf("%w: read pclntab header: %w", ErrFormat, err)
	}
	if len(d) < 16 || d[4] != 0 || d[5] != 0 || d[7] != 8 || (d[6] != 1 && d[6] != 2 && d[6] != 4) {
		return nil, fmt.Errorf("%w: bad pclntab header", ErrNotGo)
	}
	le := binary.LittleEndian
	switch magic := le.Uint32(d); magic {
	case 0xfffffff0, 0xfffffff1:
	case 0xfffffffb, 0xfffffffa:
		return nil, fmt.Errorf("pclntab of Go 1.17 or older (magic %#x): %w", magic, errors.ErrUnsupported)
	default:
		return nil, fmt.Errorf("%w: unknown pclntab magic %#x", ErrNotGo, magic)
	}
	if len(d) < pcHeaderSize {
		return nil, fmt.Errorf("%w: pclntab header truncated", ErrFormat)
	}
	word := func(i int) uint64 { return le.Uint64(d[8+8*i:]) }
	t := &pclntab{off: off, size: size, addr: addr, hdr: pcHeader{
		quantum:     uint64(d[6]),
		nfunc:       word(0),
		textStart:   word(2),
		funcnameOff: word(3),
		pctabOff:    word(6),
		pclnOff:     word(7),
	}}
	h := t.hdr
	// Function indexes must fit in 31 bits; a table that large would be
	// gigabytes.
	if h.nfunc == 0 || h.nfunc >= 1<<31 || h.nfunc > size || h.pclnOff > size || (2*h.nfunc+1)*4 > size-h.pclnOff ||
		h.funcnameOff > size || h.pctabOff > size {
		return nil, fmt.Errorf("%w: pclntab function table out of bounds", ErrFormat)
	}
	return t, nil
}

// readTab reads n bytes at offset off of the function table.
func (b *Binary) readTab(off, n uint64) ([]byte, error) {
	if off > b.tab.size || n > b.tab.size-off {
		return nil, fmt.Errorf("%w: pclntab offset %#x+%#x out of bounds", ErrFormat, off, n)
	}
	d := make([]byte, n)
	if _, err := b.file.ReadAt(d, int64(b.tab.off+off)); err != nil {
		return nil, fmt.Errorf("%w: read pclntab: %w", ErrFormat, err)
	}
	return d, nil
}

// maxName bounds a function name; generic instantiations make long ones.
const maxName = 64 << 10

// cstring reads the NUL-terminated string at offset off of the function
// table.
func (b *Binary) cstring(off uint64) ([]byte, error) {
	for n := uint64(128); ; n *= 8 {
		if off > b.tab.size {
			break
		}
		n = min(n, b.tab.size-off, maxName)
		d, err := b.readTab(off, n)
		if err != nil {
			return nil, err
		}
		if i := bytes.IndexByte(d, 0); i >= 0 {
			return d[:i], nil
		}
		if n == b.tab.size-off || n == maxName {
			break
		}
	}
	return nil, fmt.Errorf("%w: pclntab string at %#x not terminated", ErrFormat, off)
}

// pcvalueEnd returns the PC offset where the pc-value table at offset off
// of the function table ends. The linker ends every such table at the
// function's size (cmd/internal/obj/pcln.go). It returns 0 if the table
// does not decode.
func (b *Binary) pcvalueEnd(off uint64) uint64 {
	for n := uint64(64); off < b.tab.size; n *= 8 {
		n = min(n, b.tab.size-off)
		d, err := b.readTab(off, n)
		if err != nil {
			return 0
		}
		end, short := pcvalueEnd(d, b.tab.hdr.quantum)
		if !short || n == b.tab.size-off || n >= 1<<20 {
			return end
		}
	}
	return 0
}

// pcvalueEnd decodes the pc-value table at the start of p. short is set if
// p ends before the table does.
func pcvalueEnd(p []byte, quantum uint64) (end uint64, short bool) {
	var pc uint64
	for first := true; ; first = false {
		vdelta, n := binary.Uvarint(p)
		if n <= 0 {
			return 0, n == 0
		}
		p = p[n:]
		if vdelta == 0 && !first {
			return pc, false
		}
		pcdelta, n := binary.Uvarint(p)
		if n <= 0 || pcdelta > 1<<32 {
			return 0, n == 0
		}
		p = p[n:]
		pc += pcdelta * quantum
		if pc > 1<<32 {
			return 0, false
		}
	}
}

// window reads [start, end) of a file through one buffer: a pass that
// moves forward through a large table reads it in large pieces, and holds
// one piece in memory.
type window struct {
	r          io.ReaderAt
	start, end uint64 // in the file
	base       uint64 // offset of buf from start
	buf        []byte
}

const windowSize = 256 << 10

// at returns n <= windowSize bytes at offset off from the window's start.
func (w *window) at(off, n uint64) ([]byte, error) {
	if off >= w.base && off+n <= w.base+uint64(len(w.buf)) && off+n >= off {
		return w.buf[off-w.base : off-w.base+n], nil
	}
	if err := w.fill(off); err != nil {
		return nil, err
	}
	if n > uint64(len(w.buf)) {
		return nil, fmt.Errorf("%w: pclntab offset %#x+%#x out of bounds", ErrFormat, off, n)
	}
	return w.buf[:n], nil
}

// cstring returns the NUL-terminated string at offset off, without the
// NUL, shorter than windowSize.
func (w *window) cstring(off uint64) ([]byte, error) {
	if off >= w.base && off < w.base+uint64(len(w.buf)) {
		if i := bytes.IndexByte(w.buf[off-w.base:], 0); i >= 0 {
			return w.buf[off-w.base : off-w.base+uint64(i)], nil
		}
	}
	if err := w.fill(off); err != nil {
		return nil, err
	}
	if i := bytes.IndexByte(w.buf, 0); i >= 0 {
		return w.buf[:i], nil
	}
	return nil, fmt.Errorf("%w: pclntab string at %#x not terminated", ErrFormat, off)
}

// fill reads the window from offset off.
func (w *window) fill(off uint64) error {
	if off >= w.end-w.start {
		return fmt.Errorf("%w: pclntab offset %#x out of bounds", ErrFormat, off)
	}
	if w.buf == nil {
		w.buf = make([]byte, windowSize)
	}
	w.buf = w.buf[:min(windowSize, w.end-w.start-off)]
	if _, err := w.r.ReadAt(w.buf, int64(w.start+off)); err != nil {
		w.buf = w.buf[:0]
		return fmt.Errorf("%w: read pclntab: %w", ErrFormat, err)
	}
	w.base = off
	return nil
}
