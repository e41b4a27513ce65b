package x86site

// This file steps over VEX- and EVEX-encoded instructions (amd64 only),
// which golang.org/x/arch's x86 decoder does not know ("unknown AVX
// Opcode"), but which the Go compiler emits in the runtime's map functions
// for GOAMD64=v3 and v4 (SHLX, SARX, BLSR, ANDN, ... and vector moves). The
// site finders need their length, to stay on instruction boundaries, and
// which general registers they may write, for the data-flow pass; both
// follow from the prefix and the ModRM byte alone. No VEX or EVEX
// instruction is a branch, and none is ever chosen as a probe site.

import (
	"errors"
	"fmt"
)

// sxVEX is what the analysis knows of a VEX or EVEX instruction.
type sxVEX struct {
	regs []int // sxGPR indices of the general registers it may write
	mem  bool  // it has a memory operand, which it may write
}

// sxIsVEX reports whether b starts with a VEX (C4, C5) or EVEX (62)
// prefix; in 64-bit mode those bytes are nothing else.
func sxIsVEX(b []byte) bool {
	return len(b) > 0 && (b[0] == 0xc4 || b[0] == 0xc5 || b[0] == 0x62)
}

// sxDecodeVEX decodes the length and register effects of the VEX or EVEX
// instruction at the start of b.
//
// sxDecodeVEX is one decoding of the VEX/EVEX prefix, field by field,
// in the order of the encoding.
func sxDecodeVEX(b []byte) (Inst, error) {
	var n int                // prefix length
	var mmap, pp byte        // opcode map (1 0F, 2 0F38, 3 0F3A) and implied prefix
	var rExt, bExt, vvvv int // ModRM.reg and .rm extensions, VEX.vvvv (a register)
	switch b[0] {
	case 0xc5:
		if len(b) < 2 {
			return Inst{}, errors.New("truncated VEX prefix")
		}
		n, mmap, pp = 2, 1, b[1]&3
		rExt = int(^b[1]>>7&1) << 3
		vvvv = int(^b[1] >> 3 & 0xf)
	case 0xc4:
		if len(b) < 3 {
			return Inst{}, errors.New("truncated VEX prefix")
		}
		n, mmap, pp = 3, b[1]&0x1f, b[2]&3
		rExt, bExt = int(^b[1]>>7&1)<<3, int(^b[1]>>5&1)<<3
		vvvv = int(^b[2] >> 3 & 0xf)
	case 0x62:
		if len(b) < 4 {
			return Inst{}, errors.New("truncated EVEX prefix")
		}
		n, mmap, pp = 4, b[1]&7, b[2]&3
		rExt, bExt = int(^b[1]>>7&1)<<3, int(^b[1]>>5&1)<<3
		vvvv = int(^b[2] >> 3 & 0xf)
	default:
		return Inst{}, errors.New("no VEX prefix")
	}
	if mmap < 1 || mmap > 3 {
		return Inst{}, fmt.Errorf("VEX opcode map %d", mmap)
	}
	if len(b) < n+2 {
		return Inst{}, errors.New("truncated VEX instruction")
	}
	if mmap == 1 && b[n] == 0x77 {
		// VZEROUPPER, VZEROALL: no ModRM.
		in := Inst{Len: n + 1, Text: fmt.Sprintf("VEX(% x)", b[:n+1]), direct: true, vex: &sxVEX{}}
		in.x.Len, in.x.Mode = n+1, 64
		return in, nil
	}
	op, modrm := b[n], b[n+1]
	l := n + 2
	mod, reg, rm := modrm>>6, int(modrm>>3&7)|rExt, int(modrm&7)
	if mod != 3 {
		switch {
		case rm == 4: // SIB
			if len(b) < l+1 {
				return Inst{}, errors.New("truncated VEX instruction")
			}
			if mod == 0 && b[l]&7 == 5 {
				l += 4
			}
			l++
		case mod == 0 && rm == 5: // RIP-relative
			l += 4
		}
		switch mod {
		case 1:
			l++ // disp8 (scaled in EVEX, still one byte)
		case 2:
			l += 4
		}
	}
	if mmap == 3 || mmap == 1 && (op >= 0x70 && op <= 0x73 || op == 0xc2 || op >= 0xc4 && op <= 0xc6) {
		l++ // imm8
	}
	if l > len(b) || l > 15 {
		return Inst{}, errors.New("truncated VEX instruction")
	}

	// The general registers it may write: BMI1/BMI2 (0F38 F0-F7, RORX)
	// write ModRM.reg, or VEX.vvvv (BLSR, BLSMSK, BLSI), or both (MULX);
	// moves and extractions from vector or mask registers write ModRM.reg
	// or, register-direct, ModRM.rm. Other VEX instructions write vector
	// registers, flags or memory only.
	v := &sxVEX{mem: mod != 3}
	rmReg := -1
	if mod == 3 {
		rmReg = int(modrm&7) | bExt
	}
	switch {
	case mmap == 2 && op >= 0xf0:
		switch op {
		case 0xf3:
			v.regs = []int{vvvv}
		case 0xf6:
			v.regs = []int{reg, vvvv}
		default:
			v.regs = []int{reg}
		}
	case mmap == 3 && op == 0xf0:
		v.regs = []int{reg}
	case mmap == 3 && op >= 0x14 && op <= 0x17 && rmReg >= 0:
		v.regs = []int{rmReg}
	case mmap == 1 && (op == 0x50 || op == 0xd7 || op == 0x2c || op == 0x2d || op == 0xc5 || op == 0x93 || op == 0x78 || op == 0x79):
		v.regs = []int{reg}
	case mmap == 1 && op == 0x7e && pp == 1 && rmReg >= 0:
		v.regs = []int{rmReg}
	}
	text := fmt.Sprintf("VEX(% x)", b[:l])
	in := Inst{Len: l, Text: text, direct: true, vex: v}
	in.x.Len, in.x.Mode = l, 64
	return in, nil
}

// stepVEX applies a VEX instruction to the data-flow state: the registers
// it may write become unknown, and a memory operand may have been written.
func (s *sxState) stepVEX(in *Inst) error {
	for _, r := range in.vex.regs {
		if r == sxRSP {
			return fmt.Errorf("%s at +%#x writes SP", in.Text, in.Offset)
		}
		s.regs[r] = sxUnknown
		if r == sxRBP {
			s.framed = false
		}
	}
	if in.vex.mem {
		s.slots.reset()
	}
	return nil
}
