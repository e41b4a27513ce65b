package x86site

import (
	"errors"
	"strings"
	"testing"
)

// runtime.fatal's shape (Go 1.25-1.27): nosplit, so no stack check; the
// frame set-up, then CALL runtime.printlock, and the site is the next
// instruction.
func TestReturnSiteHandWritten(t *testing.T) {
	fatal := func(prefix string, extraCall bool) []byte {
		a := sxtNew()
		a.raw(prefix)
		a.raw("55 4889e5 4883ec30") // PUSHQ BP; MOVQ SP, BP; SUBQ $0x30, SP
		a.raw("4889442440")         // MOVQ AX, 0x40(SP)
		a.raw("0f1f440000")         // NOPL
		a.call(sxtOther)            // CALL runtime.throw (stands for printlock)
		a.label("after").leaAX(sxtGopanic)
		if extraCall {
			a.call(sxtOther)
		}
		a.call(sxtGopanic)
		a.raw("4883c430 5d c3") // ADDQ $0x30, SP; POPQ BP; RET
		return a.code(sxtEntry)
	}
	code := fatal("", false)
	insts, err := Decode(code)
	if err != nil {
		t.Fatal(err)
	}
	s, err := ReturnSite(code, sxtEntry, sxtCallee, "runtime.throw")
	if err != nil {
		t.Fatal(err)
	}
	sxtCheckBoundary(t, insts, s)
	if s.Offset != 1+3+4+5+5+5 || !s.Framed || s.Emulated || !strings.HasPrefix(s.Inst, "LEAQ ") {
		t.Errorf("site %+v, want the LEAQ after the call, framed, single-stepped", s)
	}
	if s, err := ReturnSite(fatal("f30f1efa", false), sxtEntry, sxtCallee, "runtime.throw"); err != nil || s.Offset != 4+23 {
		t.Errorf("after an ENDBR64: %+v, %v", s, err)
	}
	for name, c := range map[string]struct {
		code   []byte
		target string
	}{
		"two calls":   {fatal("", true), "runtime.throw"},
		"no call":     {fatal("", false), "runtime.nothing"},
		"no frame":    {fatal("90", false), "runtime.throw"},            // a NOP before PUSHQ BP
		"stack check": {fatal("493b6610 7600", false), "runtime.throw"}, // CMPQ SP, 0x10(R14); JBE +0
	} {
		if s, err := ReturnSite(c.code, sxtEntry, sxtCallee, c.target); !errors.Is(err, ErrUnrecognized) {
			t.Errorf("%s: %+v, %v; want ErrUnrecognized", name, s, err)
		}
	}
}
