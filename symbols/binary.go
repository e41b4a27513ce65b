package symbols

import (
	"bytes"
	"debug/buildinfo"
	"debug/elf"
	"debug/gosym"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sort"
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
// concurrent use. It keeps the file open for Code; Close releases it.
type Binary struct {
	path      string
	file      *os.File
	goVersion string
	pie       bool
	stripped  bool
	entry     uint64 // ELF header entry point
	bias      uint64
	segs      []segment

	textStart  uint64
	textSource string // where textStart came from, for tests and errors

	funcs  []Func           // sorted by Entry
	byName map[string]int32 // index into funcs
}

// segment is an executable PT_LOAD segment, clipped to its file-backed part.
type segment struct {
	vaddr, off, filesz uint64
}

// Open reads the function table of the Go binary at path. Only 64-bit
// x86-64 ELF files are supported.
//
// Errors wrap ErrNotGo for ELF files that are not Go binaries, ErrFormat for
// malformed files and errors.ErrUnsupported for other architectures, as well
// as errors from the file system.
func Open(path string) (*Binary, error) {
	b, _, err := openFile(path, false)
	if err != nil {
		return nil, fmt.Errorf("open symbols: %w", err)
	}
	return b, nil
}

// Close closes the underlying file. Code fails after Close; other methods
// keep working.
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
// wrapped function.
func (b *Binary) Func(name string) (f Func, ok bool) {
	i, ok := b.byName[name]
	if !ok {
		return Func{}, false
	}
	return b.funcs[i], true
}

// FuncAt returns the function whose code contains the link-time address
// addr, that is Entry <= addr < End. ok is false for addresses outside
// functions, including the padding between them.
func (b *Binary) FuncAt(addr uint64) (f Func, ok bool) {
	i := sort.Search(len(b.funcs), func(i int) bool { return b.funcs[i].Entry > addr }) - 1
	if i < 0 || addr >= b.funcs[i].End {
		return Func{}, false
	}
	return b.funcs[i], true
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
// then corrects it against the running code. The returned table lets the
// caller rebuild the index with another textStart.
func openFile(path string, trustSection bool) (b *Binary, tab *pclntab, err error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	defer func() {
		if err != nil {
			f.Close()
		}
	}()
	// debug/elf, debug/buildinfo and debug/gosym read untrusted data; turn
	// any panic of theirs into an error.
	defer func() {
		if r := recover(); r != nil {
			b, tab, err = nil, nil, fmt.Errorf("parse %s: %w: panic: %v", path, ErrFormat, r)
		}
	}()

	st, err := f.Stat()
	if err != nil {
		return nil, nil, err
	}
	ef, err := elf.NewFile(f)
	if err != nil {
		return nil, nil, fmt.Errorf("parse ELF %s: %w: %w", path, ErrFormat, err)
	}
	if ef.Class != elf.ELFCLASS64 || ef.Machine != elf.EM_X86_64 {
		return nil, nil, fmt.Errorf("parse ELF %s: %v %v: %w", path, ef.Class, ef.Machine, errors.ErrUnsupported)
	}
	if ef.Type != elf.ET_EXEC && ef.Type != elf.ET_DYN {
		return nil, nil, fmt.Errorf("parse ELF %s: type %v is not an executable: %w", path, ef.Type, ErrFormat)
	}

	b = &Binary{
		path:     path,
		file:     f,
		pie:      ef.Type == elf.ET_DYN,
		stripped: ef.SectionByType(elf.SHT_SYMTAB) == nil,
		entry:    ef.Entry,
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
		return nil, nil, fmt.Errorf("read build info of %s: %w: %w", path, ErrNotGo, err)
	}
	b.goVersion = bi.GoVersion

	var syms []elf.Symbol
	if !b.stripped {
		// A broken .symtab only costs the symbol-based shortcuts.
		syms, _ = ef.Symbols()
	}
	tab, err = findPclntab(ef, syms, size)
	if err != nil {
		return nil, nil, fmt.Errorf("find function table in %s: %w", path, err)
	}
	if len(b.segs) == 0 {
		return nil, nil, fmt.Errorf("parse ELF %s: no executable segment: %w", path, ErrFormat)
	}

	cands := textStartCandidates(ef, syms, tab, size)
	var errs []error
	for _, c := range cands {
		err := b.build(tab, c.addr)
		if err == nil && c.source != "symtab" {
			err = b.checkPadding()
		}
		if err == nil {
			b.textStart, b.textSource = c.addr, c.source
			return b, tab, nil
		}
		errs = append(errs, fmt.Errorf("textStart %#x from %s: %w", c.addr, c.source, err))
	}
	if trustSection && len(cands) > 0 {
		c := cands[len(cands)-1]
		if err := b.build(tab, c.addr); err == nil {
			b.textStart, b.textSource = c.addr, c.source+" (unverified)"
			return b, tab, nil
		}
	}
	if len(errs) == 0 {
		errs = append(errs, errors.New("no candidate for textStart"))
	}
	return nil, nil, fmt.Errorf("index functions of %s: %w", path, errors.Join(errs...))
}

type candidate struct {
	addr   uint64
	source string
}

// textStartCandidates lists the possible values of runtime.text, the base of
// Go 1.18+ function entries, most reliable first.
func textStartCandidates(ef *elf.File, syms []elf.Symbol, tab *pclntab, size uint64) []candidate {
	var cands []candidate
	for _, s := range syms {
		if s.Name == "runtime.text" {
			cands = append(cands, candidate{s.Value, "symtab"})
			break
		}
	}
	if tab.version >= ver118 {
		if text, ok := moduledataText(ef, tab, size); ok {
			cands = append(cands, candidate{text, "moduledata"})
		}
		// Go 1.18 to 1.25 store runtime.text in the header; 1.26 stores 0.
		if tab.hdr.textStart != 0 {
			cands = append(cands, candidate{tab.hdr.textStart, "pcheader"})
		}
	}
	if s := ef.Section(".text"); s != nil {
		cands = append(cands, candidate{s.Addr, "section"})
	} else if tab.version < ver118 {
		// Older tables hold absolute addresses and ignore textStart.
		cands = append(cands, candidate{0, "none"})
	}
	return cands
}

// moduledataText finds runtime.firstmoduledata, the runtime's own record of
// the module layout, by its pointers to the pclntab, and returns its text
// field. This is the address the runtime itself adds to function entries.
func moduledataText(ef *elf.File, tab *pclntab, size uint64) (uint64, bool) {
	if tab.addr == 0 {
		return 0, false
	}
	// Offsets in moduledata, unchanged from Go 1.18 to 1.26: pcHeader,
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
		d, err := sectionData(s, size)
		if err != nil {
			continue
		}
		for i := 0; i+offText+8 <= len(d); i += 8 {
			if le.Uint64(d[i:]) != want0 || le.Uint64(d[i+offFuncnametab:]) != want1 || le.Uint64(d[i+offFtab:]) != wantFtab {
				continue
			}
			text, minpc := le.Uint64(d[i+offText:]), le.Uint64(d[i+offMinpc:])
			if text != 0 && text <= minpc {
				return text, true
			}
		}
	}
	return 0, false
}

// build indexes the function table, using textStart as runtime.text. It
// fails if any function lies outside the executable segments.
func (b *Binary) build(tab *pclntab, textStart uint64) error {
	gt, err := gosym.NewTable(nil, gosym.NewLineTable(tab.data, textStart))
	if err != nil {
		return fmt.Errorf("%w: %w", ErrFormat, err)
	}
	if len(gt.Funcs) == 0 {
		return fmt.Errorf("%w: no functions", ErrFormat)
	}
	info := tab.funcInfo() // nil for old or odd tables

	funcs := make([]Func, 0, len(gt.Funcs))
	byName := make(map[string]int32, len(gt.Funcs))
	ids := make([]uint8, 0, len(gt.Funcs))
	for i := range gt.Funcs {
		gf := &gt.Funcs[i]
		if gf.End < gf.Entry || (i > 0 && gf.Entry < gt.Funcs[i-1].Entry) {
			return fmt.Errorf("%w: function %s at %#x-%#x out of order", ErrFormat, gf.Name, gf.Entry, gf.End)
		}
		end, id := gf.End, uint8(0)
		if info != nil && info[i].entry+textStart == gf.Entry {
			if s := info[i].size; s != 0 && s <= gf.End-gf.Entry {
				end = gf.Entry + s
			}
			id = info[i].funcID
		}
		off, ok := b.fileOffset(gf.Entry, end-gf.Entry)
		if !ok {
			return fmt.Errorf("%w: function %s at %#x-%#x is outside the executable segments", ErrFormat, gf.Name, gf.Entry, end)
		}
		funcs = append(funcs, Func{Name: gf.Name, Entry: gf.Entry, End: end, FileOffset: off})
		ids = append(ids, id)
		// The wrapper of an ABI0/ABIInternal pair has the same name and
		// funcID FuncIDWrapper, always the largest FuncID: prefer the
		// smaller one, which is the wrapped function. Between two
		// wrappers, prefer the larger: ABI wrappers are small trampolines.
		if j, dup := byName[gf.Name]; !dup || id < ids[j] ||
			(id == ids[j] && end-gf.Entry > funcs[j].End-funcs[j].Entry) {
			byName[gf.Name] = int32(len(funcs) - 1)
		}
	}
	b.funcs, b.byName = funcs, byName
	return nil
}

// checkPadding checks textStart: the linker fills the gaps between amd64
// functions with int3, and code does not start with int3. With a wrong
// base, gaps would hold code or entries int3. A few exceptions, such as
// runtime.breakpoint, are tolerated. The check needs exact function sizes,
// so it passes for tables without them.
func (b *Binary) checkPadding() error {
	const samples = 64
	checked, bad := 0, 0
	var buf []byte
	for i := 0; i+1 < len(b.funcs) && checked < samples; i++ {
		f, next := b.funcs[i], b.funcs[i+1]
		if next.Entry <= f.End || next.Entry-f.End > 64 || next.End == next.Entry {
			continue
		}
		// The gap and the first byte of the next function.
		n := next.Entry - f.End + 1
		off, ok := b.fileOffset(f.End, n)
		if !ok {
			continue
		}
		buf = append(buf[:0], make([]byte, n)...)
		if _, err := b.file.ReadAt(buf, int64(off)); err != nil {
			return fmt.Errorf("read padding after %s: %w", f.Name, err)
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

// pclntab versions, as in debug/gosym.
const (
	ver12 = 12 + iota
	ver116
	ver118
	ver120
)

type pclntab struct {
	data    []byte
	addr    uint64 // link-time address of data[0], 0 if unknown
	version int
	hdr     pcHeader // Go 1.18+ only
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

// findPclntab locates the Go function table. It is usually the .gopclntab
// section; PIE binaries of Go 1.25 and older name it .data.rel.ro.gopclntab,
// or, when externally linked, merge it into .data.rel.ro.
func findPclntab(ef *elf.File, syms []elf.Symbol, size uint64) (*pclntab, error) {
	for _, name := range []string{".gopclntab", ".data.rel.ro.gopclntab"} {
		s := ef.Section(name)
		if s == nil || s.Type == elf.SHT_NOBITS {
			continue
		}
		d, err := sectionData(s, size)
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", name, err)
		}
		return parsePclntab(d, s.Addr)
	}

	var start, end uint64
	for _, s := range syms {
		switch s.Name {
		case "runtime.pclntab":
			start = s.Value
		case "runtime.epclntab":
			end = s.Value
		}
	}
	if start != 0 && end > start {
		for _, s := range ef.Sections {
			if s.Type != elf.SHT_PROGBITS || start < s.Addr || end-s.Addr > s.Size {
				continue
			}
			d, err := sectionData(s, size)
			if err != nil {
				return nil, fmt.Errorf("read %s: %w", s.Name, err)
			}
			if end-s.Addr > uint64(len(d)) {
				break
			}
			return parsePclntab(d[start-s.Addr:end-s.Addr], start)
		}
	}

	// Stripped: look for the header in the read-only data.
	for _, s := range ef.Sections {
		if s.Type != elf.SHT_PROGBITS || s.Flags&elf.SHF_ALLOC == 0 || s.Flags&elf.SHF_EXECINSTR != 0 {
			continue
		}
		d, err := sectionData(s, size)
		if err != nil {
			continue
		}
		for i := 0; i+8 <= len(d); i += 8 {
			if !isPclntabMagic(d[i:]) {
				continue
			}
			if t, err := parsePclntab(d[i:], s.Addr+uint64(i)); err == nil {
				return t, nil
			}
		}
	}
	return nil, ErrNotGo
}

// sectionData reads a section. It rejects sections reaching past the end of
// the file, which debug/elf would try to read in 10 MB chunks.
func sectionData(s *elf.Section, fileSize uint64) ([]byte, error) {
	if s.Type == elf.SHT_NOBITS || s.Offset > fileSize || s.FileSize > fileSize-s.Offset {
		return nil, fmt.Errorf("%w: section %s is not in the file", ErrFormat, s.Name)
	}
	d, err := s.Data()
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrFormat, err)
	}
	return d, nil
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

// parsePclntab checks the header before debug/gosym sees the table: gosym
// trusts the function count and could allocate without bound.
func parsePclntab(d []byte, addr uint64) (*pclntab, error) {
	if len(d) < 16 || d[4] != 0 || d[5] != 0 || d[7] != 8 || (d[6] != 1 && d[6] != 2 && d[6] != 4) {
		return nil, fmt.Errorf("%w: bad pclntab header", ErrNotGo)
	}
	le := binary.LittleEndian
	t := &pclntab{data: d, addr: addr}
	word := func(i int) uint64 {
		if 8+8*i+8 > len(d) {
			return ^uint64(0)
		}
		return le.Uint64(d[8+8*i:])
	}
	n := uint64(len(d))
	nfunc := word(0)
	var ftabOff, ftabSize uint64
	switch le.Uint32(d) {
	case 0xfffffffb:
		t.version = ver12
		ftabOff, ftabSize = 16, (2*nfunc+1)*8
	case 0xfffffffa:
		t.version = ver116
		ftabOff, ftabSize = word(6), (2*nfunc+1)*8
	case 0xfffffff0, 0xfffffff1:
		t.version = ver118
		t.hdr = pcHeader{
			quantum:     uint64(d[6]),
			nfunc:       nfunc,
			textStart:   word(2),
			funcnameOff: word(3),
			pctabOff:    word(6),
			pclnOff:     word(7),
		}
		ftabOff, ftabSize = word(7), (2*nfunc+1)*4
	default:
		return nil, fmt.Errorf("%w: unknown pclntab magic %#x", ErrNotGo, le.Uint32(d))
	}
	if nfunc == 0 || nfunc > n || ftabOff > n || ftabSize > n-ftabOff {
		return nil, fmt.Errorf("%w: pclntab function table out of bounds", ErrFormat)
	}
	return t, nil
}

// funcData is what debug/gosym does not expose about a function.
type funcData struct {
	entry  uint64 // offset from textStart
	size   uint64 // 0 if unknown
	funcID uint8
}

// funcInfo decodes, for Go 1.18+ tables, each function's entry offset, its
// exact size (the end of its SP-delta table) and its funcID. It returns nil
// if the table does not decode.
func (t *pclntab) funcInfo() []funcData {
	if t.version < ver118 {
		return nil
	}
	const (
		funcSize  = 44 // fixed part of runtime._func
		offPcsp   = 16
		offFuncID = 40
	)
	le := binary.LittleEndian
	d, h := t.data, t.hdr
	n := uint64(len(d))
	if h.pctabOff > n {
		return nil
	}
	pctab := d[h.pctabOff:]
	ftab := d[h.pclnOff:] // bounds checked by parsePclntab
	info := make([]funcData, h.nfunc)
	for i := range info {
		entry := uint64(le.Uint32(ftab[8*i:]))
		off := h.pclnOff + uint64(le.Uint32(ftab[8*i+4:]))
		if off > n || n-off < funcSize {
			return nil
		}
		fn := d[off:]
		info[i] = funcData{entry: entry, funcID: fn[offFuncID]}
		if pcsp := uint64(le.Uint32(fn[offPcsp:])); pcsp != 0 && pcsp < uint64(len(pctab)) {
			info[i].size = pcvalueEnd(pctab[pcsp:], h.quantum)
		}
	}
	return info
}

// pcvalueEnd returns the PC offset where a pc-value table ends. The linker
// ends every such table at the function's size (cmd/internal/obj/pcln.go).
// It returns 0 if the table does not decode.
func pcvalueEnd(p []byte, quantum uint64) uint64 {
	var pc uint64
	for first := true; ; first = false {
		vdelta, n := binary.Uvarint(p)
		if n <= 0 {
			return 0
		}
		p = p[n:]
		if vdelta == 0 && !first {
			return pc
		}
		pcdelta, n := binary.Uvarint(p)
		if n <= 0 || pcdelta > 1<<32 {
			return 0
		}
		p = p[n:]
		pc += pcdelta * quantum
		if pc > 1<<32 {
			return 0
		}
	}
}
