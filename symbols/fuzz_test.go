package symbols

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"flag"
	"os"
	"path/filepath"
	"testing"
)

// FuzzOpen feeds arbitrary files to Open and the lookups. Errors are fine;
// panics and unbounded allocations are not.
func FuzzOpen(f *testing.F) {
	f.Add(synthELF(elf.EM_X86_64, synthPclntab(), true))
	f.Add(synthELF(elf.EM_X86_64, synthPclntab(), false))
	f.Add(synthELF(elf.EM_X86_64, nil, true))
	f.Add(synthELF(elf.EM_AARCH64, synthPclntab(), true))
	f.Add([]byte("\x7fELF\x02\x01\x01"))

	// A real binary, truncated and with its function table damaged. Whole
	// binaries are megabytes: the fuzzer mutates and minimizes them slowly,
	// so they are only regression seeds, and fuzzing starts from the
	// small ones.
	bin, err := os.ReadFile(buildTarget(f, toolchains[0], variants[1]))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(bin[:64])
	f.Add(bin[:1<<10])
	if fl := flag.Lookup("test.fuzz"); fl == nil || fl.Value.String() == "" {
		f.Add(bin[:len(bin)/2])
		f.Add(bin[:len(bin)-1])
		ef, err := elf.NewFile(bytes.NewReader(bin))
		if err != nil {
			f.Fatal(err)
		}
		pcln := ef.Section(".gopclntab").Offset
		for _, word := range []int{0, 2, 3, 6, 7} { // nfunc, textStart, funcname, pctab, pcln
			b := bytes.Clone(bin)
			binary.LittleEndian.PutUint64(b[pcln+8+8*uint64(word):], 1<<40)
			f.Add(b)
		}
	}

	// Go's minimizer is quadratic in the input size: on inputs of a
	// kilobyte it spends its default minute on each new input, and the
	// fuzzer makes no progress. Cap it, unless set on the command line.
	minimizeSet := false
	flag.Visit(func(fl *flag.Flag) { minimizeSet = minimizeSet || fl.Name == "test.fuzzminimizetime" })
	if !minimizeSet {
		flag.Set("test.fuzzminimizetime", "3s")
	}

	names := []string{"main.f", "main.g", "main.main", "runtime.main", "runtime.mapassign_faststr"}
	// Each fuzzing process calls the function sequentially: one file will do.
	p := filepath.Join(f.TempDir(), "bin")
	f.Fuzz(func(t *testing.T, data []byte) {
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		b, err := Open(p)
		if err != nil {
			return
		}
		defer b.Close()
		b.GoVersion()
		for _, name := range names {
			fn, ok := b.Func(name)
			if !ok {
				continue
			}
			if g, ok := b.FuncAt(fn.Entry); ok && g.Entry > fn.Entry {
				t.Errorf("FuncAt(%#x) = %+v", fn.Entry, g)
			}
			code, err := b.Code(fn)
			if err == nil && uint64(len(code)) != fn.End-fn.Entry {
				t.Errorf("Code(%+v) returned %d bytes", fn, len(code))
			}
		}
	})
}

// Layout of synthELF's output.
const (
	synthBase    = 0x400000
	synthTextOff = 0x100
	synthText    = synthBase + synthTextOff
)

// synthELF returns a small ELF executable in one read-execute segment. With
// pcln, it has a .text section with main.f (16 bytes of nop at synthText)
// and main.g (8 bytes at synthText+0x20), padded with int3, and pcln as
// .gopclntab. With goInfo, it has Go build information and, with pcln, a
// moduledata giving synthText as runtime.text.
func synthELF(machine elf.Machine, pcln []byte, goInfo bool) []byte {
	le := binary.LittleEndian
	type section struct {
		name  string
		typ   elf.SectionType
		flags elf.SectionFlag
		align int
		data  []byte
		off   int
	}
	nop, pad := bytes.Repeat([]byte{0x90}, 0x10), bytes.Repeat([]byte{0xcc}, 0x10)
	text := bytes.Join([][]byte{nop, pad, nop[:8], pad, pad[:8]}, nil)
	secs := []*section{{name: ".text", typ: elf.SHT_PROGBITS, flags: elf.SHF_ALLOC | elf.SHF_EXECINSTR, align: 16, data: text}}
	if pcln != nil {
		secs = append(secs, &section{name: ".gopclntab", typ: elf.SHT_PROGBITS, flags: elf.SHF_ALLOC, align: 8, data: pcln})
	}
	if goInfo {
		bi := make([]byte, 32)
		copy(bi, "\xff Go buildinf:\x08\x02")
		bi = append(bi, 8)
		bi = append(bi, "go1.26.8"...)
		bi = append(bi, 0)
		secs = append(secs, &section{name: ".go.buildinfo", typ: elf.SHT_PROGBITS, flags: elf.SHF_ALLOC | elf.SHF_WRITE, align: 16, data: bi})
		if pcln != nil {
			secs = append(secs, &section{name: ".noptrdata", typ: elf.SHT_PROGBITS, flags: elf.SHF_ALLOC | elf.SHF_WRITE, align: 8, data: make([]byte, 192)})
		}
	}
	shstrtab := &section{name: ".shstrtab", typ: elf.SHT_STRTAB, align: 1}
	secs = append(secs, shstrtab)
	names := []int{}
	shstrtab.data = []byte{0}
	for _, s := range secs {
		names = append(names, len(shstrtab.data))
		shstrtab.data = append(append(shstrtab.data, s.name...), 0)
	}

	off := synthTextOff
	for _, s := range secs {
		off = (off + s.align - 1) &^ (s.align - 1)
		s.off = off
		off += len(s.data)
	}
	shoff := (off + 7) &^ 7

	// The moduledata points at the pclntab, as runtime.firstmoduledata does.
	if goInfo && pcln != nil {
		md := secs[3].data
		addr := uint64(synthBase + secs[1].off)
		le.PutUint64(md[0:], addr)
		le.PutUint64(md[8:], addr+le.Uint64(pcln[32:]))   // funcnametab
		le.PutUint64(md[128:], addr+le.Uint64(pcln[64:])) // ftab
		le.PutUint64(md[160:], synthText)                 // minpc
		le.PutUint64(md[168:], synthText+uint64(len(text)))
		le.PutUint64(md[176:], synthText) // text
	}

	var buf bytes.Buffer
	hdr := elf.Header64{
		Type:      uint16(elf.ET_EXEC),
		Machine:   uint16(machine),
		Version:   uint32(elf.EV_CURRENT),
		Entry:     synthText,
		Phoff:     64,
		Shoff:     uint64(shoff),
		Ehsize:    64,
		Phentsize: 56,
		Phnum:     1,
		Shentsize: 64,
		Shnum:     uint16(len(secs) + 1),
		Shstrndx:  uint16(len(secs)),
	}
	copy(hdr.Ident[:], elf.ELFMAG)
	hdr.Ident[elf.EI_CLASS] = byte(elf.ELFCLASS64)
	hdr.Ident[elf.EI_DATA] = byte(elf.ELFDATA2LSB)
	hdr.Ident[elf.EI_VERSION] = byte(elf.EV_CURRENT)
	binary.Write(&buf, le, hdr)
	binary.Write(&buf, le, elf.Prog64{
		Type:   uint32(elf.PT_LOAD),
		Flags:  uint32(elf.PF_R | elf.PF_X),
		Vaddr:  synthBase,
		Paddr:  synthBase,
		Filesz: uint64(off),
		Memsz:  uint64(off),
		Align:  0x1000,
	})
	for _, s := range secs {
		buf.Write(make([]byte, s.off-buf.Len()))
		buf.Write(s.data)
	}
	buf.Write(make([]byte, shoff-buf.Len()))
	binary.Write(&buf, le, elf.Section64{})
	for i, s := range secs {
		sh := elf.Section64{
			Name:      uint32(names[i]),
			Type:      uint32(s.typ),
			Flags:     uint64(s.flags),
			Off:       uint64(s.off),
			Size:      uint64(len(s.data)),
			Addralign: uint64(s.align),
		}
		if s.flags&elf.SHF_ALLOC != 0 {
			sh.Addr = uint64(synthBase + s.off)
		}
		binary.Write(&buf, le, sh)
	}
	return buf.Bytes()
}

// synthPclntab returns a Go 1.20+ function table for synthELF's .text:
// main.f, 16 bytes at offset 0, and main.g, 8 bytes at offset 0x20.
func synthPclntab() []byte {
	le := binary.LittleEndian
	const (
		funcnameOff = 72
		cuOff       = 88
		filetabOff  = 92
		pctabOff    = 100
		pclnOff     = 112
		funcSize    = 44
	)
	d := make([]byte, pclnOff+24+2*funcSize)
	le.PutUint32(d, 0xfffffff1)
	d[6], d[7] = 1, 8 // quantum, pointer size
	for i, v := range []uint64{2, 1, 0, funcnameOff, cuOff, filetabOff, pctabOff, pclnOff} {
		le.PutUint64(d[8+8*i:], v)
	}
	copy(d[funcnameOff:], "main.f\x00main.g\x00")
	copy(d[filetabOff:], "x.go\x00")
	// SP-delta tables, value 0 for 0x10 and 0x08 bytes; offset 0 is "none".
	copy(d[pctabOff:], []byte{0, 2, 0x10, 0, 2, 0x08, 0})
	ftab := d[pclnOff:]
	for i, v := range []uint32{0, 24, 0x20, 24 + funcSize, 0x40} {
		le.PutUint32(ftab[4*i:], v)
	}
	for i, fn := range []struct{ entry, name, pcsp uint32 }{{0, 0, 1}, {0x20, 7, 4}} {
		b := ftab[24+i*funcSize:]
		le.PutUint32(b[0:], fn.entry)
		le.PutUint32(b[4:], fn.name)
		le.PutUint32(b[16:], fn.pcsp) // pcsp
		le.PutUint32(b[20:], fn.pcsp) // pcfile
		le.PutUint32(b[24:], fn.pcsp) // pcln
		le.PutUint32(b[36:], 1)       // startLine
	}
	return d
}
