package x86site

// This file finds uprobe sites inside Go runtime functions (amd64 only).
//
// A uprobe must sit on the first byte of an instruction: one placed inside an
// instruction corrupts the process. Every offset returned here therefore comes
// from decoding the whole function linearly from its first byte, and any
// decode problem makes the function unprobeable (fail closed).
//
// Two kinds of site are found:
//
//   - EntrySite: the first instruction after the stack-check branch of the Go
//     prologue. A probe at offset 0 would fire twice whenever the stack grows
//     (morestack jumps back to the function entry); the instruction after the
//     JBE runs once per call. It is normally PUSHQ BP, which the kernel
//     emulates instead of single-stepping.
//
//   - NilMapSite: the first instruction of the block a map function runs
//     when its map argument (RBX in the register ABI) is nil. The shape
//     around it is checked instruction by instruction, and a small data-flow
//     pass proves that RAX still holds the map type and RBX the map there.

import (
	"errors"
	"fmt"

	"golang.org/x/arch/x86/x86asm"
)

// ErrUnrecognized is wrapped by every error of EntrySite, NilMapSite,
// MissSites, CallSites and ParsePrologue: the function does not have a
// shape this package can prove. Callers must then not place the probe.
var ErrUnrecognized = errors.New("function shape not recognised")

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
	insts := make([]Inst, 0, min(len(code)/4+1, 1024))
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

// sxFunc indexes a decoded function by instruction offset.
type sxFunc struct {
	insts []Inst
	index map[uint64]int
	size  uint64
}

func sxNewFunc(insts []Inst) sxFunc {
	f := sxFunc{insts: insts, index: make(map[uint64]int, len(insts))}
	for i := range insts {
		f.index[insts[i].Offset] = i
	}
	if n := len(insts); n > 0 {
		f.size = insts[n-1].Offset + uint64(insts[n-1].Len)
	}
	return f
}

// boundary returns the index of the instruction starting at target.
func (f *sxFunc) boundary(target int64) (int, bool) {
	if target < 0 || uint64(target) >= f.size {
		return 0, false
	}
	i, ok := f.index[uint64(target)]
	return i, ok
}

// Prologue is the recognised Go stack-check prologue.
type Prologue struct {
	AfterStackCheck uint64 // offset of the first instruction after the JBE/JLS to morestack: the entry site
	FrameSet        uint64 // offset of the first instruction after PUSHQ BP; MOVQ SP, BP (frame pointer set); 0 if none
}

// sxPrologue is Prologue plus the instruction indices the analysis needs.
type sxPrologue struct {
	Prologue
	after    int   // index of the instruction at AfterStackCheck
	branches []int // indices of the branches to morestack (taken only when the stack must grow)
}

// ParsePrologue recognises the stack-check prologue the Go compiler emits on
// amd64 with the register ABI (R14 = g, g.stackguard0 at 0x10):
//
//	CMPQ SP, 0x10(R14); JBE more                               (small frames)
//	LEAQ -N(SP), R; CMPQ R, 0x10(R14); JBE more                (larger frames)
//	MOVQ SP, R; SUBQ $N, R; JB more; CMPQ R, 0x10(R14); JBE more (huge frames)
//
// where more is a later instruction of the same function; an ENDBR64 may
// precede it. insts must come from Decode.
func ParsePrologue(insts []Inst) (Prologue, error) {
	p, err := sxParsePrologue(insts)
	return p.Prologue, err
}

func sxParsePrologue(insts []Inst) (sxPrologue, error) {
	var p sxPrologue
	f := sxNewFunc(insts)
	for i := range insts {
		if !insts[i].direct || insts[i].x.Op != insts[i].Op || insts[i].Len != insts[i].x.Len {
			return p, fmt.Errorf("%w: instructions not produced by Decode", ErrUnrecognized)
		}
		if i > 0 && insts[i].Offset != insts[i-1].Offset+uint64(insts[i-1].Len) {
			return p, fmt.Errorf("%w: instructions not contiguous", ErrUnrecognized)
		}
	}
	if len(insts) == 0 || insts[0].Offset != 0 {
		return p, fmt.Errorf("%w: decoding does not start at the function entry", ErrUnrecognized)
	}
	at := func(i int) *Inst {
		if i < len(insts) {
			return &insts[i]
		}
		return nil
	}
	// guard matches CMPQ R, 0x10(R14) and returns R.
	guard := func(in *Inst) (x86asm.Reg, bool) {
		if in == nil || in.Op != x86asm.CMP || in.x.DataSize != 64 {
			return 0, false
		}
		r, ok1 := in.x.Args[0].(x86asm.Reg)
		m, ok2 := in.x.Args[1].(x86asm.Mem)
		if !ok1 || !ok2 || m != (x86asm.Mem{Base: x86asm.R14, Disp: 0x10}) {
			return 0, false
		}
		return r, true
	}
	// more checks a branch to the morestack tail: unprefixed, forward,
	// on an instruction boundary of this function.
	more := func(i int, op x86asm.Op) (int64, bool) {
		in := at(i)
		if in == nil {
			return 0, false
		}
		t, ok := sxPlainBranch(in, op)
		if !ok || t <= int64(in.Offset) {
			return 0, false
		}
		_, ok = f.boundary(t)
		return t, ok
	}
	tmpReg := func(r x86asm.Reg) bool {
		return sxFamily(r) == sxFamNone && r >= x86asm.RAX && r <= x86asm.R15
	}
	// An ENDBR64 before the prologue (not emitted by the Go toolchain, but
	// harmless) is skipped.
	b0 := 0
	if insts[0].endbr && insts[0].Text == "ENDBR64" {
		b0 = 1
	}
	ok := false
	if r, g := guard(at(b0)); g && r == x86asm.RSP {
		if _, b := more(b0+1, x86asm.JBE); b {
			p.branches, p.after, ok = []int{b0 + 1}, b0+2, true
		}
	} else if lea := at(b0); lea != nil && lea.Op == x86asm.LEA && lea.x.DataSize == 64 {
		dst, ok1 := lea.x.Args[0].(x86asm.Reg)
		m, ok2 := lea.x.Args[1].(x86asm.Mem)
		if ok1 && ok2 && tmpReg(dst) && m.Base == x86asm.RSP && m.Index == 0 && m.Segment == 0 && m.Disp < 0 {
			if r, g := guard(at(b0 + 1)); g && r == dst {
				if _, b := more(b0+2, x86asm.JBE); b {
					p.branches, p.after, ok = []int{b0 + 2}, b0+3, true
				}
			}
		}
	} else if mov := at(b0); mov != nil && mov.Op == x86asm.MOV && mov.x.DataSize == 64 && mov.x.Args[1] == x86asm.RSP {
		dst, ok1 := mov.x.Args[0].(x86asm.Reg)
		sub := at(b0 + 1)
		if ok1 && tmpReg(dst) && sub != nil && sub.Op == x86asm.SUB && sub.x.DataSize == 64 && sub.x.Args[0] == dst {
			if _, imm := sub.x.Args[1].(x86asm.Imm); imm {
				t1, b1 := more(b0+2, x86asm.JB)
				r, g := guard(at(b0 + 3))
				t2, b2 := more(b0+4, x86asm.JBE)
				if b1 && g && r == dst && b2 && t1 == t2 {
					p.branches, p.after, ok = []int{b0 + 2, b0 + 4}, b0+5, true
				}
			}
		}
	}
	if !ok || p.after >= len(insts) {
		return p, fmt.Errorf("%w: no stack-check prologue", ErrUnrecognized)
	}
	p.AfterStackCheck = insts[p.after].Offset
	if push, mov := at(p.after), at(p.after+1); push != nil && mov != nil && p.after+2 < len(insts) &&
		push.Op == x86asm.PUSH && push.x.Args[0] == x86asm.RBP && push.x.DataSize != 16 &&
		mov.Op == x86asm.MOV && mov.x.Args[0] == x86asm.RBP && mov.x.Args[1] == x86asm.RSP {
		p.FrameSet = insts[p.after+2].Offset
	}
	return p, nil
}

// Site is a probe location inside one function.
type Site struct {
	Offset   uint64 // from the function entry; always the start of a decoded instruction
	Inst     string // GoSyntax text of the instruction at Offset
	Emulated bool   // the x86 kernel emulates this instruction (cheap) rather than single-stepping it
	Framed   bool   // the function's frame pointer is set up at this site: return PC at [BP+8]; else at [SP]
}

func sxSite(in *Inst, framed bool) Site {
	return Site{Offset: in.Offset, Inst: in.sxText(), Emulated: in.Emulated, Framed: framed}
}

// sxDecodeFunc decodes a whole function and recognises its prologue. Every
// error wraps ErrUnrecognized.
func sxDecodeFunc(code []byte) ([]Inst, sxPrologue, error) {
	insts, err := sxDecode(code, false)
	if err != nil {
		return nil, sxPrologue{}, fmt.Errorf("%w: %w", ErrUnrecognized, err)
	}
	p, err := sxParsePrologue(insts)
	if err != nil {
		return nil, sxPrologue{}, err
	}
	return insts, p, nil
}

// EntrySite returns the first instruction after the stack-check branch of
// the function whose body is code. The stack pointer is still the entry's
// there, so the return PC is at [SP] (Framed is false).
func EntrySite(code []byte) (Site, error) {
	insts, p, err := sxDecodeFunc(code)
	if err != nil {
		return Site{}, err
	}
	return sxSite(&insts[p.after], false), nil
}

// MapOp selects the shape NilMapSite looks for.
type MapOp uint8

const (
	// MapAssign: runtime.mapassign*, whose nil-map block panics.
	MapAssign MapOp = iota + 1
	// MapAccess: runtime.mapaccess1*/mapaccess2*, whose nil-or-empty block
	// returns the zero value.
	MapAccess
)

// sxMaxNilCheck bounds the index of the TESTQ BX, BX instruction.
const sxMaxNilCheck = 24

// sxMaxRacePath bounds the straight-line path between the nil check and the
// merged branch of -race builds (see NilMapSite).
const sxMaxRacePath = 48

// sxMaxPanicBlock bounds the instructions between a nil-map block's start
// and its CALL runtime.gopanic.
const sxMaxPanicBlock = 12

func sxReject(reason string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrUnrecognized, fmt.Sprintf(reason, args...))
}

// NilMapSite finds the first instruction of the block a Go map function runs
// when its map argument is nil. code is the whole function body, entry the
// address code starts at (for absolute call targets: entry+off+len+rel) and
// callee resolves an absolute address to a function name ("" if unknown).
//
// Shapes accepted (after the stack-check prologue, with the frame pointer
// set, and TESTQ BX, BX among the first 24 instructions):
//
//	MapAssign: TESTQ BX, BX; JE nil          (or JNE around a fall-through nil block)
//	           nil: ... CALL runtime.gopanic within 12 instructions, only forward
//	                jcc inside, no other call, jump or return before it
//	MapAccess: TESTQ BX, BX; JE L; [NOPs] CMPQ 0(BX), $0; [NOPs] JE L
//	-race:     TESTQ BX, BX; JE M; <straight line, calls allowed>; M: JE L; [NOPs]
//	           CMPQ 0(BX), $0; [NOPs] JE L
//	           (the nil path reaches M with ZF still set by TESTQ BX, BX, so M
//	           always jumps to L for it)
//
// On every path into the site RAX must still hold the map type and RBX the
// map. That is proved by a data-flow pass from the function entry over a
// whitelist of instructions whose register effects are known (anything else
// is rejected), tracking copies through the function's own argument spill
// slots. The site must be an instruction boundary inside the function,
// forward of the checks, reached by no other direct branch and not by
// fall-through from the instruction before it; no direct branch may enter
// the checked path (entry to last check) except at the entry; and the
// function must have no indirect jump (that could reach either). Every
// error wraps ErrUnrecognized.
func NilMapSite(code []byte, entry uint64, op MapOp, callee func(addr uint64) string) (Site, error) {
	if op != MapAssign && op != MapAccess {
		return Site{}, sxReject("unknown map op %d", op)
	}
	insts, p, err := sxDecodeFunc(code)
	if err != nil {
		return Site{}, err
	}
	if p.FrameSet == 0 {
		return Site{}, sxReject("no frame pointer set-up after the stack check")
	}
	f := sxNewFunc(insts)
	for i := range insts {
		in := &insts[i]
		if in.Op == x86asm.JMP || in.Op == x86asm.LJMP {
			if _, ok := in.x.Args[0].(x86asm.Rel); !ok {
				return Site{}, sxReject("indirect jump at +%#x", in.Offset)
			}
		}
	}

	// Walk the straight-line path from the end of the stack check (whose
	// instructions only compute a scratch register and branch to
	// morestack) to TESTQ BX, BX.
	st := sxNewState()
	test := -1
	for i := p.after; i < len(insts) && i < sxMaxNilCheck; i++ {
		in := &insts[i]
		if sxIsTestBX(in) {
			test = i
			break
		}
		if err := st.step(in, insts[:i]); err != nil {
			return Site{}, sxReject("before nil check: %v", err)
		}
	}
	if test < 0 {
		return Site{}, sxReject("no nil check (TESTQ BX, BX) in the first %d instructions", sxMaxNilCheck)
	}
	if insts[test].Offset < p.FrameSet {
		return Site{}, sxReject("nil check before the frame is set up")
	}
	if err := st.ready(); err != nil {
		return Site{}, sxReject("at nil check: %v", err)
	}
	if test+1 >= len(insts) {
		return Site{}, sxReject("no branch after nil check")
	}
	br := &insts[test+1]

	var site int           // index of the site instruction
	var refs []int         // the only direct branches allowed to target the site
	var minSite uint64     // the site must start at or after this offset
	fallthroughOK := false // the site is the fall-through of insts[site-1]
	end := test + 1        // last instruction of the checked straight-line path
	merge := -1            // -race form: index of the merged JE
	switch op {
	case MapAssign:
		if t, ok := sxPlainBranch(br, x86asm.JE); ok {
			i, ok := f.boundary(t)
			if !ok {
				return Site{}, sxReject("branch target not an instruction boundary")
			}
			site, refs, minSite = i, []int{test + 1}, br.Offset+uint64(br.Len)
		} else if t, ok := sxPlainBranch(br, x86asm.JNE); ok {
			if _, ok := f.boundary(t); !ok || t <= int64(br.Offset) {
				return Site{}, sxReject("branch target not an instruction boundary")
			}
			if test+2 >= len(insts) {
				return Site{}, sxReject("no nil block after JNE")
			}
			site, fallthroughOK, minSite = test+2, true, insts[test+2].Offset
		} else {
			return Site{}, sxReject("nil check not followed by JE/JNE")
		}
		if err := sxReachesPanic(&f, site, entry, callee); err != nil {
			return Site{}, sxReject("nil block: %v", err)
		}
	case MapAccess:
		t1, ok := sxPlainBranch(br, x86asm.JE)
		if !ok {
			return Site{}, sxReject("nil check not followed by JE")
		}
		l1, ok := f.boundary(t1)
		if !ok {
			return Site{}, sxReject("branch target not an instruction boundary")
		}
		if l1 <= test+1 {
			return Site{}, sxReject("nil check branches backwards")
		}
		next := test + 2
		var last int // index of the JE after CMPQ 0(BX), $0
		var target int64
		if t2, ok := sxPlainBranch(&insts[l1], x86asm.JE); ok {
			// -race shape: the nil path lands on a JE that re-tests the same
			// flags. Prove the straight-line path into it keeps RAX/RBX.
			merge = l1
			if merge-next > sxMaxRacePath {
				return Site{}, sxReject("merged branch too far from the nil check")
			}
			s2 := st.clone()
			for i := next; i < merge; i++ {
				in := &insts[i]
				if in.Op == x86asm.CALL {
					if !sxCallOK(in) {
						return Site{}, sxReject("unexpected call at +%#x", in.Offset)
					}
					s2.call()
					continue
				}
				if err := s2.step(in, insts[:i]); err != nil {
					return Site{}, sxReject("between nil check and merged branch: %v", err)
				}
			}
			if err := s2.ready(); err != nil {
				return Site{}, sxReject("at merged branch: %v", err)
			}
			target, next, refs = t2, merge+1, []int{merge}
		} else {
			target, refs = t1, []int{test + 1}
		}
		for next < len(insts) && insts[next].Op == x86asm.NOP && !insts[next].endbr {
			next++
		}
		if next >= len(insts) || !sxIsCmpZeroBX(&insts[next]) {
			return Site{}, sxReject("no empty-map check (CMPQ 0(BX), $0) after the nil check")
		}
		next++
		for next < len(insts) && insts[next].Op == x86asm.NOP && !insts[next].endbr {
			next++
		}
		if next >= len(insts) {
			return Site{}, sxReject("no branch after the empty-map check")
		}
		last = next
		t3, ok := sxPlainBranch(&insts[last], x86asm.JE)
		if !ok || t3 != target {
			return Site{}, sxReject("nil and empty-map checks do not branch to the same block")
		}
		i, ok := f.boundary(target)
		if !ok {
			return Site{}, sxReject("branch target not an instruction boundary")
		}
		site, refs, minSite, end = i, append(refs, last), insts[last].Offset+uint64(insts[last].Len), last
	}
	// Nothing but the paths analysed may enter the checked code (from the
	// entry to the last check): a branch into its middle would bring other
	// register values. The entry itself (morestack jumps back there) and,
	// in the -race form, the nil check's JE to the merged JE are allowed.
	for i := range insts {
		t, ok := sxRel(&insts[i])
		if !ok || t <= 0 || t > int64(insts[end].Offset) {
			continue
		}
		if merge >= 0 && i == test+1 && t == int64(insts[merge].Offset) {
			continue
		}
		return Site{}, sxReject("branch from +%#x into the checked path at +%#x", insts[i].Offset, t)
	}
	in := &insts[site]
	if in.Offset < minSite {
		return Site{}, sxReject("nil block not after the checks")
	}
	// No other way into the site.
	for i := range insts {
		t, ok := sxRel(&insts[i])
		if !ok || t != int64(in.Offset) {
			continue
		}
		allowed := false
		for _, r := range refs {
			allowed = allowed || r == i
		}
		if !allowed {
			return Site{}, sxReject("site also reached from +%#x", insts[i].Offset)
		}
	}
	if !fallthroughOK {
		if site == 0 || !sxNoFallthrough(&insts[site-1]) {
			return Site{}, sxReject("site reached by fall-through")
		}
	}
	return sxSite(in, true), nil
}

// sxIsTestBX matches TESTQ BX, BX.
func sxIsTestBX(in *Inst) bool {
	return in.Op == x86asm.TEST && in.x.Args[0] == x86asm.RBX && in.x.Args[1] == x86asm.RBX && in.x.Args[2] == nil
}

// sxIsCmpZeroBX matches CMPQ 0(BX), $0.
func sxIsCmpZeroBX(in *Inst) bool {
	if in.Op != x86asm.CMP || in.x.MemBytes != 8 || in.x.Args[2] != nil {
		return false
	}
	m, ok := in.x.Args[0].(x86asm.Mem)
	imm, ok2 := in.x.Args[1].(x86asm.Imm)
	return ok && ok2 && m == (x86asm.Mem{Base: x86asm.RBX}) && imm == 0
}

// sxCallOK accepts an unprefixed CALL rel32 or a CALL through a 64-bit
// register (REX allowed for R8-R15).
func sxCallOK(in *Inst) bool {
	if in.Op != x86asm.CALL || in.legacy || !in.direct || in.x.Op != in.Op {
		return false
	}
	switch a := in.x.Args[0].(type) {
	case x86asm.Rel:
		return in.plain
	case x86asm.Reg:
		return a >= x86asm.RAX && a <= x86asm.R15
	}
	return false
}

// sxNoFallthrough reports whether execution never continues after in.
func sxNoFallthrough(in *Inst) bool {
	switch in.Op {
	case x86asm.JMP, x86asm.RET, x86asm.UD2:
		return true
	case x86asm.INT:
		return in.x.Args[0] == x86asm.Imm(3)
	}
	return false
}

// sxReachesPanic checks that the block starting at insts[start] calls
// runtime.gopanic within sxMaxPanicBlock instructions, with only forward
// conditional jumps (that land before the call) and no other control flow.
func sxReachesPanic(f *sxFunc, start int, entry uint64, callee func(uint64) string) error {
	if callee == nil {
		return errors.New("no callee resolver")
	}
	var maxTarget int64 = -1
	for i := start; i < len(f.insts) && i < start+sxMaxPanicBlock; i++ {
		in := &f.insts[i]
		if !sxControl(in.Op) {
			continue
		}
		if sxCondJump(in.Op) {
			t, ok := sxPlainBranch(in, in.Op)
			if !ok || t <= int64(in.Offset) {
				return fmt.Errorf("unexpected branch at +%#x", in.Offset)
			}
			if _, ok := f.boundary(t); !ok {
				return fmt.Errorf("branch at +%#x: target not an instruction boundary", in.Offset)
			}
			maxTarget = max(maxTarget, t)
			continue
		}
		t, ok := sxPlainBranch(in, x86asm.CALL)
		if !ok {
			return fmt.Errorf("%s at +%#x before any panic call", in.sxText(), in.Offset)
		}
		if name := callee(entry + uint64(t)); name != "runtime.gopanic" {
			return fmt.Errorf("calls %q, not runtime.gopanic", name)
		}
		if maxTarget > int64(in.Offset) {
			return fmt.Errorf("branch jumps past the panic call")
		}
		return nil
	}
	return errors.New("no runtime.gopanic call")
}

// Register families tracked by the data-flow pass.
const (
	sxFamNone = iota
	sxFamAX
	sxFamBX
	sxFamSP
	sxFamBP
)

// Indices of general registers in sxGPR numbering (the x86 encoding order).
const (
	sxRAX = 0
	sxRBX = 3
	sxRSP = 4
	sxRBP = 5
)

// sxGPR maps any general register name (8, 16, 32 or 64 bits, including
// AH-BH) to the index 0-15 of the 64-bit register holding it; full reports
// a 64-bit name.
func sxGPR(r x86asm.Reg) (idx int, full, ok bool) {
	switch {
	case r >= x86asm.RAX && r <= x86asm.R15:
		return int(r - x86asm.RAX), true, true
	case r >= x86asm.EAX && r <= x86asm.R15L:
		return int(r - x86asm.EAX), false, true
	case r >= x86asm.AX && r <= x86asm.R15W:
		return int(r - x86asm.AX), false, true
	case r >= x86asm.AL && r <= x86asm.R15B:
		// AL CL DL BL AH CH DH BH SPB BPB SIB DIB R8B..R15B
		i := int(r - x86asm.AL)
		if i >= 4 {
			i -= 4
		}
		return i, false, true
	}
	return 0, false, false
}

func sxFamily(r x86asm.Reg) int {
	idx, _, ok := sxGPR(r)
	if !ok {
		return sxFamNone
	}
	switch idx {
	case sxRAX:
		return sxFamAX
	case sxRBX:
		return sxFamBX
	case sxRSP:
		return sxFamSP
	case sxRBP:
		return sxFamBP
	}
	return sxFamNone
}

// sxVal is what the data-flow pass knows about a register or stack slot.
type sxVal uint8

const (
	sxUnknown sxVal = iota
	sxMapType       // the map type argument (RAX at entry)
	sxMap           // the map argument (RBX at entry)
)

// sxState is the abstract machine state of the data-flow pass.
type sxState struct {
	regs    [16]sxVal       // by sxGPR index
	sp      int64           // SP relative to the entry SP (which points at the return PC)
	framed  bool            // PUSHQ BP; MOVQ SP, BP done and BP not written since
	slots   map[int64]sxVal // 8-byte stack slots by address relative to the entry SP
	escaped bool            // a stack address escaped: stop trusting slots
}

func sxNewState() *sxState {
	s := &sxState{slots: map[int64]sxVal{}}
	s.regs[sxRAX], s.regs[sxRBX] = sxMapType, sxMap
	return s
}

func (s *sxState) clone() *sxState {
	c := *s
	c.slots = make(map[int64]sxVal, len(s.slots))
	for k, v := range s.slots {
		c.slots[k] = v
	}
	return &c
}

func (s *sxState) ready() error {
	switch {
	case s.regs[sxRAX] != sxMapType:
		return errors.New("RAX no longer holds the map type")
	case s.regs[sxRBX] != sxMap:
		return errors.New("RBX no longer holds the map")
	case !s.framed:
		return errors.New("frame pointer not set")
	}
	return nil
}

// call applies a Go ABI call: every general register but SP and BP is
// clobbered, and the callee may write our outgoing-argument area (anything
// below the entry SP). Our own incoming-argument spill slots (at and above
// entry SP + 8, in the caller's frame) survive unless their address escaped.
func (s *sxState) call() {
	s.regs = [16]sxVal{}
	for k := range s.slots {
		if k < 8 {
			delete(s.slots, k)
		}
	}
}

func (s *sxState) get(r x86asm.Reg) sxVal {
	if idx, full, ok := sxGPR(r); ok && full {
		return s.regs[idx]
	}
	return sxUnknown
}

// stackKey returns the slot address of an SP-based memory operand.
func (s *sxState) stackKey(m x86asm.Mem) (int64, bool) {
	if m.Base != x86asm.RSP || m.Index != 0 || m.Segment != 0 {
		return 0, false
	}
	return s.sp + m.Disp, true
}

// store records a memory write of size bytes at operand m.
func (s *sxState) store(m x86asm.Mem, size int, v sxVal) {
	k, ok := s.stackKey(m)
	if !ok || size <= 0 {
		// Through another pointer: it could alias any slot.
		clear(s.slots)
		return
	}
	for sk := range s.slots {
		if sk < k+int64(size) && k < sk+8 {
			delete(s.slots, sk)
		}
	}
	if size == 8 && v != sxUnknown && !s.escaped {
		s.slots[k] = v
	}
}

func (s *sxState) load(m x86asm.Mem, size int) sxVal {
	k, ok := s.stackKey(m)
	if !ok || size != 8 || s.escaped {
		return sxUnknown
	}
	return s.slots[k]
}

func (s *sxState) escape() {
	s.escaped = true
	clear(s.slots)
}

// setReg records a write of v to register r.
// A write to part of a register (or a 32-bit write, which zero-extends)
// leaves it unknown.
func (s *sxState) setReg(r x86asm.Reg, v sxVal) {
	idx, full, ok := sxGPR(r)
	if !ok {
		return // not a general register (XMM and the like)
	}
	if !full {
		v = sxUnknown
	}
	s.regs[idx] = v
	if idx == sxRBP {
		s.framed = false
	}
}

// sxWritesDst lists the instructions whose only architectural effects are
// writing Args[0] (register or memory) and the flags.
var sxWritesDst = map[x86asm.Op]bool{
	x86asm.MOV: true, x86asm.MOVZX: true, x86asm.MOVSX: true, x86asm.MOVSXD: true, x86asm.LEA: true,
	x86asm.ADD: true, x86asm.SUB: true, x86asm.AND: true, x86asm.OR: true, x86asm.XOR: true,
	x86asm.ADC: true, x86asm.SBB: true, x86asm.INC: true, x86asm.DEC: true, x86asm.NEG: true,
	x86asm.NOT: true, x86asm.SHL: true, x86asm.SHR: true, x86asm.SAR: true, x86asm.ROL: true,
	x86asm.ROR: true, x86asm.BTS: true, x86asm.BTR: true, x86asm.BTC: true, x86asm.BSF: true,
	x86asm.BSR: true, x86asm.POPCNT: true, x86asm.TZCNT: true, x86asm.LZCNT: true,
	x86asm.BSWAP: true, x86asm.IMUL: true,
	x86asm.SETA: true, x86asm.SETAE: true, x86asm.SETB: true, x86asm.SETBE: true, x86asm.SETE: true,
	x86asm.SETG: true, x86asm.SETGE: true, x86asm.SETL: true, x86asm.SETLE: true, x86asm.SETNE: true,
	x86asm.SETNO: true, x86asm.SETNP: true, x86asm.SETNS: true, x86asm.SETO: true, x86asm.SETP: true,
	x86asm.SETS:  true,
	x86asm.CMOVA: true, x86asm.CMOVAE: true, x86asm.CMOVB: true, x86asm.CMOVBE: true, x86asm.CMOVE: true,
	x86asm.CMOVG: true, x86asm.CMOVGE: true, x86asm.CMOVL: true, x86asm.CMOVLE: true, x86asm.CMOVNE: true,
	x86asm.CMOVNO: true, x86asm.CMOVNP: true, x86asm.CMOVNS: true, x86asm.CMOVO: true, x86asm.CMOVP: true,
	x86asm.CMOVS:  true,
	x86asm.MOVUPS: true, x86asm.MOVAPS: true, x86asm.MOVDQU: true, x86asm.MOVDQA: true,
	x86asm.MOVQ: true, x86asm.MOVD: true, x86asm.MOVSD_XMM: true, x86asm.MOVSS: true,
	x86asm.PXOR: true, x86asm.XORPS: true,
}

// sxNoWrite lists instructions that write no register or memory (flags only).
var sxNoWrite = map[x86asm.Op]bool{
	x86asm.NOP: true, x86asm.TEST: true, x86asm.CMP: true, x86asm.BT: true, x86asm.PAUSE: true,
}

// step applies one straight-line instruction. prev are the instructions
// before it (to recognise MOVQ SP, BP right after PUSHQ BP).
func (s *sxState) step(in *Inst, prev []Inst) error {
	if in.vex != nil && in.direct {
		return s.stepVEX(in)
	}
	x := &in.x
	if !in.direct || x.Op != in.Op {
		return errors.New("instruction not from Decode")
	}
	if sxHasLock(x) {
		return fmt.Errorf("locked instruction %s at +%#x", in.sxText(), in.Offset)
	}
	// Any use of SP as a plain register operand (not a memory base) other
	// than the known forms makes stack addresses escape.
	spOperand := false
	for j, a := range x.Args {
		if r, ok := a.(x86asm.Reg); ok && sxFamily(r) == sxFamSP && j > 0 {
			spOperand = true
		}
	}
	switch {
	case sxNoWrite[in.Op]:
		if spOperand {
			s.escape() // harmless, but keep the rule simple
		}
		return nil
	case in.Op == x86asm.PUSH:
		// x86asm reports DataSize 32 for a 64-bit PUSH; 16 is PUSHW.
		if x.DataSize == 16 {
			return fmt.Errorf("unsupported push %s at +%#x", in.sxText(), in.Offset)
		}
		v := sxUnknown
		switch a := x.Args[0].(type) {
		case x86asm.Reg:
			if sxFamily(a) == sxFamSP {
				s.escape()
			}
			v = s.get(a)
		case x86asm.Imm:
		default:
			return fmt.Errorf("unsupported push %s at +%#x", in.sxText(), in.Offset)
		}
		s.sp -= 8
		s.store(x86asm.Mem{Base: x86asm.RSP}, 8, v)
		return nil
	case sxWritesDst[in.Op]:
	default:
		return fmt.Errorf("cannot classify %s at +%#x", in.sxText(), in.Offset)
	}
	if in.Op == x86asm.IMUL && x.Args[1] == nil {
		return fmt.Errorf("one-operand IMUL at +%#x writes RDX:RAX", in.Offset)
	}
	if in.Op == x86asm.LEA {
		if m, ok := x.Args[1].(x86asm.Mem); ok && (sxFamily(m.Base) == sxFamSP || sxFamily(m.Index) == sxFamSP) {
			s.escape()
		}
	}
	switch dst := x.Args[0].(type) {
	case x86asm.Mem:
		v := sxUnknown
		if in.Op == x86asm.MOV && x.MemBytes == 8 {
			if r, ok := x.Args[1].(x86asm.Reg); ok {
				v = s.get(r)
			}
		}
		if spOperand {
			s.escape()
		}
		s.store(dst, x.MemBytes, v)
		return nil
	case x86asm.Reg:
		switch sxFamily(dst) {
		case sxFamSP:
			imm, ok := x.Args[1].(x86asm.Imm)
			if dst != x86asm.RSP || !ok || x.Args[2] != nil || (in.Op != x86asm.SUB && in.Op != x86asm.ADD) {
				return fmt.Errorf("unsupported stack pointer update %s at +%#x", in.sxText(), in.Offset)
			}
			if in.Op == x86asm.SUB {
				s.sp -= int64(imm)
			} else {
				s.sp += int64(imm)
			}
			return nil
		case sxFamBP:
			// MOVQ SP, BP right after PUSHQ BP at entry depth: the frame.
			if in.Op == x86asm.MOV && dst == x86asm.RBP && x.Args[1] == x86asm.RSP && s.sp == -8 && len(prev) > 0 {
				p := &prev[len(prev)-1]
				if p.Op == x86asm.PUSH && p.x.Args[0] == x86asm.RBP {
					s.framed = true
					return nil
				}
			}
			if spOperand {
				s.escape()
			}
			s.framed = false
			return nil
		}
		if spOperand {
			s.escape()
		}
		v := sxUnknown
		if in.Op == x86asm.MOV && x.DataSize == 64 {
			switch src := x.Args[1].(type) {
			case x86asm.Reg:
				v = s.get(src)
			case x86asm.Mem:
				v = s.load(src, x.MemBytes)
			}
		}
		s.setReg(dst, v)
		return nil
	}
	return fmt.Errorf("cannot classify destination of %s at +%#x", in.sxText(), in.Offset)
}

func sxHasLock(x *x86asm.Inst) bool {
	for _, p := range x.Prefix {
		if p == 0 {
			break
		}
		if p&0xff == x86asm.PrefixLOCK&0xff {
			return true
		}
	}
	return false
}
