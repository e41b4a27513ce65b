package x86site

import (
	"errors"
	"fmt"

	"golang.org/x/arch/x86/x86asm"
)

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
//
// step is one switch over instruction kinds; each case is short.
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
