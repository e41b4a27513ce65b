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
//     In a mapassign function the site moves on to the block's first
//     emulated instruction where that still holds.

import (
	"errors"
	"fmt"

	"golang.org/x/arch/x86/x86asm"
)

// ErrUnrecognized is wrapped by every error of EntrySite, NilMapSite,
// MissSites, CallSites and ParsePrologue: the function does not have a
// shape this package can prove. Callers must then not place the probe.
var ErrUnrecognized = errors.New("function shape not recognised")

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
// when its map argument is nil (for MapAssign, that block's first emulated
// instruction where it keeps the same meaning: see sxEmulatedInBlock).
// code is the whole function body, entry the
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
//
// NilMapSite is long because it is one linear walk over the function
// that proves the shape step by step; splitting it would scatter the
// proof's state across functions.
func NilMapSite(code []byte, entry uint64, op MapOp, callee func(addr uint64) string) (Site, error) {
	if op != MapAssign && op != MapAccess {
		return Site{}, sxReject("unknown map op %d", op)
	}
	insts, p, err := sxDecodeFunc(code)
	if err != nil {
		return Site{}, err
	}
	defer sxRelease(insts)
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
	if op == MapAssign {
		if j := sxEmulatedInBlock(&f, st, site); j > site {
			return sxSite(&insts[j], true), nil
		}
	}
	return sxSite(in, true), nil
}

// sxEmulatedInBlock returns the index of a cheaper instruction with the
// same meaning as the nil-map block's first one, insts[start] (which st
// describes): the first instruction of the block's straight-line start
// that the kernel emulates, if RAX and RBX still hold the map type and
// the map there and only the fall-through from the instruction before it
// reaches it. It runs exactly once each time the block does. It returns
// -1 if there is none or insts[start] is itself emulated.
//
// In Go 1.25-1.27's mapassign functions the block is MOVQ errNilAssign,
// CX; TESTQ CX, CX; JE ...: the JE is emulated, the MOVQ single-stepped
// at about four times the cost.
func sxEmulatedInBlock(f *sxFunc, st *sxState, start int) int {
	if f.insts[start].Emulated {
		return -1
	}
	s := st.clone()
	for i := start; i < len(f.insts) && i < start+sxMaxPanicBlock; i++ {
		in := &f.insts[i]
		if i > start && in.Emulated {
			if s.ready() != nil || sxTargeted(f, in.Offset) {
				return -1
			}
			return i
		}
		if sxControl(in.Op) || in.endbr {
			return -1
		}
		if err := s.step(in, f.insts[:i]); err != nil {
			return -1
		}
	}
	return -1
}

// sxTargeted reports whether a direct branch or call targets offset off.
func sxTargeted(f *sxFunc, off uint64) bool {
	for i := range f.insts {
		if t, ok := sxRel(&f.insts[i]); ok && t == int64(off) {
			return true
		}
	}
	return false
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
