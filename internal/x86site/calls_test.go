package x86site

import (
	"bufio"
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"os/exec"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/arch/x86/x86asm"

	"github.com/mapguard/mapguard/symbols"
)

// ---------------------------------------------------------------------------
// Hand-written byte sequences (see sxtAsm in sites_test.go).

const (
	sxtZeroVal = 0x5a0000 // runtime.zeroVal in the hand-written functions
	sxtTypeA   = 0x4a1000 // a map type
	sxtTypeB   = 0x4a2000 // another address
	sxtKeyErr  = 0x406000 // mapKeyError2: no name known
	sxtRand    = 0x407000
)

// leaAX appends LEAQ abs(IP), AX (48 8d 05 rel32).
func (a *sxtAsm) leaAX(abs uint64) *sxtAsm { return a.ripOp("488d05", abs) }

// ripOp appends op followed by a rel32 RIP-relative displacement to abs
// (op must end with the ModRM byte and the displacement be last).
func (a *sxtAsm) ripOp(op string, abs uint64) *sxtAsm {
	a.raw(op)
	a.b = append(a.b, 0, 0, 0, 0)
	a.fixes = append(a.fixes, sxtFix{at: len(a.b) - 4, size: 4, end: len(a.b), abs: abs})
	return a
}

func sxtCalleeCalls(addr uint64) string {
	if addr == sxtRand {
		return "internal/runtime/maps.rand"
	}
	return sxtCallee(addr)
}

// sxtMissOpts varies sxtMiss.
type sxtMissOpts struct {
	generic   bool   // nil block of runtime.mapaccess1: mapKeyError check first
	nilLea    string // replaces the nil block's LEAQ zeroVal, AX (fast form)
	nilTail   string // replaces the epilogue after the nil block's LEAQ
	missLea   string // replaces the not-found block's LEAQ zeroVal, AX
	missTail  string // replaces the epilogue after the not-found LEAQ
	panicAt   uint64 // generic: callee of the panic call (default gopanic)
	afterPan  string // generic: bytes after the panic call
	keyErrHex string // generic: replaces the mapKeyError call path
	extra     string // bytes of a block appended before the morestack tail
	extraLea  uint64 // if set, a block LEAQ extraLea(IP), AX; epilogue before the tail
}

// sxtMiss builds a mapaccess1-shaped function whose nil-or-empty and
// not-found blocks return zeroVal.
func sxtMiss(o sxtMissOpts) *sxtAsm {
	a := sxtNew()
	sxtOpts{}.prologue(a)
	a.raw("4885db").j32("0f84", "L")      // TESTQ BX, BX; JE L
	a.raw("48833b00 90").j32("0f84", "L") // CMPQ 0(BX), $0; NOPL; JE L
	a.raw("4885c9").j32("0f84", "miss")   // TESTQ CX, CX; JE miss
	a.raw("4889c8 4883c420 5d c3")        // MOVQ CX, AX; ADDQ $0x20, SP; POPQ BP; RET
	a.label("miss")
	if o.missLea != "" {
		a.raw(o.missLea)
	} else {
		a.leaAX(sxtZeroVal)
	}
	if o.missTail != "" {
		a.raw(o.missTail)
	} else {
		a.raw("4883c420 5d c3") // ADDQ $0x20, SP; POPQ BP; RET
	}
	a.label("L")
	if o.generic {
		a.raw("8b5068 0fbae201").j8(0x72, "kerr") // MOVL 0x68(AX), DX; BTL $1, DX; JB kerr
		a.raw("31c0 31db 90").j8(0xeb, "chk")     // XORL AX, AX; XORL BX, BX; NOPL; JMP chk
		a.label("kerr")
		if o.keyErrHex != "" {
			a.raw(o.keyErrHex)
		} else {
			a.raw("488b4030 4889cb").call(sxtKeyErr) // MOVQ 0x30(AX), AX; MOVQ CX, BX; CALL mapKeyError2
		}
		a.label("chk").raw("4885c0").j8(0x75, "pan") // TESTQ AX, AX; JNE pan
	}
	if o.nilLea != "" {
		a.raw(o.nilLea)
	} else {
		a.leaAX(sxtZeroVal)
	}
	if o.nilTail != "" {
		a.raw(o.nilTail)
	} else {
		a.raw("4883c420 5d 90 c3") // ADDQ $0x20, SP; POPQ BP; NOPL; RET
	}
	if o.generic {
		a.label("pan").raw("488b4008") // MOVQ 0x8(AX), AX
		p := o.panicAt
		if p == 0 {
			p = sxtGopanic
		}
		a.call(p)
		a.raw(o.afterPan)
	}
	a.raw(o.extra)
	if o.extraLea != 0 {
		a.leaAX(o.extraLea).raw("4883c420 5d c3")
	}
	sxtOpts{}.epilogue(a)
	return a
}

// sxtLeaOffsets returns the offsets of LEAQ abs(IP), AX in code at entry.
func sxtLeaOffsets(t *testing.T, code []byte, entry, abs uint64) []uint64 {
	t.Helper()
	insts, err := Decode(code)
	if err != nil {
		t.Fatal(err)
	}
	var offs []uint64
	for i := range insts {
		if tg, ok := sxRIPLeaAX(&insts[i]); ok && entry+uint64(tg) == abs {
			offs = append(offs, insts[i].Offset)
		}
	}
	return offs
}

func TestMissSitesHandWritten(t *testing.T) {
	for _, tc := range []struct {
		name string
		a    *sxtAsm
		n    int    // number of sites expected; 0 = must reject
		why  string // substring of the rejection
	}{
		{"fast form", sxtMiss(sxtMissOpts{}), 2, ""},
		{"fast form, zeroVal also returned elsewhere", sxtMiss(sxtMissOpts{extraLea: sxtZeroVal}), 3, ""},
		{"fast form, another address returned elsewhere", sxtMiss(sxtMissOpts{extraLea: sxtTypeB}), 2, ""},
		{"fast form, zeroVal loaded into CX elsewhere", sxtMiss(sxtMissOpts{missLea: "488d0d00000000"}), 1, ""},
		{"fast form, not-found LEAQ not followed by a return", sxtMiss(sxtMissOpts{missTail: "4889442410 4883c420 5d c3"}), 0, "not followed by a return"},
		{"fast form, nil LEAQ not followed by a return", sxtMiss(sxtMissOpts{nilTail: "4883c420 c3"}), 0, "not followed by a return"},
		{"fast form, nil block is LEAL", sxtMiss(sxtMissOpts{nilLea: "8d0500000000"}), 0, "no zeroVal return"},
		{"fast form, 32-bit address size", sxtMiss(sxtMissOpts{nilLea: "67488d0500000000"}), 0, "no zeroVal return"},
		{"generic form", sxtMiss(sxtMissOpts{generic: true}), 2, ""},
		{"generic form with a third zeroVal return", sxtMiss(sxtMissOpts{generic: true, extraLea: sxtZeroVal}), 3, ""},
		{"generic form, panic call is not gopanic", sxtMiss(sxtMissOpts{generic: true, panicAt: sxtOther, extraLea: sxtTypeB}), 0, "two zeroVal candidates"},
		{"generic form, zeroVal after the panic call not explored", sxtMiss(sxtMissOpts{generic: true, extraLea: sxtTypeB}), 2, ""},
		{"generic form, indirect call", sxtMiss(sxtMissOpts{generic: true, keyErrHex: "488b4030 4889cb ffd1"}), 0, "CALL CX"},
		{"generic form, backward branch", sxtMiss(sxtMissOpts{generic: true, keyErrHex: "488b4030 4889cb 74f0"}), 0, "backward"},
		{"generic form, no zeroVal return", sxtMiss(sxtMissOpts{generic: true, nilLea: "488d0d00000000"}), 0, "no zeroVal return"},
		{"generic form, too long", sxtMiss(sxtMissOpts{generic: true, keyErrHex: "488b4030 4889cb" + strings.Repeat("90", 40)}), 0, "within 32"},
		{"assign shape", sxtAssign(sxtOpts{}), 0, "empty-map"},
		{"no frame pointer", sxtAccess(sxtOpts{noFrame: true}, false, "", ""), 0, "frame"},
		{"truncated", sxtNew().raw("493b6610 0f86"), 0, "decode"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code := tc.a.code(sxtEntry)
			zv, sites, err := MissSites(code, sxtEntry, sxtCallee)
			if tc.n == 0 {
				if err == nil {
					t.Fatalf("MissSites = %#x, %+v; want rejection", zv, sites)
				}
				if !errors.Is(err, ErrUnrecognized) {
					t.Errorf("error %v does not wrap ErrUnrecognized", err)
				}
				if !strings.Contains(err.Error(), tc.why) {
					t.Errorf("error %q does not mention %q", err, tc.why)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if zv != sxtZeroVal {
				t.Errorf("zeroVal = %#x, want %#x", zv, uint64(sxtZeroVal))
			}
			insts, _ := Decode(code)
			var got []uint64
			for _, s := range sites {
				sxtCheckBoundary(t, insts, s)
				if !s.Framed || s.Emulated || !strings.HasPrefix(s.Inst, "LEAQ ") || !strings.HasSuffix(s.Inst, "(IP), AX") {
					t.Errorf("site %+v: want framed, not emulated LEAQ (IP), AX", s)
				}
				got = append(got, s.Offset)
			}
			want := sxtLeaOffsets(t, code, sxtEntry, sxtZeroVal)
			if len(sites) != tc.n || !slices.Equal(got, want) {
				t.Errorf("sites at %#x, want %d at %#x", got, tc.n, want)
			}
			ns, err := NilMapSite(code, sxtEntry, MapAccess, sxtCallee)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(tc.name, "generic") {
				if !slices.Contains(got, ns.Offset) {
					t.Errorf("nil site %+v not among the sites", ns)
				}
			}
		})
	}
	t.Run("generic form needs a callee resolver", func(t *testing.T) {
		_, _, err := MissSites(sxtMiss(sxtMissOpts{generic: true}).code(sxtEntry), sxtEntry, nil)
		if !errors.Is(err, ErrUnrecognized) || !strings.Contains(err.Error(), "callee") {
			t.Errorf("got %v", err)
		}
		if _, _, err := MissSites(sxtMiss(sxtMissOpts{}).code(sxtEntry), sxtEntry, nil); err != nil {
			t.Errorf("fast form without callee resolver: %v", err)
		}
	})
	t.Run("sites are sorted", func(t *testing.T) {
		// The nil block comes after the not-found block here; the order
		// of the result is the code's.
		_, sites, err := MissSites(sxtMiss(sxtMissOpts{extraLea: sxtZeroVal}).code(sxtEntry), sxtEntry, sxtCallee)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.IsSortedFunc(sites, func(a, b Site) int { return int(a.Offset) - int(b.Offset) }) {
			t.Errorf("sites not sorted: %+v", sites)
		}
	})
}

// sxtCaller builds a function with calls: body is the code between the
// frame set-up and the epilogue.
func sxtCaller(body func(a *sxtAsm)) *sxtAsm {
	a := sxtNew()
	sxtOpts{}.prologue(a)
	body(a)
	a.raw("4883c420 5d c3") // ADDQ $0x20, SP; POPQ BP; RET
	sxtOpts{}.epilogue(a)
	return a
}

func TestCallSitesHandWritten(t *testing.T) {
	body := sxtCaller(func(a *sxtAsm) {
		a.raw("4885c0").j8(0x74, "x") // TESTQ AX, AX; JE x
		a.call(sxtGopanic)
		a.label("x").call(sxtOther)
		a.call(sxtRand)
		a.raw("ffd1") // CALL CX
		a.call(sxtGopanic)
	})
	code := body.code(sxtEntry)
	insts, err := Decode(code)
	if err != nil {
		t.Fatal(err)
	}
	callsTo := func(abs uint64) []uint64 {
		var offs []uint64
		for i := range insts {
			if tg, ok := sxRel(&insts[i]); ok && insts[i].Op == x86asm.CALL && sxtEntry+uint64(tg) == abs {
				offs = append(offs, insts[i].Offset)
			}
		}
		return offs
	}
	for _, tc := range []struct {
		target string
		abs    uint64
		framed bool
	}{
		{"runtime.gopanic", sxtGopanic, true},
		{"internal/runtime/maps.rand", sxtRand, true},
		{"runtime.throw", sxtOther, true},
		{"runtime.morestack_noctxt.abi0", sxtMorestack, false},
	} {
		sites, err := CallSites(code, sxtEntry, sxtCalleeCalls, tc.target)
		if err != nil {
			t.Errorf("%s: %v", tc.target, err)
			continue
		}
		var got []uint64
		for _, s := range sites {
			sxtCheckBoundary(t, insts, s)
			if !s.Emulated || s.Framed != tc.framed || !strings.HasPrefix(s.Inst, "CALL ") {
				t.Errorf("%s: site %+v, want emulated CALL, framed %v", tc.target, s, tc.framed)
			}
			got = append(got, s.Offset)
		}
		if want := callsTo(tc.abs); len(want) == 0 || !slices.Equal(got, want) {
			t.Errorf("%s: sites at %#x, want %#x", tc.target, got, want)
		}
	}
	if sites, err := CallSites(code, sxtEntry, sxtCalleeCalls, "runtime.nothing"); sites != nil || err != nil {
		t.Errorf("no match: %+v, %v; want nil, nil", sites, err)
	}
	if sites, err := CallSites(code, sxtEntry+1, sxtCalleeCalls, "runtime.gopanic"); sites != nil || err != nil {
		t.Errorf("wrong entry: %+v, %v; want nil, nil", sites, err)
	}
	for _, tc := range []struct {
		name   string
		code   []byte
		callee func(uint64) string
		why    string
	}{
		{"no callee resolver", code, nil, "callee"},
		{"prefixed call", sxtCaller(func(a *sxtAsm) { a.raw("3e").call(sxtGopanic) }).code(sxtEntry), sxtCalleeCalls, "prefixed"},
		{"no stack check", sxtAssign(sxtOpts{noCheck: true}).code(sxtEntry), sxtCalleeCalls, "stack-check"},
		{"call before the frame set-up", sxtAssign(sxtOpts{noFrame: true}).code(sxtEntry), sxtCalleeCalls, "before the frame"},
		{"no JMP back from the morestack tail", sxtNew().raw("493b6610").j32("0f86", "more").raw("55 4889e5").call(sxtGopanic).raw("c3").label("more").call(sxtMorestack).raw("c3").code(sxtEntry), sxtCalleeCalls, "morestack tail"},
		{"does not decode", sxtCaller(func(a *sxtAsm) { a.call(sxtGopanic) }).raw("488b").code(sxtEntry), sxtCalleeCalls, "decode"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sites, err := CallSites(tc.code, sxtEntry, tc.callee, "runtime.gopanic")
			if !errors.Is(err, ErrUnrecognized) || !strings.Contains(err.Error(), tc.why) {
				t.Errorf("CallSites = %+v, %v; want ErrUnrecognized mentioning %q", sites, err, tc.why)
			}
		})
	}
}

func TestCallArgTypeHandWritten(t *testing.T) {
	// Each case is a function: prologue, pre, LEAQ typeA(IP), AX, mid,
	// CALL mapaccess (label "call", return address label "ret"), post,
	// epilogue. want is the answer for the whole function.
	type tc struct {
		name           string
		pre, mid, post string
		lea            string // replaces the LEAQ typeA(IP), AX
		call           string // replaces the CALL
		extra          func(a *sxtAsm)
		want           bool
		truncatedWant  bool // answer when the code is truncated at ret
		truncatedDiffs bool // truncatedWant differs from want
	}
	cases := []tc{
		{name: "LEAQ right before the CALL", want: true},
		{name: "PUSHQ AX; POPQ AX after", mid: "50 58", want: false},
		{name: "argument set-up in between, RAX untouched", mid: "4889c3 4889d9 31c9 bf01000000 0f1f440000 440f117c2410 488d7c2430 48895c2418 4885c9 4839d9 0fbae101 51 59", want: true},
		{name: "ENDBR64 and NOPs in between", mid: "f30f1efa 90 6690 0f1f00", want: true},
		{name: "MOVQ DX, AX after", mid: "4889d0", want: false},
		{name: "MOVB $1, AL after", mid: "b001", want: false},
		{name: "MOVB $1, AH after", mid: "b401", want: false},
		{name: "XORL AX, AX after", mid: "31c0", want: false},
		{name: "ADDQ $8, AX after", mid: "4883c008", want: false},
		{name: "CMOVEQ CX, AX after", mid: "480f44c1", want: false},
		{name: "POPQ AX after", mid: "58", want: false},
		{name: "XCHGQ CX, AX after (unknown)", mid: "4891", want: false},
		{name: "XCHGQ CX, DX after (unknown)", mid: "4887ca", want: false},
		{name: "CDQE after", mid: "4898", want: false},
		{name: "CPUID after", mid: "0fa2", want: false},
		{name: "MULQ CX after", mid: "48f7e1", want: false},
		{name: "one-operand IMULQ after", mid: "48f7e9", want: false},
		{name: "PMOVMSKB X0, AX after (unknown)", mid: "660fd7c0", want: false},
		{name: "CALL after", mid: "e800000000", want: false},
		{name: "JE after", mid: "7400", want: false},
		{name: "LEAL (IP), AX", lea: "8d0500000000", want: false},
		{name: "LEAQ (IP), CX", lea: "488d0d00000000", want: false},
		{name: "LEAQ with 32-bit address", lea: "67488d0500000000", want: false},
		{name: "LEAQ 8(AX), AX", lea: "488d4008", want: false},
		{name: "32 instructions back", mid: strings.Repeat("90", 31), want: true},
		{name: "33 instructions back", mid: strings.Repeat("90", 32), want: false},
		{name: "indirect CALL", call: "ffd1", want: false},
		{name: "prefixed CALL", call: "3ee800000000", want: false},
		{name: "branch to the LEAQ", extra: func(a *sxtAsm) { a.j32("e9", "lea") }, want: true},
		{name: "branch between LEAQ and CALL", mid: "90", extra: func(a *sxtAsm) { a.j32("e9", "lea+7") }, want: false, truncatedWant: true, truncatedDiffs: true},
		{name: "branch to the CALL", extra: func(a *sxtAsm) { a.j32("e9", "call") }, want: false, truncatedWant: true, truncatedDiffs: true},
		{name: "branch to the CALL from before", pre: "4885c0 7407", want: false},
		{name: "back edge after the CALL", post: "4885c0 74f6", want: false, truncatedWant: true, truncatedDiffs: true},
		{name: "back edge to the LEAQ", post: "4885c0 74ef", want: true},
		{name: "branch into the middle of an instruction", post: "4885c0 74f0", want: false, truncatedWant: true, truncatedDiffs: true},
		{name: "indirect jump after the CALL", post: "ffe1", want: false, truncatedWant: true, truncatedDiffs: true},
		{name: "indirect jump before", pre: "4885c0 7402 ffe1", want: false},
		{name: "prefixed branch", pre: "66eb00", want: false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			a := sxtNew()
			sxtOpts{}.prologue(a)
			a.raw(c.pre)
			a.label("lea")
			if c.lea != "" {
				a.raw(c.lea)
			} else {
				a.leaAX(sxtTypeA)
			}
			a.raw(c.mid)
			a.label("call")
			if c.call != "" {
				a.raw(c.call)
			} else {
				a.call(sxtOther)
			}
			a.label("ret")
			a.raw(c.post)
			a.raw("4883c420 5d c3")
			if c.extra != nil {
				c.extra(a)
			}
			sxtOpts{}.epilogue(a)
			code := a.code(sxtEntry)
			ret := sxtEntry + uint64(a.labels["ret"])
			got, ok := CallArgType(code, sxtEntry, ret)
			if ok != c.want || ok && got != sxtTypeA {
				t.Errorf("CallArgType = %#x, %v; want %v", got, ok, c.want)
			}
			tw := c.want
			if c.truncatedDiffs {
				tw = c.truncatedWant
			}
			got, ok = CallArgType(code[:ret-sxtEntry], sxtEntry, ret)
			if ok != tw || ok && got != sxtTypeA {
				t.Errorf("truncated at ret: CallArgType = %#x, %v; want %v", got, ok, tw)
			}
		})
	}

	// The return address must be just after a CALL.
	a := sxtNew()
	sxtOpts{}.prologue(a)
	a.leaAX(sxtTypeA).label("call").call(sxtOther).label("ret").raw("4883c420 5d c3")
	sxtOpts{}.epilogue(a)
	code := a.code(sxtEntry)
	call, ret := sxtEntry+uint64(a.labels["call"]), sxtEntry+uint64(a.labels["ret"])
	if got, ok := CallArgType(code, sxtEntry, ret); !ok || got != sxtTypeA {
		t.Fatalf("CallArgType = %#x, %v", got, ok)
	}
	for _, r := range []uint64{0, sxtEntry, call, call + 1, ret - 1, ret + 1, ret + 4, sxtEntry + uint64(len(code)), sxtEntry + uint64(len(code)) + 1, ^uint64(0)} {
		if got, ok := CallArgType(code, sxtEntry, r); ok {
			t.Errorf("ret %#x: CallArgType = %#x, true", r, got)
		}
	}
	if got, ok := CallArgType(code[:ret-sxtEntry-1], sxtEntry, ret); ok {
		t.Errorf("code ends before ret: CallArgType = %#x, true", got)
	}
	// Garbage: never a panic.
	for _, h := range []string{"", "e8", "e800000000", "62f1fd48 e800000000", "488d0500000000 e800000000", "f30f1efa"} {
		c := sxtNew().raw(h).code(0)
		for r := uint64(0); r <= uint64(len(c))+1; r++ {
			if got, ok := CallArgType(c, 0, r); ok && !(h == "488d0500000000 e800000000" && r == 12 && got == 7) {
				t.Errorf("%q ret %d: %#x, true", h, r, got)
			}
		}
	}
}

// ---------------------------------------------------------------------------
// Real binaries.

// sxtUserGet is a map read compiled into the test binary, for
// TestCallArgTypeSelf and the fuzz target.
//
//go:noinline
func sxtUserGet(m map[string]int, k string) int { return m[k] }

// sxtTypeWord returns the *abi.Type word of an interface holding v.
func sxtTypeWord(v any) uintptr { return uintptr((*[2]unsafe.Pointer)(unsafe.Pointer(&v))[0]) }

func TestCallArgTypeSelf(t *testing.T) {
	if runtime.GOOS != "linux" || runtime.GOARCH != "amd64" {
		t.Skip("linux/amd64 only")
	}
	_ = sxtUserGet(map[string]int{"a": 1}, "a")
	b, err := symbols.OpenSelf()
	if err != nil {
		t.Skip(err)
	}
	defer b.Close()
	f, ok := b.Func("github.com/mapguard/mapguard/internal/x86site.sxtUserGet")
	if !ok {
		t.Fatal("sxtUserGet not found")
	}
	code, err := b.Code(f)
	if err != nil {
		t.Fatal(err)
	}
	want := uint64(sxtTypeWord(map[string]int(nil))) - b.LoadBias()
	calls := sxtMapCalls(t, b, f, code)
	if len(calls) != 1 {
		t.Fatalf("%d map calls in sxtUserGet, want 1", len(calls))
	}
	for _, ret := range calls {
		if got, ok := CallArgType(code, f.Entry, ret); !ok || got != want {
			t.Errorf("CallArgType(ret %#x) = %#x, %v; want %#x (type:map[string]int)", ret, got, ok, want)
		}
	}
}

// sxtMapCalls returns the return addresses of the direct calls of
// runtime.map* functions in f.
func sxtMapCalls(t *testing.T, b *symbols.Binary, f symbols.Func, code []byte) []uint64 {
	t.Helper()
	insts, err := Decode(code)
	if err != nil {
		t.Fatalf("%s: %v", f.Name, err)
	}
	var rets []uint64
	for i := range insts {
		tg, ok := sxRel(&insts[i])
		if !ok || insts[i].Op != x86asm.CALL {
			continue
		}
		if g, ok := b.FuncAt(f.Entry + uint64(tg)); ok && strings.HasPrefix(g.Name, "runtime.map") {
			rets = append(rets, f.Entry+insts[i].Offset+uint64(insts[i].Len))
		}
	}
	return rets
}

// sxtCallsSrc is the program built for the real-binary tests. It prints
// the entry of each getter and the type word of each map type, which is
// the address of the type:map[...] symbol the compiler passes in AX.
const sxtCallsSrc = `package main

import (
	"fmt"
	"reflect"
	"unsafe"
)

type key struct {
	a, b int64
	s    string
}

type iface interface{ M() }
type impl int

func (impl) M() {}

var sink any

//go:noinline
func use(v ...any) { sink = v }

//go:noinline
func getS(m map[string]int, k string) int { return m[k] }

//go:noinline
func get2S(m map[string]int, k string) (int, bool) { v, ok := m[k]; return v, ok }

//go:noinline
func get64(m map[int64]int, k int64) int { return m[k] }

//go:noinline
func get32(m map[int32]int, k int32) int { return m[k] }

//go:noinline
func getK(m map[key]int, k key) int { return m[k] }

//go:noinline
func setK(m map[key]string, k key) { m[k] = "v" }

//go:noinline
func delS(m map[string]int, k string) { delete(m, k) }

//go:noinline
func getI(m map[iface]int, k iface) int { return m[k] }

//go:noinline
func getE(m map[any]int, k any) int { return m[k] }

//go:noinline
func getA(m map[[2]any]int, k [2]any) int { return m[k] }

//go:noinline
func nestS(m map[string]map[string]int, a, b string) int { return m[a][b] }

//go:noinline
func nest64(m map[string]map[int64]bool, a string, b int64) bool { return m[a][b] }

//go:noinline
func nestK(m map[int32]map[[2]int]string, a int32, b [2]int) string { return m[a][b] }

//go:noinline
func nestCat(m map[string]map[string]int, a, b, c string) int { return m[a][b+c] }

//go:noinline
func nestG[K comparable](m map[K]map[K]int, a, b K) int { return m[a][b] }

//go:noinline
func notNestTwo(m1, m2 map[string]int, a, b string) int { return m1[a] + m2[b] }

//go:noinline
func notNestOK(m map[string]map[string]int, a, b string) int {
	inner, ok := m[a]
	if !ok {
		return -1
	}
	return inner[b]
}

//go:noinline
func notNestCommaOK(m map[string]map[string]int, a, b string) bool { _, ok := m[a][b]; return ok }

func typeWord(v any) uintptr { return uintptr((*[2]unsafe.Pointer)(unsafe.Pointer(&v))[0]) }

func main() {
	ms := map[string]int{"a": 1}
	m64 := map[int64]int{1: 2}
	m32 := map[int32]int{1: 2}
	mk := map[key]int{{1, 2, "x"}: 1}
	mks := map[key]string{}
	mi := map[iface]int{impl(1): 1}
	me := map[any]int{1: 1}
	ma := map[[2]any]int{{1, 2}: 3}
	v, ok := get2S(ms, "a")
	setK(mks, key{})
	delS(ms, "b")
	delS(ms, "a")
	nm := map[string]map[string]int{"a": {"b": 1}}
	use(nestS(nm, "a", "b"), nest64(map[string]map[int64]bool{}, "x", 1), nestK(nil, 1, [2]int{}),
		nestCat(nm, "a", "b", ""), nestG(map[int]map[int]int{}, 1, 2), nestG(nm, "a", "b"),
		notNestTwo(ms, ms, "a", "b"), notNestOK(nm, "a", "b"), notNestCommaOK(nm, "a", "b"))
	use(getS(ms, "a"), v, ok, get64(m64, 1), get32(m32, 1), getK(mk, key{}), getI(mi, impl(2)), getE(me, 2), getA(ma, [2]any{1, 2}))
	for name, f := range map[string]any{"getS": getS, "get2S": get2S, "get64": get64, "get32": get32, "getK": getK,
		"setK": setK, "delS": delS, "getI": getI, "getE": getE, "getA": getA} {
		fmt.Printf("func main.%s %#x\n", name, reflect.ValueOf(f).Pointer())
	}
	for name, m := range map[string]any{"map[string]int": ms, "map[int64]int": m64, "map[int32]int": m32,
		"map[main.key]int": mk, "map[main.key]string": mks, "map[main.iface]int": mi, "map[interface {}]int": me,
		"map[[2]interface {}]int": ma} {
		fmt.Printf("type %s %#x\n", name, typeWord(m))
	}
}
`

// sxtCallsGetters maps each getter of sxtCallsSrc to the map type it
// passes.
var sxtCallsGetters = map[string]string{
	"main.getS": "map[string]int", "main.get2S": "map[string]int", "main.get64": "map[int64]int",
	"main.get32": "map[int32]int", "main.getK": "map[main.key]int", "main.setK": "map[main.key]string",
	"main.delS": "map[string]int", "main.getI": "map[main.iface]int", "main.getE": "map[interface {}]int",
	"main.getA": "map[[2]interface {}]int",
}

// sxtNestedFuncs lists the nest* and notNest* functions of sxtCallsSrc in
// b (the generic one by its shape instantiations' names).
func sxtNestedFuncs(b *symbols.Binary) []string {
	names := []string{"main.nestS", "main.nest64", "main.nestK", "main.nestCat", "main.notNestTwo", "main.notNestOK", "main.notNestCommaOK"}
	for _, g := range []string{"main.nestG[go.shape.int]", "main.nestG[go.shape.string]"} {
		if _, ok := b.Func(g); ok {
			names = append(names, g)
		}
	}
	return names
}

// sxtCallsBinary is one build of sxtCallsSrc.
type sxtCallsBinary struct {
	toolchain, mode, path, goVersion string
	funcs, types                     map[string]uint64 // run-time addresses printed by the program
}

func (b sxtCallsBinary) name() string { return b.goVersion + "/" + b.mode }

// sxtCallsBuild builds and runs sxtCallsSrc with each available toolchain,
// default, stripped and -race (skipped without cgo).
func sxtCallsBuild(t *testing.T, dir string) []sxtCallsBinary {
	t.Helper()
	modes := []sxtMode{{"default", nil}, {"stripped", []string{"-ldflags=-s -w"}}, {"race", []string{"-race"}}}
	var built []sxtCallsBinary
	for _, v := range sxtBuildVariants(t, dir, "callstarget", sxtCallsSrc, modes) {
		b := sxtCallsBinary{toolchain: v.toolchain, mode: v.mode, path: v.path, goVersion: v.goVersion,
			funcs: map[string]uint64{}, types: map[string]uint64{}}
		out, err := exec.Command(b.path).Output()
		if err != nil && b.mode == "race" {
			t.Logf("skipping %s/%s: run: %v", b.toolchain, b.mode, err)
			continue
		}
		if err != nil {
			t.Fatalf("run %s: %v", b.path, err)
		}
		sc := bufio.NewScanner(bytes.NewReader(out))
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			if len(f) < 3 {
				continue
			}
			v, err := strconv.ParseUint(strings.TrimPrefix(f[len(f)-1], "0x"), 16, 64)
			if err != nil {
				t.Fatalf("%s: output %q", b.path, sc.Text())
			}
			name := strings.Join(f[1:len(f)-1], " ")
			if f[0] == "func" {
				b.funcs[name] = v
			} else {
				b.types[name] = v
			}
		}
		built = append(built, b)
	}
	return built
}

// sxtCallsObjdump returns, per function, the address, length and text of
// each instruction objdump prints for the functions of interest.
func sxtCallsObjdump(t *testing.T, bin string) map[string][]sxtObjInst {
	t.Helper()
	cmd := exec.Command("go", "tool", "objdump", "-s",
		`^(runtime\.(mapaccess[12](_fast32|_fast64|_faststr)?|interhash|nilinterhash|typehash)|internal/runtime/maps\.\(\*Map\)\.Delete|main\.\w+)$`, bin)
	cmd.Env = sxtGoEnv("local")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("objdump %s: %v", bin, err)
	}
	funcs := map[string][]sxtObjInst{}
	var cur string
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, "TEXT "); ok {
			cur = strings.TrimSuffix(strings.Fields(rest)[0], "(SB)")
			continue
		}
		var parts []string
		for _, p := range strings.Split(line, "\t") {
			if p = strings.TrimSpace(p); p != "" {
				parts = append(parts, p)
			}
		}
		if cur == "" || len(parts) < 4 {
			continue
		}
		addr, err := strconv.ParseUint(strings.TrimPrefix(parts[1], "0x"), 16, 64)
		if err != nil {
			t.Fatalf("objdump line %q: %v", line, err)
		}
		funcs[cur] = append(funcs[cur], sxtObjInst{addr, parts[3]})
	}
	return funcs
}

// sxtObjAddrs returns the addresses of the objdump lines whose text is text.
func sxtObjAddrs(lines []sxtObjInst, text string) []uint64 {
	var addrs []uint64
	for _, l := range lines {
		if l.text == text {
			addrs = append(addrs, l.addr)
		}
	}
	return addrs
}

var (
	sxtMissFuncs = []string{"runtime.mapaccess1", "runtime.mapaccess1_fast32", "runtime.mapaccess1_fast64", "runtime.mapaccess1_faststr"}
	sxtCallFuncs = []struct{ fn, target string }{
		{"runtime.interhash", "runtime.gopanic"},
		{"runtime.nilinterhash", "runtime.gopanic"},
		{"runtime.typehash", "runtime.gopanic"},
		{"internal/runtime/maps.(*Map).Delete", "internal/runtime/maps.rand"},
	}
)

// sxtWrapsReads reports whether a Go release's mapaccess1* only call
// mapaccess2* (Go 1.27).
func sxtWrapsReads(goVersion string) bool {
	return strings.HasPrefix(goVersion, "go1.27")
}

// sxtCallsResult is what one binary gave, for comparing stripped builds
// with unstripped ones.
type sxtCallsResult struct {
	zeroVal map[string]uint64
	sites   map[string][]Site
}

func TestCallsRealBinaries(t *testing.T) {
	if runtime.GOOS != "linux" || runtime.GOARCH != "amd64" {
		t.Skip("linux/amd64 only")
	}
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("no go command")
	}
	bins := sxtCallsBuild(t, t.TempDir())
	sort.SliceStable(bins, func(i, j int) bool { return bins[i].mode != "stripped" && bins[j].mode == "stripped" })
	ref := map[string]sxtCallsResult{} // by Go version, from the default build
	var table strings.Builder
	for _, bin := range bins {
		t.Run(bin.name(), func(t *testing.T) {
			res := sxtCheckCalls(t, bin, ref, &table)
			if bin.mode == "default" {
				ref[bin.goVersion] = res
			}
		})
	}
	t.Logf("sites:\n%s", table.String())
}

func sxtCheckCalls(t *testing.T, bin sxtCallsBinary, ref map[string]sxtCallsResult, table *strings.Builder) sxtCallsResult {
	res := sxtCallsResult{zeroVal: map[string]uint64{}, sites: map[string][]Site{}}
	b, err := symbols.Open(bin.path)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	stripped := bin.mode == "stripped"
	if b.Stripped() != stripped {
		t.Fatalf("Stripped() = %v", b.Stripped())
	}
	callee := sxtBinaryCallee(b)
	var obj map[string][]sxtObjInst
	var zeroValSym uint64
	ef, err := elf.Open(bin.path)
	if err != nil {
		t.Fatal(err)
	}
	defer ef.Close()
	noptrbss := ef.Section(".noptrbss") // runtime.zeroVal's section
	if noptrbss == nil {
		t.Fatal("no .noptrbss section")
	}
	if !stripped {
		obj = sxtCallsObjdump(t, bin.path)
		syms, err := ef.Symbols()
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range syms {
			if s.Name == "runtime.zeroVal" {
				zeroValSym = s.Value
			}
		}
		if zeroValSym == 0 {
			t.Fatal("no runtime.zeroVal in .symtab")
		}
	}
	r, haveRef := ref[bin.goVersion]
	if stripped && !haveRef {
		t.Errorf("no unstripped default build of %s to compare with", bin.goVersion)
	}
	code := func(name string) (symbols.Func, []byte) { return sxtFuncCode(t, b, name) }
	offsets := func(f symbols.Func, addrs []uint64) []uint64 {
		var offs []uint64
		for _, a := range addrs {
			offs = append(offs, a-f.Entry)
		}
		return offs
	}
	siteOffsets := func(sites []Site) []uint64 {
		var offs []uint64
		for _, s := range sites {
			offs = append(offs, s.Offset)
		}
		return offs
	}
	describe := func(sites []Site) string {
		var s []string
		for _, x := range sites {
			s = append(s, fmt.Sprintf("+%#x(em=%v,fr=%v)", x.Offset, x.Emulated, x.Framed))
		}
		return strings.Join(s, " ")
	}

	// MissSites.
	first := "" // the function whose zeroVal the others must match
	for _, fn := range sxtMissFuncs {
		// Go 1.27's mapaccess1* only call mapaccess2*, which hold the
		// zeroVal returns; earlier releases' are no wrappers.
		f1, c1 := code(fn)
		w, _, err := WrapperCall(c1, f1.Entry, callee)
		ok2 := strings.Replace(fn, "mapaccess1", "mapaccess2", 1)
		switch {
		case err == nil && w == ok2:
			fmt.Fprintf(table, "%-18s %-36s wraps %s\n", bin.name(), fn, w)
			fn = w
		case sxtWrapsReads(bin.goVersion):
			t.Errorf("%s: WrapperCall = %q, %v; want %s", fn, w, err, ok2)
		case err == nil:
			t.Errorf("%s: WrapperCall = %q on %s, want none", fn, w, bin.goVersion)
		}
		f, c := code(fn)
		insts, err := Decode(c)
		if err != nil {
			t.Fatalf("%s: %v", fn, err)
		}
		zv, sites, err := MissSites(c, f.Entry, callee)
		if err != nil {
			t.Errorf("%s: MissSites: %v", fn, err)
			continue
		}
		res.zeroVal[fn], res.sites[fn] = zv, sites
		fmt.Fprintf(table, "%-18s %-36s %d zeroVal sites: %s\n", bin.name(), fn, len(sites), describe(sites))
		for _, s := range sites {
			sxtCheckBoundary(t, insts, s)
			if !s.Framed || s.Emulated {
				t.Errorf("%s: site %+v, want framed, not emulated", fn, s)
			}
		}
		if ns, err := NilMapSite(c, f.Entry, MapAccess, callee); err != nil {
			t.Errorf("%s: NilMapSite: %v", fn, err)
		} else if fn != "runtime.mapaccess1" && fn != "runtime.mapaccess2" && !slices.Contains(siteOffsets(sites), ns.Offset) {
			t.Errorf("%s: nil site %+v not among the miss sites", fn, ns)
		}
		if len(sites) < 2 {
			t.Errorf("%s: %d zeroVal sites, want the nil-or-empty one and at least one not-found one", fn, len(sites))
		}
		if zv < noptrbss.Addr || zv >= noptrbss.Addr+noptrbss.Size {
			t.Errorf("%s: zeroVal %#x outside .noptrbss", fn, zv)
		}
		if first == "" {
			first = fn
		}
		if zv != res.zeroVal[first] {
			t.Errorf("%s: zeroVal %#x, %s says %#x", fn, zv, first, res.zeroVal[first])
		}
		if stripped {
			// The linker lays data out differently without .symtab (Go
			// 1.26 moves runtime.zeroVal), so only the code is compared.
			if haveRef && !slices.Equal(siteOffsets(sites), siteOffsets(r.sites[fn])) {
				t.Errorf("%s: stripped sites %#x; default build %#x", fn, siteOffsets(sites), siteOffsets(r.sites[fn]))
			}
			continue
		}
		if zv != zeroValSym {
			t.Errorf("%s: zeroVal %#x, .symtab says %#x", fn, zv, zeroValSym)
		}
		want := offsets(f, sxtObjAddrs(obj[fn], "LEAQ runtime.zeroVal(SB), AX"))
		if got := siteOffsets(sites); !slices.Equal(got, want) {
			t.Errorf("%s: sites %#x, objdump's LEAQ runtime.zeroVal(SB), AX at %#x", fn, got, want)
		}
	}

	// CallSites.
	for _, c := range sxtCallFuncs {
		f, code := code(c.fn)
		insts, err := Decode(code)
		if err != nil {
			t.Fatalf("%s: %v", c.fn, err)
		}
		sites, err := CallSites(code, f.Entry, callee, c.target)
		if err != nil {
			t.Errorf("%s: CallSites: %v", c.fn, err)
			continue
		}
		res.sites[c.fn] = sites
		fmt.Fprintf(table, "%-18s %-36s %d CALL %s: %s\n", bin.name(), c.fn, len(sites), c.target, describe(sites))
		if len(sites) == 0 {
			t.Errorf("%s: no CALL %s", c.fn, c.target)
		}
		for _, s := range sites {
			sxtCheckBoundary(t, insts, s)
			if !s.Framed || !s.Emulated {
				t.Errorf("%s: site %+v, want framed and emulated", c.fn, s)
			}
		}
		if stripped {
			if haveRef && !slices.Equal(siteOffsets(sites), siteOffsets(r.sites[c.fn])) {
				t.Errorf("%s: stripped sites %#x; default build %#x", c.fn, siteOffsets(sites), siteOffsets(r.sites[c.fn]))
			}
			continue
		}
		want := offsets(f, sxtObjAddrs(obj[c.fn], "CALL "+c.target+"(SB)"))
		if got := siteOffsets(sites); !slices.Equal(got, want) {
			t.Errorf("%s: sites %#x, objdump's CALL %s at %#x", c.fn, got, c.target, want)
		}
	}

	// NestedRead: the second map read of each nest* function is the inner
	// read of m[a][b]; no other map call there, or in the notNest*
	// functions, is.
	sxtCheckNested(t, b, bin.name(), table)

	// CallArgType: every map call of each getter passes the getter's map
	// type; the other calls there (race instrumentation, morestack) load
	// no type.
	names := make([]string, 0, len(sxtCallsGetters))
	for n := range sxtCallsGetters {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, fn := range names {
		f, code := code(fn)
		bias := bin.funcs[fn] - f.Entry
		want, ok := bin.types[sxtCallsGetters[fn]]
		if !ok || bin.funcs[fn] == 0 {
			t.Fatalf("%s: program printed no addresses for it or its type", fn)
		}
		want -= bias
		insts, err := Decode(code)
		if err != nil {
			t.Fatalf("%s: %v", fn, err)
		}
		mapCalls := 0
		for i := range insts {
			in := &insts[i]
			tg, ok := sxRel(in)
			if !ok || in.Op != x86asm.CALL {
				continue
			}
			ret := f.Entry + in.Offset + uint64(in.Len)
			name := callee(f.Entry + uint64(tg))
			got, ok := CallArgType(code, f.Entry, ret)
			got2, ok2 := CallArgType(code[:ret-f.Entry], f.Entry, ret)
			if ok2 != ok || got2 != got {
				t.Errorf("%s: CALL %s: whole function %#x %v, truncated at ret %#x %v", fn, name, got, ok, got2, ok2)
			}
			switch {
			case strings.HasPrefix(name, "runtime.map"):
				mapCalls++
				if !ok || got != want {
					t.Errorf("%s: CALL %s at +%#x: CallArgType = %#x, %v; want %#x (type:%s)", fn, name, in.Offset, got, ok, want, sxtCallsGetters[fn])
				}
				fmt.Fprintf(table, "%-18s %-36s CALL %s at +%#x: type %#x %v\n", bin.name(), fn, name, in.Offset, got, ok)
			case name == "runtime.racefuncenter", name == "runtime.raceread", name == "runtime.racewrite",
				strings.HasPrefix(name, "runtime.morestack"):
				// RAX holds the caller's PC, the map call's result or the
				// entry's argument. (Before racefuncexit in setK it does
				// hold a LEAQ (IP), AX: the address of the string "v".)
				if ok {
					t.Errorf("%s: CALL %s at +%#x: CallArgType = %#x, true", fn, name, in.Offset, got)
				}
			}
			if ret > f.Entry+1 {
				if got, ok := CallArgType(code, f.Entry, ret-1); ok {
					t.Errorf("%s: ret-1 inside CALL %s: CallArgType = %#x, true", fn, name, got)
				}
			}
		}
		if mapCalls != 1 {
			t.Errorf("%s: %d map calls, want 1", fn, mapCalls)
		}
		if !stripped {
			// objdump agrees on the call and on the LEAQ's target.
			var lea uint64
			lines := obj[fn]
			for i, l := range lines {
				if d, ok := strings.CutPrefix(l.text, "LEAQ "); ok && strings.HasSuffix(d, "(IP), AX") && i+1 < len(lines) {
					disp, err := strconv.ParseInt(strings.TrimSuffix(d, "(IP), AX"), 0, 64)
					if err == nil {
						lea = lines[i+1].addr + uint64(disp)
					}
				}
				if strings.HasPrefix(l.text, "CALL runtime.map") {
					if lea != want {
						t.Errorf("%s: objdump: last LEAQ (IP), AX before %s loads %#x, want %#x", fn, l.text, lea, want)
					}
				}
			}
		}
	}
	return res
}

// ---------------------------------------------------------------------------
// Fuzzing (FuzzSites in sites_fuzz_test.go calls sxtFuzzCalls).

// sxtFuzzCallFuncs are functions of the test binary FuzzSites adds to its
// bodies for CallSites and CallArgType.
var sxtFuzzCallFuncs = []string{"runtime.interhash", "runtime.nilinterhash", "runtime.typehash",
	"internal/runtime/maps.(*Map).Delete", "github.com/mapguard/mapguard/internal/x86site.sxtUserGet"}

// sxtFuzzCallBodies returns hand-written bodies for MissSites, CallSites
// and CallArgType.
func sxtFuzzCallBodies() []sxtFuzzBody {
	var bodies []sxtFuzzBody
	for _, a := range []*sxtAsm{
		sxtMiss(sxtMissOpts{}), sxtMiss(sxtMissOpts{generic: true, extraLea: sxtZeroVal}),
		sxtCaller(func(a *sxtAsm) {
			a.raw("4889c3").leaAX(sxtTypeA).raw("90").call(sxtOther).call(sxtGopanic)
		}),
	} {
		bodies = append(bodies, sxtFuzzBody{a.code(sxtEntry), sxtEntry, sxtGopanic})
	}
	return bodies
}

// sxtFuzzCalls checks MissSites, CallSites and CallArgType on one fuzz
// input: no panic, errors wrapping ErrUnrecognized, sites on instruction
// boundaries in offset order and of the kind promised, and a CallArgType
// answer backed by a LEAQ (IP), AX before a CALL.
func sxtFuzzCalls(t *testing.T, code []byte, insts []Inst, decErr error, entry uint64, callee func(uint64) string, at uint16) {
	t.Helper()
	list := func(what string, sites []Site, err error) []*Inst {
		if err != nil {
			if !errors.Is(err, ErrUnrecognized) {
				t.Fatalf("%s: error %v does not wrap ErrUnrecognized", what, err)
			}
			return nil
		}
		if len(sites) > 0 && decErr != nil {
			t.Fatalf("%s = %+v for code that does not decode (%v)", what, sites, decErr)
		}
		var out []*Inst
		for i, s := range sites {
			if i > 0 && s.Offset <= sites[i-1].Offset {
				t.Fatalf("%s: sites out of order: %+v", what, sites)
			}
			var in *Inst
			for j := range insts {
				if insts[j].Offset == s.Offset {
					in = &insts[j]
				}
			}
			if in == nil {
				t.Fatalf("%s: site %+v not an instruction boundary", what, s)
			}
			if in.Text != s.Inst || in.Emulated != s.Emulated {
				t.Fatalf("%s: site %+v disagrees with %+v", what, s, *in)
			}
			out = append(out, in)
		}
		return out
	}

	zv, ms, err := MissSites(code, entry, callee)
	for i, in := range list("MissSites", ms, err) {
		tg, ok := sxRIPLeaAX(in)
		if !ok || entry+uint64(tg) != zv || !ms[i].Framed {
			t.Fatalf("MissSites = %#x, site %+v: not a framed LEAQ zeroVal(IP), AX", zv, ms[i])
		}
	}
	if err == nil && len(ms) == 0 {
		t.Fatalf("MissSites = %#x and no sites, no error", zv)
	}

	ns, err := NestedReads(code, entry, callee)
	nsites := make([]Site, len(ns))
	for i, n := range ns {
		nsites[i] = n.Call
	}
	for i, in := range list("NestedReads", nsites, err) {
		tg, ok := sxRel(in)
		if in.Op != x86asm.CALL || !ok || !strings.HasPrefix(callee(uint64(int64(entry)+tg)), "runtime.mapaccess1") || !in.Emulated ||
			ns[i].Ret != entry+in.Offset+uint64(in.Len) || ns[i].Outer >= ns[i].Ret || ns[i].Outer <= entry {
			t.Fatalf("NestedReads: %+v: not an emulated CALL of a mapaccess1 after its outer read", ns[i])
		}
		if o, ok := NestedRead(code, entry, ns[i].Ret, callee); !ok || o != ns[i].Outer {
			t.Fatalf("NestedReads: %+v, but NestedRead = %#x, %v", ns[i], o, ok)
		}
	}

	cs, err := CallSites(code, entry, callee, "runtime.gopanic")
	for i, in := range list("CallSites", cs, err) {
		tg, ok := sxRel(in)
		if in.Op != x86asm.CALL || !ok || callee(entry+uint64(tg)) != "runtime.gopanic" || !cs[i].Emulated {
			t.Fatalf("CallSites: site %+v: not an emulated CALL runtime.gopanic", cs[i])
		}
	}

	rets := []uint64{entry + uint64(at), entry + uint64(len(code)), entry, entry + 1}
	for i := range insts {
		if insts[i].Op == x86asm.CALL && len(rets) < 20 {
			rets = append(rets, entry+insts[i].Offset+uint64(insts[i].Len))
		}
	}
	for _, ret := range rets {
		v, ok := CallArgType(code, entry, ret)
		if !ok {
			continue
		}
		if decErr != nil {
			t.Fatalf("CallArgType(ret %#x) = %#x for code that does not decode (%v)", ret, v, decErr)
		}
		c := -1
		for i := range insts {
			if entry+insts[i].Offset+uint64(insts[i].Len) == ret {
				c = i
			}
		}
		if c < 0 || insts[c].Op != x86asm.CALL {
			t.Fatalf("CallArgType(ret %#x) = %#x, but ret is not after a CALL", ret, v)
		}
		lea := false
		for i := c - 1; i >= 0 && i >= c-sxMaxArgWalk; i-- {
			if tg, ok := sxRIPLeaAX(&insts[i]); ok {
				lea = entry+uint64(tg) == v
				break
			}
		}
		if !lea {
			t.Fatalf("CallArgType(ret %#x) = %#x: no LEAQ of it into AX before the CALL", ret, v)
		}
		v2, ok2 := CallArgType(code[:ret-entry], entry, ret)
		if !ok2 || v2 != v {
			t.Fatalf("CallArgType(ret %#x) = %#x, but %#x, %v on the code truncated at ret", ret, v, v2, ok2)
		}
	}
}

// TestFuzzCallBodies checks that FuzzSites's bodies reach the success
// paths of MissSites, CallSites and CallArgType, so that the fuzzer mutates
// inputs the functions accept.
func TestFuzzCallBodies(t *testing.T) {
	var miss, calls, args int
	for _, b := range sxtFuzzBodies() {
		callee := func(addr uint64) string {
			if addr == b.panicAt {
				return "runtime.gopanic"
			}
			return ""
		}
		if _, _, err := MissSites(b.code, b.entry, callee); err == nil {
			miss++
		}
		if s, err := CallSites(b.code, b.entry, callee, "runtime.gopanic"); err == nil && len(s) > 0 {
			calls++
		}
		insts, err := Decode(b.code)
		if err != nil {
			continue
		}
		for i := range insts {
			if insts[i].Op != x86asm.CALL {
				continue
			}
			if _, ok := CallArgType(b.code, b.entry, b.entry+insts[i].Offset+uint64(insts[i].Len)); ok {
				args++
			}
		}
	}
	t.Logf("bodies accepted: MissSites %d, CallSites %d, CallArgType %d calls", miss, calls, args)
	if miss < 2 || calls < 2 || args < 1 {
		t.Errorf("bodies accepted: MissSites %d, CallSites %d, CallArgType %d calls; want at least 2, 2, 1", miss, calls, args)
	}
}

// sxtCheckNested checks NestedRead and NestedReads on the nest* and
// notNest* functions of a build of sxtCallsSrc.
func sxtCheckNested(t *testing.T, b *symbols.Binary, name string, table *strings.Builder) {
	t.Helper()
	callee := sxtBinaryCallee(b)
	code := func(name string) (symbols.Func, []byte) { return sxtFuncCode(t, b, name) }
	for _, fn := range sxtNestedFuncs(b) {
		f, code := code(fn)
		insts, err := Decode(code)
		if err != nil {
			t.Fatalf("%s: %v", fn, err)
		}
		var rets []uint64 // of the map reads
		for i := range insts {
			in := &insts[i]
			tg, ok := sxRel(in)
			if !ok || in.Op != x86asm.CALL || !strings.HasPrefix(callee(f.Entry+uint64(tg)), "runtime.mapaccess") {
				continue
			}
			rets = append(rets, f.Entry+in.Offset+uint64(in.Len))
		}
		nested := !strings.HasPrefix(fn, "main.notNest")
		if len(rets) != 2 {
			t.Errorf("%s: %d map reads, want 2", fn, len(rets))
			continue
		}
		all, err := NestedReads(code, f.Entry, callee)
		switch {
		case err != nil:
			t.Errorf("%s: NestedReads: %v", fn, err)
		case !nested && len(all) != 0:
			t.Errorf("%s: NestedReads = %+v, want none", fn, all)
		case nested && (len(all) != 1 || all[0].Ret != rets[1] || all[0].Outer != rets[0] || !all[0].Call.Emulated || !all[0].Call.Framed ||
			f.Entry+all[0].Call.Offset+5 != rets[1]):
			t.Errorf("%s: NestedReads = %+v, want the CALL returning to %#x (outer %#x)", fn, all, rets[1], rets[0])
		}
		for i, ret := range rets {
			got, ok := NestedRead(code, f.Entry, ret, callee)
			want := nested && i == 1
			fmt.Fprintf(table, "%-18s %-36s map read %d: NestedRead %v (outer %#x)\n", name, fn, i, ok, got)
			if ok != want || (ok && got != rets[0]) {
				t.Errorf("%s: map read %d (ret %#x): NestedRead = %#x, %v; want %v (outer %#x)", fn, i, ret, got, ok, want, rets[0])
			}
		}
	}
}

// The nested reads of sxtCallsSrc built by Go 1.27 (whose mapaccess1*
// functions wrap mapaccess2*: the program still calls mapaccess1*), which
// TestCallsRealBinaries does not build.
func TestNestedReadsGo127(t *testing.T) {
	if runtime.GOOS != "linux" || runtime.GOARCH != "amd64" {
		t.Skip("linux/amd64 only")
	}
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("no go command")
	}
	var table strings.Builder
	modes := []sxtMode{{"default", nil}, {"stripped", []string{"-ldflags=-s -w"}}}
	for _, v := range sxtBuildWith(t, t.TempDir(), "callstarget", sxtCallsSrc, modes, []string{"go1.27.3"}) {
		t.Run(v.goVersion+"/"+v.mode, func(t *testing.T) {
			b, err := symbols.Open(v.path)
			if err != nil {
				t.Fatal(err)
			}
			defer b.Close()
			sxtCheckNested(t, b, v.goVersion+"/"+v.mode, &table)
		})
	}
	t.Logf("nested reads:\n%s", table.String())
}

// sxtBinaryCallee names a direct call's target in b, for the finders.
func sxtBinaryCallee(b *symbols.Binary) func(uint64) string {
	return func(addr uint64) string {
		if f, ok := b.FuncAt(addr); ok && f.Entry == addr {
			return f.Name
		}
		return ""
	}
}

// sxtFuncCode returns the function called name in b and its code.
func sxtFuncCode(t *testing.T, b *symbols.Binary, name string) (symbols.Func, []byte) {
	t.Helper()
	f, ok := b.Func(name)
	if !ok {
		t.Fatalf("%s not in the binary", name)
	}
	c, err := b.Code(f)
	if err != nil {
		t.Fatal(err)
	}
	return f, c
}
