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
	"sync"
)

// openFile opens and indexes path. If trustSection is set and no base for
// textStart passes the checks, the start of .text is used anyway: OpenSelf
// then corrects it against the running code.
//
// openFile is the sequence of checks of an ELF file, each with its own
// error; they read best in order.
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

// chunks recycles the read buffers of section scans and of the function
// table's windows (scanChunk = windowSize bytes each): opening a binary
// used four or five, which were garbage right after.
var chunks sync.Pool

// getChunk returns a buffer of scanChunk bytes, to be put back in chunks.
func getChunk() *[]byte {
	if bp, ok := chunks.Get().(*[]byte); ok {
		return bp
	}
	b := make([]byte, scanChunk)
	return &b
}

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
	bp := getChunk()
	defer chunks.Put(bp)
	buf := *bp
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
	if len(names) == 0 {
		return nil
	}
	longest := 0
	for _, n := range names {
		longest = max(longest, len(n)+2)
	}
	pats := make([][]byte, len(names))
	for k, n := range names {
		pats[k] = []byte("\x00" + n + "\x00")
	}
	// One search for what the patterns start with ("\x00runtime." for the
	// names openFile wants), then each pattern at its hits: one pass over
	// a large program's string table rather than one per name.
	prefix := pats[0]
	for _, p := range pats[1:] {
		n := 0
		for n < len(prefix) && n < len(p) && prefix[n] == p[n] {
			n++
		}
		prefix = prefix[:n]
	}
	if len(prefix) < 4 {
		prefix = nil // too common to search for: each pattern on its own
	}
	byOff := map[uint64]string{}
	scanSection(r, strtab, fileSize, longest, func(d []byte, off uint64) bool {
		if prefix != nil {
			for i := 0; ; {
				j := bytes.Index(d[i:], prefix)
				if j < 0 {
					break
				}
				for k, p := range pats {
					if bytes.HasPrefix(d[i+j:], p) {
						byOff[off+uint64(i+j+1)] = names[k]
					}
				}
				i += j + 1
			}
			return false
		}
		for k, p := range pats {
			for i := 0; ; {
				j := bytes.Index(d[i:], p)
				if j < 0 {
					break
				}
				byOff[off+uint64(i+j+1)] = names[k]
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
