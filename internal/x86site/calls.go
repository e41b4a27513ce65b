package x86site

// This file finds three more kinds of site and operand (amd64 only), with
// the same whole-function linear decoding as sites.go:
//
//   - MissSites: every "return &runtime.zeroVal" block of
//     runtime.mapaccess1 and its fast variants, that is every
//     LEAQ runtime.zeroVal(SB), AX. The address of runtime.zeroVal is
//     learnt from the nil-or-empty block NilMapSite proves, so stripped
//     binaries work too.
//
//   - CallSites: every direct CALL of a named function, such as
//     CALL runtime.gopanic in runtime.interhash.
//
//   - CallArgType: the RIP-relative address a caller loaded into RAX just
//     before a CALL, which for calls of the runtime map functions is the
//     static map type.

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"

	"golang.org/x/arch/x86/x86asm"
)

// sxMaxNilBlock bounds the instructions MissSites walks from the nil-map
// site to the zeroVal return when the site is not the return itself.
const sxMaxNilBlock = 32

// sxMaxArgWalk bounds the instructions CallArgType walks back from a CALL.
const sxMaxArgWalk = 32

// sxRIPLeaAX returns the function-relative target of LEAQ disp(IP), AX
// (64-bit operand and address size, no legacy prefix).
func sxRIPLeaAX(in *Inst) (int64, bool) {
	if in.Op != x86asm.LEA || !in.direct || in.x.Op != in.Op || in.legacy || in.x.Args[0] != x86asm.RAX || in.x.Args[2] != nil {
		return 0, false
	}
	m, ok := in.x.Args[1].(x86asm.Mem)
	if !ok || m.Base != x86asm.RIP || m.Index != 0 || m.Segment != 0 {
		return 0, false
	}
	return int64(in.Offset) + int64(in.Len) + m.Disp, true
}

// sxReturnsAfter reports whether insts[i] is followed, in straight line, by
// a Go function epilogue: [XORL BX, BX] [NOPs] [ADDQ $n, SP] [NOPs] POPQ BP
// [NOPs] RET. The frame pointer is therefore still set at insts[i], and RAX
// at the RET is what insts[i] left there. The XORL is the false of a
// comma-ok read (mapaccess2*), which leaves RAX alone.
func sxReturnsAfter(insts []Inst, i int) bool {
	j := i + 1
	nops := func() {
		for j < len(insts) && insts[j].Op == x86asm.NOP && !insts[j].endbr {
			j++
		}
	}
	if j < len(insts) && sxIsZeroBX(&insts[j]) {
		j++
	}
	nops()
	if j < len(insts) && insts[j].Op == x86asm.ADD && !insts[j].legacy && insts[j].x.Args[0] == x86asm.RSP && insts[j].x.Args[2] == nil {
		if _, ok := insts[j].x.Args[1].(x86asm.Imm); ok {
			j++
			nops()
		}
	}
	if j >= len(insts) || insts[j].Op != x86asm.POP || insts[j].x.Args[0] != x86asm.RBP || insts[j].x.DataSize == 16 {
		return false
	}
	j++
	nops()
	return j < len(insts) && insts[j].Op == x86asm.RET && insts[j].x.Args[0] == nil && !insts[j].legacy
}

// MissSites finds the zero-value returns of runtime.mapaccess1,
// mapaccess1_fast32, mapaccess1_fast64 and mapaccess1_faststr (swiss maps,
// as in Go 1.25 and 1.26), or of their mapaccess2 forms (where Go 1.27 has
// them; its mapaccess1 functions are wrappers, see WrapperCall), which
// return &runtime.zeroVal when the key is missing or the map nil or empty.
// Each such return starts with LEAQ runtime.zeroVal(SB), AX followed by the
// epilogue ([XORL BX, BX;] ADDQ $n, SP; POPQ BP; RET).
//
// The address of runtime.zeroVal is not taken from a symbol table (the
// binary may be stripped): it is the target of the RIP-relative LEAQ into
// RAX that starts the nil-or-empty block NilMapSite(code, entry,
// MapAccess, callee) proves. In runtime.mapaccess1 (generic keys) that
// block first checks whether hashing the key would panic (mapKeyError);
// the zeroVal return is then the only LEAQ disp(IP), AX followed by an
// epilogue that is reachable from the nil site through forward branches
// within 32 instructions, not counting paths through CALL runtime.gopanic.
//
// zeroVal is the absolute address (entry + offset + length + disp), and
// sites are every LEAQ of that address into RAX in the function, in offset
// order, including the one of the nil block. Each must be followed by the
// epilogue and lie after the frame set-up, so every site is Framed. Every
// error wraps ErrUnrecognized.
func MissSites(code []byte, entry uint64, callee func(uint64) string) (zeroVal uint64, sites []Site, err error) {
	nilSite, err := NilMapSite(code, entry, MapAccess, callee)
	if err != nil {
		return 0, nil, fmt.Errorf("miss sites: %w", err)
	}
	insts, p, err := sxDecodeFunc(code)
	if err != nil {
		return 0, nil, err
	}
	defer sxRelease(insts)
	f := sxNewFunc(insts)
	start, ok := f.boundary(int64(nilSite.Offset))
	if !ok {
		return 0, nil, sxReject("nil-map site +%#x not an instruction boundary", nilSite.Offset)
	}
	nilRet, err := sxZeroValReturn(&f, start, entry, callee)
	if err != nil {
		return 0, nil, sxReject("nil-map block at +%#x: %v", nilSite.Offset, err)
	}
	target, _ := sxRIPLeaAX(&insts[nilRet])
	for i := range insts {
		in := &insts[i]
		t, ok := sxRIPLeaAX(in)
		if !ok || t != target {
			continue
		}
		if p.FrameSet == 0 || in.Offset < p.FrameSet {
			return 0, nil, sxReject("zeroVal LEAQ at +%#x before the frame set-up", in.Offset)
		}
		if !sxReturnsAfter(insts, i) {
			return 0, nil, sxReject("zeroVal LEAQ at +%#x not followed by a return", in.Offset)
		}
		sites = append(sites, sxSite(in, true))
	}
	found := false
	for _, s := range sites {
		found = found || s.Offset == insts[nilRet].Offset
	}
	if !found {
		// Cannot happen: the scan above sees every instruction.
		return 0, nil, sxReject("nil-block zeroVal LEAQ at +%#x not among the sites", insts[nilRet].Offset)
	}
	return entry + uint64(target), sites, nil
}

// sxIsZeroBX matches XORL BX, BX (31 db or 33 db), unprefixed.
func sxIsZeroBX(in *Inst) bool {
	return in.Op == x86asm.XOR && in.plain && in.x.Args[0] == x86asm.EBX && in.x.Args[1] == x86asm.EBX
}

// WrapperCall recognises a function that only calls another and returns
// what it returned, as Go 1.27's runtime.mapaccess1* do
// (p, _ := mapaccess2*(...); return p): after the stack-check prologue and
// the frame set-up, straight-line code without branches that moves
// arguments (MOV, LEA, SUB/ADD of SP, NOP), exactly one direct CALL, and the
// epilogue right after it (ADDQ $n, SP; POPQ BP; RET). It returns the
// callee's name and ret, the offset of the instruction after the CALL: the
// return address a frame of the callee holds when this function called it.
// Every error wraps ErrUnrecognized.
func WrapperCall(code []byte, entry uint64, callee func(uint64) string) (target string, ret uint64, err error) {
	if callee == nil {
		return "", 0, sxReject("no callee resolver")
	}
	insts, p, err := sxDecodeFunc(code)
	if err != nil {
		return "", 0, err
	}
	defer sxRelease(insts)
	if p.FrameSet == 0 {
		return "", 0, sxReject("wrapper: no frame set-up")
	}
	call := -1
	for i := p.after + 2; i < len(insts); i++ {
		in := &insts[i]
		switch {
		case in.Op == x86asm.CALL:
			t, ok := sxPlainBranch(in, x86asm.CALL)
			if !ok {
				return "", 0, sxReject("wrapper: %s at +%#x", in.sxText(), in.Offset)
			}
			if target = callee(entry + uint64(t)); target == "" {
				return "", 0, sxReject("wrapper: call at +%#x of no known function", in.Offset)
			}
			if !sxReturnsAfter(insts, i) {
				return "", 0, sxReject("wrapper: call at +%#x not followed by the epilogue", in.Offset)
			}
			call = i
		case in.Op == x86asm.MOV || in.Op == x86asm.LEA || in.Op == x86asm.NOP ||
			(in.Op == x86asm.SUB || in.Op == x86asm.ADD) && in.x.Args[0] == x86asm.RSP:
		default:
			return "", 0, sxReject("wrapper: %s at +%#x", in.sxText(), in.Offset)
		}
		if call >= 0 {
			break
		}
	}
	if call < 0 {
		return "", 0, sxReject("wrapper: no call")
	}
	return target, insts[call].Offset + uint64(insts[call].Len), nil
}

// sxZeroValReturn returns the index of the zeroVal return of the nil-map
// block starting at insts[start]: insts[start] itself if it is LEAQ
// disp(IP), AX followed by an epilogue, otherwise the only such
// instruction reachable from it (see MissSites).
//
// sxZeroValReturn is one linear proof, like NilMapSite.
func sxZeroValReturn(f *sxFunc, start int, entry uint64, callee func(uint64) string) (int, error) {
	insts := f.insts
	if _, ok := sxRIPLeaAX(&insts[start]); ok {
		if !sxReturnsAfter(insts, start) {
			return 0, errors.New("LEAQ (IP), AX not followed by a return")
		}
		return start, nil
	}
	if callee == nil {
		return 0, errors.New("no callee resolver")
	}
	found := -1
	seen := make([]bool, len(insts)) // a slice: see sxFunc
	nseen := 0
	work := []int{start}
	push := func(from *Inst, t int64) error {
		if t <= int64(from.Offset) {
			return fmt.Errorf("backward branch at +%#x", from.Offset)
		}
		j, ok := f.boundary(t)
		if !ok {
			return fmt.Errorf("branch at +%#x: target not an instruction boundary", from.Offset)
		}
		work = append(work, j)
		return nil
	}
	next := func(i int) error {
		if i+1 >= len(insts) {
			return errors.New("runs off the end of the function")
		}
		work = append(work, i+1)
		return nil
	}
	for len(work) > 0 {
		i := work[len(work)-1]
		work = work[:len(work)-1]
		if seen[i] {
			continue
		}
		seen[i] = true
		if nseen++; nseen > sxMaxNilBlock {
			return 0, fmt.Errorf("no zeroVal return within %d instructions", sxMaxNilBlock)
		}
		in := &insts[i]
		if _, ok := sxRIPLeaAX(in); ok && sxReturnsAfter(insts, i) {
			if found >= 0 && found != i {
				return 0, fmt.Errorf("two zeroVal candidates, at +%#x and +%#x", insts[found].Offset, in.Offset)
			}
			found = i
			continue
		}
		switch {
		case in.Op == x86asm.RET:
			continue
		case in.Op == x86asm.CALL:
			t, ok := sxPlainBranch(in, x86asm.CALL)
			if !ok {
				return 0, fmt.Errorf("%s at +%#x", in.sxText(), in.Offset)
			}
			if callee(entry+uint64(t)) == "runtime.gopanic" {
				continue
			}
			if err := next(i); err != nil {
				return 0, err
			}
		case in.Op == x86asm.JMP:
			t, ok := sxPlainBranch(in, x86asm.JMP)
			if !ok {
				return 0, fmt.Errorf("%s at +%#x", in.sxText(), in.Offset)
			}
			if err := push(in, t); err != nil {
				return 0, err
			}
		case sxCondJump(in.Op):
			t, ok := sxPlainBranch(in, in.Op)
			if !ok {
				return 0, fmt.Errorf("%s at +%#x", in.sxText(), in.Offset)
			}
			if err := push(in, t); err != nil {
				return 0, err
			}
			if err := next(i); err != nil {
				return 0, err
			}
		case sxControl(in.Op):
			return 0, fmt.Errorf("%s at +%#x", in.sxText(), in.Offset)
		default:
			if err := next(i); err != nil {
				return 0, err
			}
		}
	}
	if found < 0 {
		return 0, errors.New("no zeroVal return (LEAQ (IP), AX; epilogue) reachable")
	}
	return found, nil
}

// sxTail returns the index range [lo, hi] of the morestack tail the stack
// check branches to: from the branch target to the first unconditional
// jump after it (back to the entry). ok is false if it has no such shape.
func sxTail(f *sxFunc, p *sxPrologue) (lo, hi int, ok bool) {
	lo = -1
	for _, b := range p.branches {
		t, ok := sxRel(&f.insts[b])
		if !ok {
			return 0, 0, false
		}
		i, ok := f.boundary(t)
		if !ok || lo >= 0 && i != lo {
			return 0, 0, false
		}
		lo = i
	}
	if lo < 0 {
		return 0, 0, false
	}
	for hi = lo; hi < len(f.insts); hi++ {
		if f.insts[hi].Op == x86asm.JMP {
			return lo, hi, true
		}
	}
	return 0, 0, false
}

// CallSites returns every direct CALL rel32 in the function whose absolute
// destination (entry + offset + length + rel) callee resolves to target,
// for example CALL runtime.gopanic in runtime.interhash or CALL
// internal/runtime/maps.rand in internal/runtime/maps.(*Map).Delete. Each
// site is the CALL itself, which the kernel emulates (Emulated). Sites in
// the function body, after the frame set-up, are Framed; a call in the
// morestack tail, where SP is the entry's, is not. The function must decode
// whole and have a Go stack-check prologue, and a call before the frame
// set-up, or a matching call with a prefix, is an error; every error wraps
// ErrUnrecognized. No matching call is not an error: (nil, nil).
func CallSites(code []byte, entry uint64, callee func(uint64) string, target string) ([]Site, error) {
	if callee == nil {
		return nil, sxReject("no callee resolver")
	}
	insts, p, err := sxDecodeFunc(code)
	if err != nil {
		return nil, err
	}
	defer sxRelease(insts)
	f := sxNewFunc(insts)
	lo, hi, tail := sxTail(&f, &p)
	var sites []Site
	for _, i := range sxCallsTo(insts, entry, callee, target) {
		in := &insts[i]
		if !in.plain {
			return nil, sxReject("prefixed call of %s at +%#x", target, in.Offset)
		}
		switch {
		case tail && i >= lo && i <= hi:
			sites = append(sites, sxSite(in, false))
		case !tail:
			return nil, sxReject("no morestack tail (stack-check branch target to JMP)")
		case p.FrameSet != 0 && in.Offset >= p.FrameSet:
			sites = append(sites, sxSite(in, true))
		default:
			return nil, sxReject("call of %s at +%#x before the frame set-up", target, in.Offset)
		}
	}
	return sites, nil
}

// sxCallsTo returns the indexes of the direct calls in insts whose
// absolute destination callee resolves to target.
func sxCallsTo(insts []Inst, entry uint64, callee func(uint64) string, target string) []int {
	var at []int
	for i := range insts {
		in := &insts[i]
		if in.Op != x86asm.CALL {
			continue
		}
		if t, ok := sxRel(in); ok && callee(entry+uint64(t)) == target {
			at = append(at, i)
		}
	}
	return at
}

// sxRAXWrite classifies what in does to RAX: writes reports that it writes
// RAX, EAX, AX, AL or AH; known is false if that is not certain (the
// instruction is not one whose register effects this package knows).
func sxRAXWrite(in *Inst) (writes, known bool) {
	x := &in.x
	if !in.direct || x.Op != in.Op {
		return false, false
	}
	regAX := func(a x86asm.Arg) bool {
		r, ok := a.(x86asm.Reg)
		return ok && sxFamily(r) == sxFamAX
	}
	switch {
	case sxControl(in.Op):
		// CALL clobbers RAX; jumps and returns end the walk anyway.
		return in.Op == x86asm.CALL || in.Op == x86asm.LCALL, in.Op == x86asm.CALL || in.Op == x86asm.LCALL
	case sxNoWrite(in.Op):
		return false, true
	case in.Op == x86asm.PUSH:
		return false, true
	case in.Op == x86asm.POP:
		return regAX(x.Args[0]), true
	case in.Op == x86asm.IMUL && x.Args[1] == nil:
		return true, true // RDX:RAX
	case sxWritesDst(in.Op):
		return regAX(x.Args[0]), true
	}
	return false, false
}

// CallArgType returns the address a caller loads into RAX, with LEAQ
// sym(IP), AX, before the CALL that returns to ret: for calls of
// runtime.mapaccess1, mapassign and the like, the static map type. code is
// the body of the calling function from its entry, whole or truncated at
// ret; decoding starts at its first byte and must reach ret exactly, just
// after a direct CALL rel32.
//
// Walking back from the CALL, the nearest instruction that writes RAX (in
// any width) must be LEAQ disp(IP), AX; the result is entry + offset +
// length + disp. The answer is false if an instruction on the way might
// write RAX without being known to (anything outside a list of
// instructions with known register effects), if the CALL or an
// instruction after the LEAQ is the target of a direct branch in the
// decoded code (control could arrive with another RAX) or into the middle
// of one of its instructions, if a jump or
// return comes first, after 32 instructions, or if the decoded code holds
// an indirect jump (a jump table, whose targets are unknown). With code
// truncated at ret, branches after the CALL are not seen; pass the whole
// function when possible. The caller must check that the address is what
// it expects (a map type). CallArgType never panics.
func CallArgType(code []byte, entry uint64, ret uint64) (uint64, bool) {
	insts, f, c, ok := sxCallBefore(code, entry, ret)
	if !ok {
		return 0, false
	}
	defer sxRelease(insts)
	if c < 0 {
		return 0, false
	}
	if _, ok := sxPlainBranch(&insts[c], x86asm.CALL); !ok {
		return 0, false
	}
	targets, ok := sxBranchTargets(&f)
	if !ok || sxIsTarget(targets, insts[c].Offset) {
		return 0, false
	}
	for i := c - 1; i >= 0 && i >= c-sxMaxArgWalk; i-- {
		in := &insts[i]
		if t, ok := sxRIPLeaAX(in); ok {
			return entry + uint64(t), true
		}
		writes, known := sxRAXWrite(in)
		if !known || writes || sxControl(in.Op) || sxIsTarget(targets, in.Offset) {
			return 0, false
		}
	}
	return 0, false
}

// sxIsRel reports whether the instruction's first operand is a relative
// branch target.
func sxIsRel(in *Inst) bool {
	_, ok := in.x.Args[0].(x86asm.Rel)
	return ok
}

// GuardedCallSite finds, for a call that runs only when a map became empty
// (CALL internal/runtime/maps.rand in (*Map).Delete, under if m.used == 0),
// the conditional branch that guards it, and the register holding the map
// there:
//
//	CMPQ 0(R), $0     // m.used == 0 ?
//	JNE  past         // the site: emulated, and run once per delete
//	[NOPs]
//	CALL target
//
// call is the CALL's site, as CallSites returns it. The branch must jump
// forward past the CALL; R is returned by its Go assembler name ("CX").
// Every error wraps ErrUnrecognized.
func GuardedCallSite(code []byte, call Site) (Site, string, error) {
	insts, p, err := sxDecodeFunc(code)
	if err != nil {
		return Site{}, "", err
	}
	defer sxRelease(insts)
	f := sxNewFunc(insts)
	ci, ok := f.boundary(int64(call.Offset))
	if !ok || insts[ci].Op != x86asm.CALL {
		return Site{}, "", sxReject("no CALL at +%#x", call.Offset)
	}
	j := ci - 1
	for j >= 0 && insts[j].Op == x86asm.NOP {
		j--
	}
	if j < 1 || insts[j].Op != x86asm.JNE || !insts[j].plain {
		return Site{}, "", sxReject("no JNE guarding the call at +%#x", call.Offset)
	}
	t, ok := sxRel(&insts[j])
	if !ok || t <= int64(insts[ci].Offset) {
		return Site{}, "", sxReject("the branch at +%#x does not jump past the call", insts[j].Offset)
	}
	cmp := &insts[j-1]
	if cmp.Op != x86asm.CMP || cmp.legacy {
		return Site{}, "", sxReject("no CMPQ before the branch at +%#x", insts[j].Offset)
	}
	mem, ok := cmp.x.Args[0].(x86asm.Mem)
	imm, iok := cmp.x.Args[1].(x86asm.Imm)
	if !ok || !iok || imm != 0 || mem.Disp != 0 || mem.Index != 0 || mem.Segment != 0 || cmp.x.MemBytes != 8 {
		return Site{}, "", sxReject("the compare at +%#x is not CMPQ 0(R), $0", cmp.Offset)
	}
	reg, full, ok := sxGPR(mem.Base)
	if !ok || !full || p.FrameSet == 0 || insts[j].Offset < p.FrameSet {
		return Site{}, "", sxReject("the compare at +%#x has no general base register or is before the frame set-up", cmp.Offset)
	}
	name := [...]string{"AX", "CX", "DX", "BX", "SP", "BP", "SI", "DI", "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15"}[reg]
	return sxSite(&insts[j], true), name, nil
}

// sxMaxNestedWalk bounds the instructions NestedRead looks back from the
// inner CALL for the outer one.
const sxMaxNestedWalk = 64

// NestedRead reports whether the map read whose CALL returns to ret is the
// inner read of an expression m[a][b]: its map argument (RBX at the CALL)
// is the value that an earlier plain read (a CALL of runtime.mapaccess1*,
// whose result in RAX points at the element, or at runtime.zeroVal for a
// missing key) returned a pointer to. outerRet is that earlier CALL's
// return address: the outer read's call site. The inner CALL must target
// runtime.mapaccess1* too (a comma-ok read of a nil inner map, _, ok :=
// m[a][b], is an idiom). code is the whole calling function from its
// entry (callee names direct call targets; see CallArgType for what a
// truncated body misses).
//
// Between the two CALLs, the pass tracks which registers and stack slots
// (RSP-relative, 8 bytes) hold the outer result and which hold the 8-byte
// value loaded through it (MOVQ 0(R), R2), through plain 64-bit moves and
// spills; any other write of a register or slot forgets what it held.
// Calls between them (the race detector's raceread, string concatenation
// for the inner key) forget the registers, and the slots too if a slot's
// address was taken. The answer is false if another map function is
// called between them, if a jump or return comes between them, if an
// instruction between them (or the one after the outer CALL) is the
// target of a branch, if the code holds an indirect jump, on an
// instruction whose effects this package does not know, or if the outer
// CALL is more than 64 instructions back. NestedRead never panics.
func NestedRead(code []byte, entry, ret uint64, callee func(uint64) string) (outerRet uint64, ok bool) {
	insts, f, c, ok := sxCallBefore(code, entry, ret)
	if !ok {
		return 0, false
	}
	defer sxRelease(insts)
	targets, ok := sxBranchTargets(&f)
	if !ok {
		return 0, false
	}
	o, ok := sxNestedAt(insts, c, entry, callee, targets)
	if !ok {
		return 0, false
	}
	return entry + insts[o].Offset + uint64(insts[o].Len), true
}

// sxCallBefore decodes code, a function from entry (whole, or truncated
// at ret), and returns its instructions (the caller releases them with
// sxRelease), their index, and the index of the instruction that ends at
// ret (-1 if ret is the entry's first boundary); false if code does not
// decode or ret is not an instruction boundary in it.
func sxCallBefore(code []byte, entry, ret uint64) (insts []Inst, f sxFunc, c int, ok bool) {
	if ret <= entry || ret-entry > uint64(len(code)) {
		return nil, sxFunc{}, 0, false
	}
	insts, err := sxDecode(code, false)
	if err != nil {
		return nil, sxFunc{}, 0, false
	}
	f = sxNewFunc(insts)
	end := ret - entry
	c, ok = f.at(end) // the instruction after the CALL
	if !ok {
		if end != f.size {
			sxRelease(insts)
			return nil, sxFunc{}, 0, false
		}
		c = len(insts)
	}
	return insts, f, c - 1, true
}

// Nested is the inner read of an expression m[a][b] (see NestedRead).
type Nested struct {
	Call  Site   // the inner read's CALL (an emulated instruction)
	Ret   uint64 // its return address: the inner read's call site
	Outer uint64 // the outer read's return address
}

// NestedReads returns every inner read of an m[a][b] expression in one
// function, whole from its entry, as NestedRead finds them, with the
// inner CALL as the site: a probe there sees the inner map in RBX before
// the call, and is emulated. Only CALLs after the frame set-up are
// returned. Every error wraps ErrUnrecognized.
func NestedReads(code []byte, entry uint64, callee func(uint64) string) ([]Nested, error) {
	insts, err := sxDecode(code, false)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUnrecognized, err)
	}
	defer sxRelease(insts)
	// The frame set-up: PUSHQ BP; MOVQ SP, BP (whatever stack check comes
	// before it; a function that calls has a frame).
	var frameSet uint64
	for i := 1; i < len(insts) && frameSet == 0; i++ {
		in, prev := &insts[i], &insts[i-1]
		if in.Op == x86asm.MOV && in.direct && in.x.Args[0] == x86asm.RBP && in.x.Args[1] == x86asm.RSP &&
			prev.Op == x86asm.PUSH && prev.x.Args[0] == x86asm.RBP {
			frameSet = in.Offset + uint64(in.Len)
		}
	}
	f := sxNewFunc(insts)
	targets, ok := sxBranchTargets(&f)
	if !ok {
		return nil, sxReject("an indirect jump, or a branch into an instruction")
	}
	var out []Nested
	for c := range insts {
		in := &insts[c]
		if in.Op != x86asm.CALL || frameSet == 0 || in.Offset < frameSet || !in.Emulated {
			continue
		}
		o, ok := sxNestedAt(insts, c, entry, callee, targets)
		if !ok {
			continue
		}
		out = append(out, Nested{
			Call:  sxSite(in, true),
			Ret:   entry + in.Offset + uint64(in.Len),
			Outer: entry + insts[o].Offset + uint64(insts[o].Len),
		})
	}
	return out, nil
}

// NestedCandidate is a cheap first test for NestedReads, on the bytes of
// a stretch of code alone: window starts with a CALL (at address at) and
// ends with another, both of runtime.mapaccess1*, and the pass of
// NestedRead, run on the instructions between them, finds the second
// reading the map the first returned. Decoding from a CALL found by a
// byte scan need not be the decoding the function's entry gives, and a
// branch from elsewhere into the window is not seen: a candidate must be
// confirmed by NestedReads on the whole function before it is probed.
func NestedCandidate(window []byte, at uint64, callee func(uint64) string) bool {
	insts, err := sxDecode(window, false)
	if err != nil || len(insts) < 2 {
		return false
	}
	defer sxRelease(insts)
	last := len(insts) - 1
	if insts[0].Op != x86asm.CALL || insts[last].Op != x86asm.CALL || insts[last].Offset+uint64(insts[last].Len) != uint64(len(window)) {
		return false
	}
	o, ok := sxNestedAt(insts, last, at, callee, nil)
	return ok && o == 0
}

// sxBranchTargets returns the targets of the function's relative branches
// and calls (function-relative, sorted); false if it holds an indirect
// jump (a jump table, whose targets are unknown), a prefixed branch (a
// 0x66 prefix truncates the target), or a branch into the middle of an
// instruction.
func sxBranchTargets(f *sxFunc) ([]int64, bool) {
	var targets []int64
	for i := range f.insts {
		in := &f.insts[i]
		if (in.Op == x86asm.JMP || in.Op == x86asm.LJMP) && !sxIsRel(in) {
			return nil, false // indirect jump: unknown targets
		}
		if t, ok := sxRel(in); ok {
			if in.legacy {
				return nil, false
			}
			if _, ok := f.boundary(t); !ok && t >= 0 && uint64(t) < f.size {
				return nil, false // the decoding is not the one control flow sees
			}
			targets = append(targets, t)
		}
	}
	slices.Sort(targets)
	return targets, true
}

// sxIsTarget reports whether a branch in targets (from sxBranchTargets)
// lands at off.
func sxIsTarget(targets []int64, off uint64) bool {
	_, found := slices.BinarySearch(targets, int64(off))
	return found
}

// sxNestedAt is NestedRead for the CALL insts[c], given the function's
// branch targets: it returns the index of the outer CALL.
func sxNestedAt(insts []Inst, c int, entry uint64, callee func(uint64) string, targets []int64) (int, bool) {
	if c < 1 || c >= len(insts) {
		return 0, false
	}
	target := func(in *Inst) (string, bool) {
		t, ok := sxPlainBranch(in, x86asm.CALL)
		if !ok {
			return "", false
		}
		return callee(uint64(int64(entry) + t)), true
	}
	isMap := func(name string) bool {
		return strings.HasPrefix(name, "runtime.map") || strings.HasPrefix(name, "internal/runtime/maps.")
	}
	if name, ok := target(&insts[c]); !ok || !strings.HasPrefix(name, "runtime.mapaccess1") {
		return 0, false
	}
	o := -1
	for i := c - 1; i >= 0 && i >= c-sxMaxNestedWalk; i-- {
		in := &insts[i]
		if in.Op == x86asm.CALL {
			name, ok := target(in)
			if !ok {
				return 0, false
			}
			if strings.HasPrefix(name, "runtime.mapaccess1") {
				o = i
				break
			}
			if isMap(name) || name == "" {
				return 0, false
			}
			continue
		}
		if sxControl(in.Op) {
			return 0, false
		}
	}
	if o < 0 {
		return 0, false
	}
	// No branch lands after the outer CALL, up to the inner one.
	lo, hi := int64(insts[o].Offset), int64(insts[c].Offset)
	if j, _ := slices.BinarySearch(targets, lo+1); j < len(targets) && targets[j] <= hi {
		return 0, false
	}

	const (
		none = iota
		ptr  // the outer read's result: a pointer to the element
		elem // the element it points at (the inner map)
	)
	var regs [16]uint8
	var slots sxSlots[uint8]
	var escaped []int64 // frame offsets whose address was taken
	regs[sxRAX] = ptr
	gpr := func(a x86asm.Arg) (int, bool) {
		r, ok := a.(x86asm.Reg)
		if !ok {
			return 0, false
		}
		i, _, ok := sxGPR(r)
		return i, ok
	}
	for i := o + 1; i < c; i++ {
		in := &insts[i]
		x := &in.x
		if in.vex != nil || !in.direct || x.Op != in.Op || sxHasLock(x) {
			return 0, false
		}
		if in.Op == x86asm.CALL {
			// A callee may write the frame from an address taken in it:
			// a tmpBuf (32 bytes) for the runtime's string builders,
			// anything above it otherwise.
			name, _ := target(in)
			size := int64(math.MaxInt32)
			if sxTmpBufCallee(name) {
				size = 32
			}
			for _, e := range escaped {
				slots.forget(func(d int64) bool { return d+8 > e && d < e+size })
			}
			regs = [16]uint8{}
			continue
		}
		if sxNoWrite(in.Op) {
			continue
		}
		if !sxWritesDst(in.Op) || (in.Op == x86asm.IMUL && x.Args[1] == nil) {
			return 0, false
		}
		if in.Op == x86asm.LEA {
			if m, ok := x.Args[1].(x86asm.Mem); ok && (m.Base == x86asm.RSP || m.Index == x86asm.RSP) {
				if m.Index != 0 {
					m.Disp = math.MinInt32 // anywhere
				}
				escaped = append(escaped, m.Disp)
			}
		}
		// What a full-width MOVQ copies; anything else writes none.
		v := uint8(none)
		if in.Op == x86asm.MOV && x.DataSize == 64 {
			switch src := x.Args[1].(type) {
			case x86asm.Reg:
				if r, ok := gpr(src); ok {
					v = regs[r]
				}
			case x86asm.Mem:
				if x.MemBytes != 8 || src.Index != 0 || src.Segment != 0 {
					break
				}
				if src.Base == x86asm.RSP {
					v = slots.get(src.Disp)
				} else if r, ok := gpr(src.Base); ok && regs[r] == ptr && src.Disp == 0 {
					v = elem
				}
			}
		}
		switch dst := x.Args[0].(type) {
		case x86asm.Reg:
			r, ok := gpr(dst)
			if !ok {
				continue // a vector register: not tracked
			}
			if r == sxRSP {
				return 0, false
			}
			regs[r] = v
		case x86asm.Mem:
			if dst.Base != x86asm.RSP || dst.Index != 0 {
				if r, ok := gpr(dst.Base); ok && regs[r] == ptr {
					return 0, false // a store into the element itself
				}
				if len(escaped) > 0 {
					slots.reset() // it may point into the frame
				}
				continue
			}
			slots.forget(func(d int64) bool { return d < dst.Disp+int64(x.MemBytes) && dst.Disp < d+8 })
			if x.MemBytes == 8 && v != none {
				slots.set(dst.Disp, v)
			}
		default:
			return 0, false
		}
	}
	if regs[sxRBX] != elem {
		return 0, false
	}
	return o, true
}

// sxTmpBufCallee reports whether name is a runtime function whose pointer
// argument into the caller's frame is a *tmpBuf (32 bytes) or smaller: the
// string builders the compiler calls for b+c, string(bytes) and the like.
func sxTmpBufCallee(name string) bool {
	switch name {
	case "runtime.concatstring2", "runtime.concatstring3", "runtime.concatstring4", "runtime.concatstring5",
		"runtime.concatstrings", "runtime.slicebytetostring", "runtime.slicerunetostring", "runtime.intstring",
		"runtime.stringtoslicebyte", "runtime.stringtoslicerune", "runtime.concatbyte2", "runtime.concatbyte3",
		"runtime.concatbyte4", "runtime.concatbyte5", "runtime.concatbytes":
		return true
	}
	return false
}
