package x86site

import "golang.org/x/arch/x86/x86asm"

// ReturnSite returns the instruction that follows the only direct CALL
// rel32 to target in a function without a stack-check prologue (a
// //go:nosplit function, such as runtime.fatal), where that call returns:
// a goroutine reaches the site only once target has returned to it. The
// function must decode whole and begin with PUSHQ BP; MOVQ SP, BP (an
// ENDBR64 may come first), before the call: the site is Framed. A second
// call to target, a prefixed one, or one in the last instruction is an
// error; every error wraps ErrUnrecognized.
//
// runtime.fatal calls printlock before it prints "fatal error: ...", and
// never unlocks: of two goroutines that race into it, only the one whose
// report the runtime prints returns from printlock.
func ReturnSite(code []byte, entry uint64, callee func(uint64) string, target string) (Site, error) {
	if callee == nil {
		return Site{}, sxReject("no callee resolver")
	}
	insts, err := sxDecode(code, false)
	if err != nil {
		return Site{}, sxReject("%v", err)
	}
	defer sxRelease(insts)
	b0 := 0
	if len(insts) > 0 && insts[0].endbr && insts[0].Text == "ENDBR64" {
		b0 = 1
	}
	if len(insts) < b0+3 {
		return Site{}, sxReject("function too short")
	}
	push, mov := &insts[b0], &insts[b0+1]
	if push.Op != x86asm.PUSH || push.x.Args[0] != x86asm.RBP || push.x.DataSize == 16 ||
		mov.Op != x86asm.MOV || mov.x.Args[0] != x86asm.RBP || mov.x.Args[1] != x86asm.RSP {
		return Site{}, sxReject("no PUSHQ BP; MOVQ SP, BP at the entry")
	}
	found := -1
	for _, i := range sxCallsTo(insts, entry, callee, target) {
		in := &insts[i]
		switch {
		case !in.plain:
			return Site{}, sxReject("prefixed call of %s at +%#x", target, in.Offset)
		case found >= 0:
			return Site{}, sxReject("more than one call of %s", target)
		case i <= b0+1:
			return Site{}, sxReject("call of %s before the frame set-up", target)
		case i+1 >= len(insts):
			return Site{}, sxReject("call of %s is the last instruction", target)
		}
		found = i
	}
	if found < 0 {
		return Site{}, sxReject("no call of %s", target)
	}
	return sxSite(&insts[found+1], true), nil
}
