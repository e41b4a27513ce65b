package x86site

import (
	"fmt"

	"golang.org/x/arch/x86/x86asm"
)

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

// sxParsePrologue matches the prologue's instructions in order; one
// case per instruction of the shape.
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
	// Len is the instruction's length. Branch and Target say where a
	// relative JMP, CALL or Jcc goes (Target: from the function entry);
	// with Offset+Len, the addresses a thread resumes at after the
	// instruction.
	Len    int
	Branch bool
	Target uint64
}

func sxSite(in *Inst, framed bool) Site {
	s := Site{Offset: in.Offset, Inst: in.sxText(), Emulated: in.Emulated, Framed: framed, Len: in.Len}
	if t, ok := sxRel(in); ok && t >= 0 {
		s.Branch, s.Target = true, uint64(t)
	}
	return s
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
		sxRelease(insts)
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
	defer sxRelease(insts)
	return sxSite(&insts[p.after], false), nil
}
