package x86site

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"sync"

	"golang.org/x/arch/x86/x86asm"
)

// Inst is one decoded instruction.
type Inst struct {
	Offset   uint64    // from the first byte of the decoded code
	Len      int       // length in bytes
	Op       x86asm.Op // x86asm opcode; ENDBR64/ENDBR32 are reported as x86asm.NOP
	Text     string    // Go assembler syntax (x86asm.GoSyntax; branch targets as .+N)
	Emulated bool      // the x86 kernel emulates this instruction for a uprobe (cheap) instead of single-stepping it

	x      x86asm.Inst // full decoding; x.Op == Op for instructions produced by Decode
	plain  bool        // no legacy prefix and no REX prefix
	legacy bool        // has a legacy (non-REX) prefix
	endbr  bool        // ENDBR64 or ENDBR32
	direct bool        // produced by Decode (not assembled by hand by a caller)
	vex    *sxVEX      // a VEX or EVEX instruction, which x86asm does not decode (Op 0; see vex.go)
}

// Decode decodes code, the whole body of one function from its first byte,
// linearly. Any decode error, an instruction that runs past len(code), or an
// instruction the decoder only half understands (a prefix without an opcode,
// which is how x86asm reports truncated or unknown encodings) is an error:
// callers must not probe a function that does not decode.
//
// ENDBR64 and ENDBR32 (f3 0f 1e fa/fb) are decoded here as 4-byte
// instructions, since x86asm decodes them as a 1-byte REP prefix
// (golang/go#35865).
func Decode(code []byte) ([]Inst, error) {
	return sxDecode(code, true)
}

// sxDecode is Decode; text selects whether Text is filled in (formatting
// dominates decoding time, and the analysis needs the text of one
// instruction only: see sxText).
func sxDecode(code []byte, text bool) ([]Inst, error) {
	if len(code) == 0 {
		return nil, errors.New("symbols: no code to decode")
	}
	var insts []Inst
	if !text {
		if p, ok := sxInstPool.Get().(*[]Inst); ok {
			insts = (*p)[:0]
		}
	}
	if insts == nil {
		insts = make([]Inst, 0, min(len(code)/4+1, 1024))
	}
	for off := 0; off < len(code); {
		in, err := sxDecodeOne(code[off:], text)
		if err != nil {
			return nil, fmt.Errorf("symbols: cannot decode instruction at +%#x: %v", off, err)
		}
		in.Offset = uint64(off)
		insts = append(insts, in)
		off += in.Len
	}
	return insts, nil
}

// sxInstPool recycles the instruction buffers of the site finders: Start
// decodes some forty runtime functions, several more than once, each a
// few hundred instructions of 264 bytes (3.6 MB of garbage a Start before,
// which grew the heap by as much). A finder returns its buffer with
// sxRelease once nothing it returns points into it; Decode's buffers are
// the caller's and never recycled.
var sxInstPool sync.Pool

// sxRelease returns insts, from sxDecode(code, false), to the pool.
func sxRelease(insts []Inst) {
	clear(insts) // no pointers kept alive by the pool
	insts = insts[:0]
	sxInstPool.Put(&insts)
}

var sxEndbr64 = [4]byte{0xf3, 0x0f, 0x1e, 0xfa}
var sxEndbr32 = [4]byte{0xf3, 0x0f, 0x1e, 0xfb}

// sxDecodeOne decodes the instruction at the start of b.
func sxDecodeOne(b []byte, text bool) (in Inst, err error) {
	if len(b) >= 4 {
		var head [4]byte
		copy(head[:], b)
		if head == sxEndbr64 || head == sxEndbr32 {
			text := "ENDBR64"
			if head == sxEndbr32 {
				text = "ENDBR32"
			}
			return Inst{Len: 4, Op: x86asm.NOP, Text: text, x: x86asm.Inst{Op: x86asm.NOP, Len: 4, Mode: 64}, endbr: true, direct: true}, nil
		}
	}
	if sxIsVEX(b) {
		return sxDecodeVEX(b)
	}
	// x86asm is not hardened against arbitrary input (a truncated EVEX
	// prefix makes v0.30.0 index out of range): a panic is a decode error.
	defer func() {
		if r := recover(); r != nil {
			in, err = Inst{}, fmt.Errorf("decoder panic: %v", r)
		}
	}()
	x, err := x86asm.Decode(b, 64)
	switch {
	case err != nil:
		return Inst{}, err
	case x.Op == 0:
		// A bare prefix: x86asm's answer for a truncated or unknown
		// instruction (and for ENDBR-like F3 0F 1E forms).
		return Inst{}, errors.New("truncated or unrecognised instruction")
	case x.Len <= 0 || x.Len > len(b) || x.Len > 15:
		return Inst{}, fmt.Errorf("instruction length %d out of range", x.Len)
	}
	raw := b[:x.Len]
	in = Inst{
		Len:    x.Len,
		Op:     x.Op,
		x:      x,
		plain:  sxPlain(raw),
		direct: true,
	}
	if lp, _, _ := sxSplit(raw); len(lp) > 0 {
		in.legacy = true
	}
	if text {
		in.Text = x86asm.GoSyntax(x, 0, nil)
	}
	in.Emulated = sxEmulated(raw, x)
	return in, nil
}

// sxText returns the instruction's GoSyntax text, formatting it now if
// Decode was asked not to.
func (in *Inst) sxText() (text string) {
	if in.Text != "" {
		return in.Text
	}
	defer func() {
		if recover() != nil {
			text = in.Op.String()
		}
	}()
	return x86asm.GoSyntax(in.x, 0, nil)
}

// sxLegacyPrefix reports whether b is an x86 legacy prefix byte.
func sxLegacyPrefix(b byte) bool {
	switch b {
	case 0x26, 0x2e, 0x36, 0x3e, 0x64, 0x65, 0x66, 0x67, 0xf0, 0xf2, 0xf3:
		return true
	}
	return false
}

// sxSplit splits raw into legacy prefixes, REX byte (0 if none) and the rest.
func sxSplit(raw []byte) (legacy []byte, rex byte, rest []byte) {
	i := 0
	for i < len(raw) && sxLegacyPrefix(raw[i]) {
		i++
	}
	legacy = raw[:i]
	if i < len(raw) && raw[i]&0xf0 == 0x40 {
		rex = raw[i]
		i++
	}
	return legacy, rex, raw[i:]
}

func sxPlain(raw []byte) bool {
	legacy, rex, _ := sxSplit(raw)
	return len(legacy) == 0 && rex == 0
}

// sxEmulated mirrors arch/x86/kernel/uprobes.c: branch_setup_xol_ops
// emulates NOPs (0x90 and, via insn_is_nop, 0f 1f), jmp rel8/rel32, call
// rel32 and jcc rel8/rel32 (rejecting 0x66-prefixed branches);
// push_setup_xol_ops emulates push reg (50-57, 41 50-57). Anything the
// function is unsure about is reported as single-stepped (false). Segment
// and LOCK prefixes make the kernel refuse the probe altogether, so they
// are never emulated either.
func sxEmulated(raw []byte, x x86asm.Inst) bool {
	// push reg: exactly 50+r or 41 50+r.
	if len(raw) == 1 && raw[0] >= 0x50 && raw[0] <= 0x57 {
		return true
	}
	if len(raw) == 2 && raw[0] == 0x41 && raw[1] >= 0x50 && raw[1] <= 0x57 {
		return true
	}
	legacy, rex, rest := sxSplit(raw)
	if len(rest) == 0 {
		return false
	}
	if x.Op == x86asm.NOP {
		for _, p := range legacy {
			if p != 0x66 {
				return false
			}
		}
		switch {
		case len(rest) == 1 && rest[0] == 0x90:
			return rex&0x01 == 0 // 41 90 is XCHG R8D, EAX
		case len(rest) >= 3 && rest[0] == 0x0f && rest[1] == 0x1f:
			return rest[2]>>3&7 == 0 // 0f 1f /0
		}
		return false
	}
	if len(legacy) != 0 || rex != 0 {
		return false
	}
	switch {
	case len(rest) == 2 && rest[0] == 0xeb && x.Op == x86asm.JMP,
		len(rest) == 5 && rest[0] == 0xe9 && x.Op == x86asm.JMP,
		len(rest) == 5 && rest[0] == 0xe8 && x.Op == x86asm.CALL,
		len(rest) == 2 && rest[0] >= 0x70 && rest[0] <= 0x7f && sxCondJump(x.Op),
		len(rest) == 6 && rest[0] == 0x0f && rest[1] >= 0x80 && rest[1] <= 0x8f && sxCondJump(x.Op):
		return true
	}
	return false
}

func sxCondJump(op x86asm.Op) bool {
	switch op {
	case x86asm.JA, x86asm.JAE, x86asm.JB, x86asm.JBE, x86asm.JE, x86asm.JG, x86asm.JGE,
		x86asm.JL, x86asm.JLE, x86asm.JNE, x86asm.JNO, x86asm.JNP, x86asm.JNS, x86asm.JO,
		x86asm.JP, x86asm.JS:
		return true
	}
	return false
}

// sxControl reports whether op can transfer control anywhere but the next
// instruction (or stop the thread).
func sxControl(op x86asm.Op) bool {
	if sxCondJump(op) {
		return true
	}
	switch op {
	case x86asm.JMP, x86asm.LJMP, x86asm.CALL, x86asm.LCALL, x86asm.RET, x86asm.LRET,
		x86asm.IRET, x86asm.IRETD, x86asm.IRETQ, x86asm.INT, x86asm.INTO, x86asm.UD1, x86asm.UD2,
		x86asm.HLT, x86asm.SYSCALL, x86asm.SYSENTER, x86asm.SYSEXIT, x86asm.SYSRET,
		x86asm.LOOP, x86asm.LOOPE, x86asm.LOOPNE, x86asm.JCXZ, x86asm.JECXZ, x86asm.JRCXZ,
		x86asm.XABORT, x86asm.XBEGIN, x86asm.XEND:
		return true
	}
	return false
}

// sxRel returns the function-relative target of a relative branch or call.
func sxRel(in *Inst) (int64, bool) {
	rel, ok := in.x.Args[0].(x86asm.Rel)
	if !ok || !in.direct || in.x.Op != in.Op {
		return 0, false
	}
	return int64(in.Offset) + int64(in.Len) + int64(rel), true
}

// sxPlainBranch returns the target of an unprefixed relative jump, jcc or
// call whose op is op. Prefixed branches are never used for the analysis:
// a 0x66 prefix truncates the target on AMD CPUs.
func sxPlainBranch(in *Inst, op x86asm.Op) (int64, bool) {
	if in.Op != op || !in.plain {
		return 0, false
	}
	return sxRel(in)
}

// sxFunc is a decoded function; its instructions are in offset order, and
// an offset is found by binary search (a map read that misses would trap
// at the Guard's own probe: the decoder runs in the watched process).
type sxFunc struct {
	insts []Inst
	size  uint64
}

func sxNewFunc(insts []Inst) sxFunc {
	f := sxFunc{insts: insts}
	if n := len(insts); n > 0 {
		f.size = insts[n-1].Offset + uint64(insts[n-1].Len)
	}
	return f
}

// at returns the index of the instruction starting at offset off.
func (f *sxFunc) at(off uint64) (int, bool) {
	i, ok := slices.BinarySearchFunc(f.insts, off, func(in Inst, off uint64) int { return cmp.Compare(in.Offset, off) })
	return i, ok
}

// boundary returns the index of the instruction starting at target.
func (f *sxFunc) boundary(target int64) (int, bool) {
	if target < 0 || uint64(target) >= f.size {
		return 0, false
	}
	return f.at(uint64(target))
}
