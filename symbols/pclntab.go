package symbols

import (
	"bytes"
	"cmp"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/maphash"
	"io"
	"slices"
)

// index reads the function table, checks that entries are in order, and
// hashes the names of the runtime's functions (indexedPrefixes).
func (b *Binary) index() error {
	h := b.tab.hdr
	ftab, err := b.readTab(h.pclnOff, (2*h.nfunc+1)*4)
	if err != nil {
		return err
	}
	b.ftab = ftab
	keys, err := b.hashNames(true)
	if err != nil {
		return err
	}
	b.byHash = keys
	return nil
}

// indexedPrefixes are the names the index Open builds holds: the runtime's,
// which is what mapguard's Start looks up (a few dozen among the hundred
// thousand functions of a large program). Any other name builds the rest
// of the index on its first lookup (Func).
var indexedPrefixes = []string{"runtime.", "internal/runtime/"}

// indexed reports whether name has one of indexedPrefixes.
func indexed(name []byte) bool {
	for _, p := range indexedPrefixes {
		if len(name) >= len(p) && string(name[:len(p)]) == p {
			return true
		}
	}
	return false
}

// hashNames checks every function's record against the table and returns
// the sorted keys (name hash << 32 | index) of the functions whose names
// are indexed (runtime true), or of all the others (false).
func (b *Binary) hashNames(runtime bool) ([]uint64, error) {
	h := b.tab.hdr
	ftab := b.ftab
	le := binary.LittleEndian
	funcs := window{r: b.file, start: b.tab.off, end: b.tab.off + b.tab.size}
	names := window{r: b.file, start: b.tab.off, end: b.tab.off + b.tab.size}
	defer funcs.release()
	defer names.release()
	var keys []uint64
	prev := uint64(0)
	for i := range int(h.nfunc) {
		entry := uint64(le.Uint32(ftab[8*i:]))
		if entry < prev {
			return nil, fmt.Errorf("%w: function %d at %#x out of order", ErrFormat, i, entry)
		}
		prev = entry
		d, err := funcs.at(h.pclnOff+uint64(le.Uint32(ftab[8*i+4:])), 8)
		if err != nil {
			return nil, err
		}
		if uint64(le.Uint32(d)) != entry {
			return nil, fmt.Errorf("%w: function %d: entry %#x in the table, %#x in its record", ErrFormat, i, entry, le.Uint32(d))
		}
		name, err := names.cstring(h.funcnameOff + uint64(le.Uint32(d[4:])))
		if err != nil {
			return nil, err
		}
		if indexed(name) == runtime {
			keys = append(keys, uint64(nameHash(name))<<32|uint64(i))
		}
	}
	if uint64(le.Uint32(ftab[8*h.nfunc:])) < prev {
		return nil, fmt.Errorf("%w: end of text before the last function", ErrFormat)
	}
	sortKeys(keys)
	return keys, nil
}

// nameSeed seeds nameHash, once per process: the index lives only in
// memory.
var nameSeed = maphash.MakeSeed()

// nameHash is 32 bits of the runtime's hash (AES-based where the CPU has
// it): a program's names are hashed at every Open, some hundred thousand
// of them in a large one, where a byte-at-a-time hash took a third of the
// time.
func nameHash(name []byte) uint32 {
	return uint32(maphash.Bytes(nameSeed, name))
}

// sortKeys sorts the index's keys in place, without a second buffer: by
// their top keyBucketBits bits first (an American flag sort, one pass),
// then each bucket, which holds a few dozen keys of a large program.
func sortKeys(keys []uint64) {
	const shift = 64 - keyBucketBits
	var start, next [1 << keyBucketBits]int
	for _, k := range keys {
		start[k>>shift]++
	}
	sum := 0
	for d, n := range start {
		start[d], next[d] = sum, sum
		sum += n
	}
	end := func(d int) int {
		if d+1 < len(start) {
			return start[d+1]
		}
		return len(keys)
	}
	for d := range next {
		for e := end(d); next[d] < e; {
			k := keys[next[d]]
			// Move k to its bucket, taking the key there along, until a
			// key for this one comes back.
			for int(k>>shift) != d {
				o := int(k >> shift)
				keys[next[o]], k = k, keys[next[o]]
				next[o]++
			}
			keys[next[d]] = k
			next[d]++
		}
	}
	for d := range start {
		slices.Sort(keys[start[d]:end(d)])
	}
}

// keyBucketBits: 4096 buckets, 64 kB of counters on the stack.
const keyBucketBits = 12

func (b *Binary) nfunc() int { return int(b.tab.hdr.nfunc) }

// entryOff is the entry of function i, or the end of text for nfunc, as
// an offset from textStart.
func (b *Binary) entryOff(i int) uint64 {
	return uint64(binary.LittleEndian.Uint32(b.ftab[8*i:]))
}

// record reads function i: its name, funcID and exact size, from the SP
// delta table's end (it covers exactly the function's code). Without one
// the function ends at the next entry. Records are kept once read.
func (b *Binary) record(i uint32) (funcRecord, error) {
	b.mu.Lock()
	k, ok := slices.BinarySearchFunc(b.known, i, knownCmp)
	var r funcRecord
	if ok {
		r = b.known[k].r
	}
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
	if k, ok := slices.BinarySearchFunc(b.known, i, knownCmp); !ok {
		b.known = slices.Insert(b.known, k, knownRecord{i, r})
	}
	b.mu.Unlock()
	return r, nil
}

// knownRecord is a record already read, by function index: kept in a
// sorted slice, not a map, since mapguard looks functions up in the
// process it watches, after its probes are attached, and a map read that
// misses would trap at one of them.
type knownRecord struct {
	i uint32
	r funcRecord
}

func knownCmp(k knownRecord, i uint32) int { return cmp.Compare(k.i, i) }

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
	bp         *[]byte // buf's buffer, from chunks
}

const windowSize = scanChunk

// release returns the window's buffer to chunks; nothing read through the
// window may be used afterwards.
func (w *window) release() {
	if w.bp != nil {
		chunks.Put(w.bp)
	}
	w.buf, w.bp = nil, nil
}

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
		w.bp = getChunk()
		w.buf = *w.bp
	}
	w.buf = w.buf[:min(windowSize, w.end-w.start-off)]
	if _, err := w.r.ReadAt(w.buf, int64(w.start+off)); err != nil {
		w.buf = w.buf[:0]
		return fmt.Errorf("%w: read pclntab: %w", ErrFormat, err)
	}
	w.base = off
	return nil
}
