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
	regs    [16]sxVal      // by sxGPR index
	sp      int64          // SP relative to the entry SP (which points at the return PC)
	framed  bool           // PUSHQ BP; MOVQ SP, BP done and BP not written since
	slots   sxSlots[sxVal] // 8-byte stack slots by address relative to the entry SP
	escaped bool           // a stack address escaped: stop trusting slots
}

func sxNewState() *sxState {
	s := &sxState{}
	s.regs[sxRAX], s.regs[sxRBX] = sxMapType, sxMap
	return s
}

func (s *sxState) clone() *sxState {
	c := *s
	c.slots = s.slots.clone()
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
	s.slots.forget(func(k int64) bool { return k < 8 })
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
		s.slots.reset()
		return
	}
	s.slots.forget(func(sk int64) bool { return sk < k+int64(size) && k < sk+8 })
	if size == 8 && v != sxUnknown && !s.escaped {
		s.slots.set(k, v)
	}
}

func (s *sxState) load(m x86asm.Mem, size int) sxVal {
	k, ok := s.stackKey(m)
	if !ok || size != 8 || s.escaped {
		return sxUnknown
	}
	return s.slots.get(k)
}

func (s *sxState) escape() {
	s.escaped = true
	s.slots.reset()
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

// sxWritesDst reports the instructions whose only architectural effects
// are writing Args[0] (register or memory) and the flags. A switch, not a
// map: a map read that misses would trap at the Guard's own probe (the
// decoder runs in the watched process).
func sxWritesDst(op x86asm.Op) bool {
	switch op {
	case x86asm.MOV, x86asm.MOVZX, x86asm.MOVSX, x86asm.MOVSXD, x86asm.LEA, x86asm.ADD, x86asm.SUB,
		x86asm.AND, x86asm.OR, x86asm.XOR, x86asm.ADC, x86asm.SBB, x86asm.INC, x86asm.DEC, x86asm.NEG,
		x86asm.NOT, x86asm.SHL, x86asm.SHR, x86asm.SAR, x86asm.ROL, x86asm.ROR, x86asm.BTS, x86asm.BTR,
		x86asm.BTC, x86asm.BSF, x86asm.BSR, x86asm.POPCNT, x86asm.TZCNT, x86asm.LZCNT, x86asm.BSWAP,
		x86asm.IMUL, x86asm.SETA, x86asm.SETAE, x86asm.SETB, x86asm.SETBE, x86asm.SETE, x86asm.SETG,
		x86asm.SETGE, x86asm.SETL, x86asm.SETLE, x86asm.SETNE, x86asm.SETNO, x86asm.SETNP, x86asm.SETNS,
		x86asm.SETO, x86asm.SETP, x86asm.SETS, x86asm.CMOVA, x86asm.CMOVAE, x86asm.CMOVB, x86asm.CMOVBE,
		x86asm.CMOVE, x86asm.CMOVG, x86asm.CMOVGE, x86asm.CMOVL, x86asm.CMOVLE, x86asm.CMOVNE,
		x86asm.CMOVNO, x86asm.CMOVNP, x86asm.CMOVNS, x86asm.CMOVO, x86asm.CMOVP, x86asm.CMOVS,
		x86asm.MOVUPS, x86asm.MOVAPS, x86asm.MOVDQU, x86asm.MOVDQA, x86asm.MOVQ, x86asm.MOVD,
		x86asm.MOVSD_XMM, x86asm.MOVSS, x86asm.PXOR, x86asm.XORPS:
		return true
	}
	return false
}

// sxNoWrite reports instructions that write no register or memory (flags
// only).
func sxNoWrite(op x86asm.Op) bool {
	switch op {
	case x86asm.NOP, x86asm.TEST, x86asm.CMP, x86asm.BT, x86asm.PAUSE:
		return true
	}
	return false
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
	case sxNoWrite(in.Op):
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
	case sxWritesDst(in.Op):
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
