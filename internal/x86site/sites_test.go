package x86site

import (
	"bufio"
	"bytes"
	"debug/buildinfo"
	"debug/elf"
	"debug/gosym"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"

	"golang.org/x/arch/x86/x86asm"
)

// ---------------------------------------------------------------------------
// Hand-written byte sequences.

// sxtAsm is a tiny assembler for hand-written test functions: raw bytes,
// labels and relative branches/calls with fix-ups.
type sxtAsm struct {
	b      []byte
	labels map[string]int
	fixes  []sxtFix
}

type sxtFix struct {
	at, size, end int    // rel field position and size; offset after the instruction
	label         string // "name" or "name+N"
	abs           uint64 // absolute call target when label == ""
}

func sxtNew() *sxtAsm { return &sxtAsm{labels: map[string]int{}} }

// raw appends hex bytes (spaces allowed).
func (a *sxtAsm) raw(h string) *sxtAsm {
	b, err := hex.DecodeString(strings.ReplaceAll(h, " ", ""))
	if err != nil {
		panic(err)
	}
	a.b = append(a.b, b...)
	return a
}

func (a *sxtAsm) label(n string) *sxtAsm { a.labels[n] = len(a.b); return a }

// j8 appends a one-byte-opcode rel8 branch (74 JE, 75 JNE, eb JMP).
func (a *sxtAsm) j8(op byte, l string) *sxtAsm {
	a.b = append(a.b, op, 0)
	a.fixes = append(a.fixes, sxtFix{at: len(a.b) - 1, size: 1, end: len(a.b), label: l})
	return a
}

// j32 appends a rel32 branch with the given opcode bytes (0f 84 JE, 0f 86
// JBE, e9 JMP).
func (a *sxtAsm) j32(op string, l string) *sxtAsm {
	a.raw(op)
	a.b = append(a.b, 0, 0, 0, 0)
	a.fixes = append(a.fixes, sxtFix{at: len(a.b) - 4, size: 4, end: len(a.b), label: l})
	return a
}

// call appends CALL rel32 to an absolute address.
func (a *sxtAsm) call(abs uint64) *sxtAsm {
	a.b = append(a.b, 0xe8, 0, 0, 0, 0)
	a.fixes = append(a.fixes, sxtFix{at: len(a.b) - 4, size: 4, end: len(a.b), abs: abs})
	return a
}

// code resolves the fix-ups for a function placed at entry.
func (a *sxtAsm) code(entry uint64) []byte {
	out := bytes.Clone(a.b)
	for _, f := range a.fixes {
		var rel int64
		if f.label == "" {
			rel = int64(f.abs - (entry + uint64(f.end)))
		} else {
			name, add := f.label, 0
			if i := strings.IndexByte(name, '+'); i >= 0 {
				add, _ = strconv.Atoi(name[i+1:])
				name = name[:i]
			}
			t, ok := a.labels[name]
			if !ok {
				panic("no label " + name)
			}
			rel = int64(t + add - f.end)
		}
		switch f.size {
		case 1:
			if rel < -128 || rel > 127 {
				panic("rel8 out of range")
			}
			out[f.at] = byte(int8(rel))
		case 4:
			for i := 0; i < 4; i++ {
				out[f.at+i] = byte(uint32(int32(rel)) >> (8 * i))
			}
		}
	}
	return out
}

const (
	sxtEntry     = 0x401000
	sxtGopanic   = 0x402000
	sxtMorestack = 0x403000
	sxtRaceRead  = 0x404000
	sxtOther     = 0x405000
)

func sxtCallee(addr uint64) string {
	switch addr {
	case sxtGopanic:
		return "runtime.gopanic"
	case sxtMorestack:
		return "runtime.morestack_noctxt.abi0"
	case sxtRaceRead:
		return "internal/race.ReadPC"
	case sxtOther:
		return "runtime.throw"
	}
	return ""
}

// sxtOpts varies the hand-written functions.
type sxtOpts struct {
	endbr    bool   // ENDBR64 before the prologue
	pre      string // bytes inserted between the frame set-up and TESTQ BX, BX
	nilLabel string // branch target of the nil check (default "nil")
	jne      bool   // assign: JNE around a fall-through nil block
	panicAt  uint64 // assign: callee of the nil block (default gopanic)
	noFrame  bool   // no PUSHQ BP; MOVQ SP, BP
	noCheck  bool   // no stack check at all
	bigFrame bool   // LEAQ -N(SP), R12; CMPQ R12, 0x10(R14) form
	extraRef bool   // another branch to the site
	intoPath string // label of the checked path another branch jumps to
	tail     string // bytes appended at the very end
	block    string // assign: bytes replacing MOVQ errNilAssign(SB), CX at the nil block's start
	branchIn bool   // assign: another branch to the nil block's JE
}

func (o sxtOpts) prologue(a *sxtAsm) {
	a.label("entry")
	if o.endbr {
		a.raw("f30f1efa")
	}
	switch {
	case o.noCheck:
	case o.bigFrame:
		a.raw("4c8d6424c0 4d3b6610").j32("0f86", "more") // LEAQ -0x40(SP), R12; CMPQ R12, 0x10(R14); JBE more
	default:
		a.raw("493b6610").j32("0f86", "more") // CMPQ SP, 0x10(R14); JBE more
	}
	if !o.noFrame {
		a.raw("55 4889e5") // PUSHQ BP; MOVQ SP, BP
	}
	a.raw("4883ec20") // SUBQ $0x20, SP
	a.raw(o.pre)
}

func (o sxtOpts) epilogue(a *sxtAsm) {
	a.label("more")
	a.raw("4889442408") // MOVQ AX, 0x8(SP)
	a.call(sxtMorestack)
	a.raw("488b442408") // MOVQ 0x8(SP), AX
	a.j32("e9", "entry")
	a.raw(o.tail)
}

// sxtAssign builds a mapassign-shaped function.
func sxtAssign(o sxtOpts) *sxtAsm {
	a := sxtNew()
	o.prologue(a)
	target := o.nilLabel
	if target == "" {
		target = "nil"
	}
	a.label("test").raw("4885db") // TESTQ BX, BX
	if o.jne {
		a.j8(0x75, "body") // JNE body
		a.label("nil")
		o.panicBlock(a)
		a.label("body")
		a.raw("4883c420 5d c3") // ADDQ $0x20, SP; POPQ BP; RET
	} else {
		a.j8(0x74, target)      // JE nil
		a.raw("4883c420 5d c3") // ADDQ $0x20, SP; POPQ BP; RET
		a.label("nil")
		o.panicBlock(a)
	}
	if o.extraRef {
		a.j8(0xeb, "nil")
	}
	if o.branchIn {
		a.j8(0xeb, "je")
	}
	if o.intoPath != "" {
		a.j32("e9", o.intoPath)
	}
	o.epilogue(a)
	return a
}

func (o sxtOpts) panicBlock(a *sxtAsm) {
	block := o.block
	if block == "" {
		block = "488b0d00000000" // MOVQ errNilAssign(SB), CX
	}
	a.raw(block)
	a.raw("4885c9") // TESTQ CX, CX
	a.label("je")
	a.j8(0x74, "skip") // JE skip
	a.raw("488b4908")  // MOVQ 0x8(CX), CX
	a.label("skip")
	a.raw("4889c8") // MOVQ CX, AX
	callee := o.panicAt
	if callee == 0 {
		callee = sxtGopanic
	}
	a.call(callee)
	a.raw("90")
}

// sxtAccess builds a mapaccess-shaped function; race selects the merged
// -race form, racePath replaces its straight-line part.
func sxtAccess(o sxtOpts, race bool, racePath string, secondTarget string) *sxtAsm {
	a := sxtNew()
	o.prologue(a)
	first := o.nilLabel
	if first == "" {
		first = "L"
	}
	if secondTarget == "" {
		secondTarget = "L"
	}
	if race {
		a.raw("4889442430 48895c2438") // MOVQ AX, 0x30(SP); MOVQ BX, 0x38(SP)
		a.raw("4885db").j8(0x74, "M")  // TESTQ BX, BX; JE M
		if racePath == "" {
			a.raw("488d0d00000000 4889d8 488b5c2428") // LEAQ (IP), CX; MOVQ BX, AX; MOVQ 0x28(SP), BX
			a.call(sxtRaceRead)
			a.raw("488b542438 4885d2 488b442430 4889d3") // MOVQ 0x38(SP), DX; TESTQ DX, DX; MOVQ 0x30(SP), AX; MOVQ DX, BX
		} else {
			a.raw(racePath)
		}
		a.label("M").j32("0f84", first) // M: JE L
	} else {
		a.label("test").raw("4885db").j32("0f84", first) // TESTQ BX, BX; JE L
	}
	a.label("cmp").raw("48833b00 90").j32("0f84", secondTarget) // CMPQ 0(BX), $0; NOPL; JE L
	a.raw("4889c8 4883c420 5d c3")                              // MOVQ CX, AX; ADDQ $0x20, SP; POPQ BP; RET
	a.label("L")
	a.raw("488d0500000000 4883c420 5d c3") // LEAQ zeroVal(SB), AX; ADDQ $0x20, SP; POPQ BP; RET
	if o.extraRef {
		a.j32("e9", "L")
	}
	if o.intoPath != "" {
		a.j32("e9", o.intoPath)
	}
	o.epilogue(a)
	return a
}

func TestDecodeHandWritten(t *testing.T) {
	t.Run("ENDBR64 is one 4-byte instruction", func(t *testing.T) {
		code := sxtNew().raw("f30f1efa 55 4889e5 f30f1efb c3").code(0)
		insts, err := Decode(code)
		if err != nil {
			t.Fatal(err)
		}
		want := []struct {
			off  uint64
			text string
		}{{0, "ENDBR64"}, {4, "PUSHQ BP"}, {5, "MOVQ SP, BP"}, {8, "ENDBR32"}, {12, "RET"}}
		if len(insts) != len(want) {
			t.Fatalf("got %d instructions, want %d: %+v", len(insts), len(want), insts)
		}
		for i, w := range want {
			if insts[i].Offset != w.off || insts[i].Text != w.text {
				t.Errorf("inst %d = +%#x %q, want +%#x %q", i, insts[i].Offset, insts[i].Text, w.off, w.text)
			}
		}
		if insts[0].Len != 4 || insts[0].Emulated {
			t.Errorf("ENDBR64: Len %d Emulated %v, want 4 false", insts[0].Len, insts[0].Emulated)
		}
	})
	for _, tc := range []struct {
		name string
		hex  string
	}{
		{"empty", ""},
		{"truncated CALL at the end", "55 e8000000"},
		{"truncated MOVQ at the end", "55 488b"},
		{"lone REX prefix", "48"},
		{"lone operand-size prefix", "66"},
		{"F3 0F 1E with another ModRM (RDSSPD)", "f30f1ec8 c3"},
		{"reserved 0F 1E hint", "0f1e00 c3"},
		{"truncated EVEX (x86asm panics)", "62f1fd48"},
		{"undefined opcode", "55 0f04"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code := sxtNew().raw(tc.hex).code(0)
			if insts, err := Decode(code); err == nil {
				t.Fatalf("Decode(%s) = %+v, want error", tc.hex, insts)
			}
			if _, err := EntrySite(code); !errors.Is(err, ErrUnrecognized) {
				t.Errorf("EntrySite: %v, want ErrUnrecognized", err)
			}
			for _, op := range []MapOp{MapAssign, MapAccess} {
				if _, err := NilMapSite(code, 0, op, sxtCallee); !errors.Is(err, ErrUnrecognized) {
					t.Errorf("NilMapSite(%d): %v, want ErrUnrecognized", op, err)
				}
			}
		})
	}
}

func TestDecodeEmulated(t *testing.T) {
	for _, tc := range []struct {
		hex      string
		emulated bool
	}{
		{"55", true},                    // PUSHQ BP
		{"4155", true},                  // PUSHQ R13
		{"4850", false},                 // PUSHQ AX with REX.W: the kernel accepts only 41
		{"6655", false},                 // PUSHW BP
		{"ff7508", false},               // PUSHQ 8(BP)
		{"90", true},                    // NOP
		{"6690", true},                  // NOPW
		{"0f1f00", true},                // NOPL 0(AX)
		{"0f1f4000", true},              // NOPL 0(AX)
		{"660f1f440000", true},          // NOPW 0(AX)(AX*1)
		{"2e660f1f840000000000", false}, // CS NOPW: segment prefix, kernel refuses
		{"f390", false},                 // PAUSE
		{"4190", false},                 // XCHGL R8, AX
		{"eb00", true},                  // JMP rel8
		{"e900000000", true},            // JMP rel32
		{"e800000000", true},            // CALL rel32
		{"7400", true},                  // JE rel8
		{"0f8400000000", true},          // JE rel32
		{"0f8600000000", true},          // JBE rel32
		{"3e7400", false},               // DS-prefixed JE
		{"ffd1", false},                 // CALL CX
		{"c3", false},                   // RET
		{"4889e5", false},               // MOVQ SP, BP
		{"4885db", false},               // TESTQ BX, BX
		{"f30f1efa", false},             // ENDBR64
		{"cc", false},                   // INT3
	} {
		insts, err := Decode(sxtNew().raw(tc.hex).code(0))
		if err != nil || len(insts) != 1 {
			t.Errorf("%s: %v %+v, want one instruction", tc.hex, err, insts)
			continue
		}
		if insts[0].Emulated != tc.emulated {
			t.Errorf("%s (%s): Emulated %v, want %v", tc.hex, insts[0].Text, insts[0].Emulated, tc.emulated)
		}
	}
}

func TestParsePrologueHandWritten(t *testing.T) {
	for _, tc := range []struct {
		name          string
		o             sxtOpts
		after, framed uint64
		err           bool
	}{
		{"small frame", sxtOpts{}, 0xa, 0xe, false},
		{"larger frame", sxtOpts{bigFrame: true}, 0xf, 0x13, false},
		{"ENDBR64 first", sxtOpts{endbr: true}, 0xe, 0x12, false},
		{"no frame pointer", sxtOpts{noFrame: true}, 0xa, 0, false},
		{"no stack check", sxtOpts{noCheck: true}, 0, 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			insts, err := Decode(sxtAssign(tc.o).code(sxtEntry))
			if err != nil {
				t.Fatal(err)
			}
			p, err := ParsePrologue(insts)
			if tc.err {
				if !errors.Is(err, ErrUnrecognized) {
					t.Fatalf("ParsePrologue = %+v, %v; want ErrUnrecognized", p, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if p.AfterStackCheck != tc.after || p.FrameSet != tc.framed {
				t.Errorf("ParsePrologue = %+v, want {%#x %#x}", p, tc.after, tc.framed)
			}
		})
	}
	t.Run("hand-made Inst values", func(t *testing.T) {
		if _, err := ParsePrologue([]Inst{{Offset: 0, Len: 4, Op: x86asm.CMP, Text: "CMPQ SP, 0x10(R14)"}}); !errors.Is(err, ErrUnrecognized) {
			t.Errorf("got %v, want ErrUnrecognized", err)
		}
		if _, err := ParsePrologue(nil); !errors.Is(err, ErrUnrecognized) {
			t.Errorf("got %v, want ErrUnrecognized", err)
		}
	})
	t.Run("morestack branch backwards", func(t *testing.T) {
		a := sxtNew().label("top").raw("493b6610").j32("0f86", "top").raw("55 4889e5 c3")
		insts, err := Decode(a.code(0))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ParsePrologue(insts); !errors.Is(err, ErrUnrecognized) {
			t.Errorf("got %v, want ErrUnrecognized", err)
		}
	})
}

func TestEntrySiteHandWritten(t *testing.T) {
	s, err := EntrySite(sxtAssign(sxtOpts{endbr: true}).code(sxtEntry))
	if err != nil {
		t.Fatal(err)
	}
	if want := (Site{Offset: 0xe, Inst: "PUSHQ BP", Emulated: true, Len: 1}); s != want {
		t.Errorf("EntrySite = %+v, want %+v", s, want)
	}
	s, err = EntrySite(sxtAssign(sxtOpts{bigFrame: true}).code(sxtEntry))
	if want := (Site{Offset: 0xf, Inst: "PUSHQ BP", Emulated: true, Len: 1}); err != nil || s != want {
		t.Errorf("EntrySite = %+v, %v, want %+v", s, err, want)
	}
	if _, err := EntrySite(sxtAssign(sxtOpts{noCheck: true}).code(sxtEntry)); !errors.Is(err, ErrUnrecognized) {
		t.Errorf("no stack check: %v, want ErrUnrecognized", err)
	}
}

func TestNilMapSiteHandWritten(t *testing.T) {
	type tc struct {
		name string
		a    *sxtAsm
		op   MapOp
		want string // instruction text at the site; "" = must reject
		why  string // substring of the rejection
	}
	cases := []tc{
		{"assign", sxtAssign(sxtOpts{}), MapAssign, "JE .+4", ""},
		{"assign large frame", sxtAssign(sxtOpts{bigFrame: true}), MapAssign, "JE .+4", ""},
		{"assign ENDBR64 at start", sxtAssign(sxtOpts{endbr: true}), MapAssign, "JE .+4", ""},
		{"assign JNE around", sxtAssign(sxtOpts{jne: true}), MapAssign, "JE .+4", ""},
		{"assign with spills and NOPs", sxtAssign(sxtOpts{pre: "4889442430 48895c2438 660f1f440000 0f1f00"}), MapAssign, "JE .+4", ""},
		{"assign RBX reloaded from its spill slot", sxtAssign(sxtOpts{pre: "48895c2438 31db 488b5c2438"}), MapAssign, "JE .+4", ""},
		{"assign jump into the middle of an instruction", sxtAssign(sxtOpts{nilLabel: "nil+1"}), MapAssign, "", "not an instruction boundary"},
		{"assign RBX clobbered", sxtAssign(sxtOpts{pre: "4889cb"}), MapAssign, "", "RBX"},
		{"assign BL clobbered", sxtAssign(sxtOpts{pre: "8a5c2430"}), MapAssign, "", "RBX"},
		{"assign BH clobbered", sxtAssign(sxtOpts{pre: "88e7"}), MapAssign, "", "RBX"},
		{"assign RAX clobbered", sxtAssign(sxtOpts{pre: "31c0"}), MapAssign, "", "RAX"},
		{"assign RBX reloaded from a slot it was not stored to", sxtAssign(sxtOpts{pre: "48895c2438 31db 488b5c2430"}), MapAssign, "", "RBX"},
		{"assign CPUID (implicit writes)", sxtAssign(sxtOpts{pre: "0fa2"}), MapAssign, "", "classify"},
		{"assign XCHG", sxtAssign(sxtOpts{pre: "4887d8"}), MapAssign, "", "classify"},
		{"assign call before the check", sxtAssign(sxtOpts{pre: "ffd1"}), MapAssign, "", "classify"},
		{"assign frame pointer clobbered", sxtAssign(sxtOpts{pre: "31ed"}), MapAssign, "", "frame"},
		{"assign without frame pointer", sxtAssign(sxtOpts{noFrame: true}), MapAssign, "", "frame"},
		{"assign without stack check", sxtAssign(sxtOpts{noCheck: true}), MapAssign, "", "stack-check"},
		{"assign nil block calls something else", sxtAssign(sxtOpts{panicAt: sxtOther}), MapAssign, "", "runtime.throw"},
		{"assign site also reached elsewhere", sxtAssign(sxtOpts{extraRef: true}), MapAssign, "", "also reached"},
		{"assign truncated instruction at the end", sxtAssign(sxtOpts{tail: "488b"}), MapAssign, "", "decode"},
		{"assign branch into the checked path", sxtAssign(sxtOpts{intoPath: "test"}), MapAssign, "", "into the checked path"},
		{"assign branch back to the entry", sxtAssign(sxtOpts{intoPath: "entry"}), MapAssign, "JE .+4", ""},
		{"assign shape as access", sxtAssign(sxtOpts{}), MapAccess, "", "empty-map"},
		// The site moves on to the block's emulated JE only where that
		// keeps its meaning; otherwise it stays on the block's start.
		{"assign block clobbers RAX before its JE", sxtAssign(sxtOpts{block: "488b0500000000 4889c1"}), MapAssign, "MOVQ 0(IP), AX", ""},
		{"assign block clobbers RBX before its JE", sxtAssign(sxtOpts{block: "488b1d00000000 4889d9"}), MapAssign, "MOVQ 0(IP), BX", ""},
		{"assign block's JE also reached elsewhere", sxtAssign(sxtOpts{branchIn: true}), MapAssign, "MOVQ 0(IP), CX", ""},
		{"assign block starts with an emulated instruction", sxtAssign(sxtOpts{block: "90"}), MapAssign, "NOPL", ""},
		{"assign block moves the stack pointer (BP is the frame)", sxtAssign(sxtOpts{block: "4883ec08 488b0d00000000"}), MapAssign, "JE .+4", ""},
		{"assign block clobbers BP before its JE", sxtAssign(sxtOpts{block: "31ed"}), MapAssign, "XORL BP, BP", ""},
		{"access", sxtAccess(sxtOpts{}, false, "", ""), MapAccess, "LEAQ 0(IP), AX", ""},
		{"access large frame", sxtAccess(sxtOpts{bigFrame: true}, false, "", ""), MapAccess, "LEAQ 0(IP), AX", ""},
		{"access race form", sxtAccess(sxtOpts{}, true, "", ""), MapAccess, "LEAQ 0(IP), AX", ""},
		{"access race form large frame", sxtAccess(sxtOpts{bigFrame: true}, true, "", ""), MapAccess, "LEAQ 0(IP), AX", ""},
		{"access checks branch to different blocks", sxtAccess(sxtOpts{}, false, "", "L+7"), MapAccess, "", "same block"},
		{"access jump into the middle of an instruction", sxtAccess(sxtOpts{nilLabel: "L+1"}, false, "", "L+1"), MapAccess, "", "not an instruction boundary"},
		{"access RBX clobbered", sxtAccess(sxtOpts{pre: "4889cb"}, false, "", ""), MapAccess, "", "RBX"},
		{"access site also reached elsewhere", sxtAccess(sxtOpts{extraRef: true}, false, "", ""), MapAccess, "", "also reached"},
		{"access race form: RAX not reloaded after the call", sxtAccess(sxtOpts{}, true,
			"488d0d00000000 4889d8 488b5c2428 e800000000 488b542438 4885d2 4889d3", ""), MapAccess, "", "RAX"},
		{"access race form: RAX reloaded from the return-PC slot", sxtAccess(sxtOpts{}, true,
			"488d0d00000000 4889d8 488b5c2428 e800000000 488b542438 4885d2 488b442428 4889d3", ""), MapAccess, "", "RAX"},
		{"access race form: spill slot overwritten", sxtAccess(sxtOpts{}, true,
			"48894c2430 488b542438 4885d2 488b442430 4889d3", ""), MapAccess, "", "RAX"},
		{"access race form: spill slot address escapes", sxtAccess(sxtOpts{}, true,
			"488d7c2430 e800000000 488b542438 4885d2 488b442430 4889d3", ""), MapAccess, "", "RAX"},
		{"access race form: jump in the path", sxtAccess(sxtOpts{}, true,
			"7400 488b542438 4885d2 488b442430 4889d3", ""), MapAccess, "", "classify"},
		{"access branch to the empty-map check", sxtAccess(sxtOpts{intoPath: "cmp"}, false, "", ""), MapAccess, "", "into the checked path"},
		{"access race form: merged JE reached elsewhere", sxtAccess(sxtOpts{intoPath: "M"}, true, "", ""), MapAccess, "", "into the checked path"},
		{"access shape as assign", sxtAccess(sxtOpts{}, false, "", ""), MapAssign, "", "panic"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			code := c.a.code(sxtEntry)
			insts, decErr := Decode(code)
			s, err := NilMapSite(code, sxtEntry, c.op, sxtCallee)
			if c.want == "" {
				if err == nil {
					t.Fatalf("NilMapSite = %+v, want rejection", s)
				}
				if !errors.Is(err, ErrUnrecognized) {
					t.Errorf("error %v does not wrap ErrUnrecognized", err)
				}
				if !strings.Contains(err.Error(), c.why) {
					t.Errorf("error %q does not mention %q", err, c.why)
				}
				return
			}
			if err != nil || decErr != nil {
				t.Fatalf("NilMapSite: %v (decode: %v)", err, decErr)
			}
			if s.Inst != c.want || !s.Framed {
				t.Errorf("NilMapSite = %+v, want %q framed", s, c.want)
			}
			sxtCheckBoundary(t, insts, s)
		})
	}
	t.Run("unknown op", func(t *testing.T) {
		if _, err := NilMapSite(sxtAssign(sxtOpts{}).code(sxtEntry), sxtEntry, 0, sxtCallee); !errors.Is(err, ErrUnrecognized) {
			t.Errorf("got %v", err)
		}
	})
	t.Run("nil callee", func(t *testing.T) {
		if _, err := NilMapSite(sxtAssign(sxtOpts{}).code(sxtEntry), sxtEntry, MapAssign, nil); !errors.Is(err, ErrUnrecognized) {
			t.Errorf("got %v", err)
		}
	})
	t.Run("entry address matters for the callee", func(t *testing.T) {
		code := sxtAssign(sxtOpts{}).code(sxtEntry)
		if _, err := NilMapSite(code, sxtEntry+0x10, MapAssign, sxtCallee); !errors.Is(err, ErrUnrecognized) {
			t.Errorf("got %v", err)
		}
	})
}

// sxtCheckBoundary checks that s is the start of a decoded instruction and
// agrees with it.
func sxtCheckBoundary(t *testing.T, insts []Inst, s Site) {
	t.Helper()
	for _, in := range insts {
		if in.Offset == s.Offset {
			if in.Text != s.Inst || in.Emulated != s.Emulated {
				t.Errorf("site %+v disagrees with instruction %+v", s, in)
			}
			return
		}
	}
	t.Errorf("site %+v is not an instruction boundary", s)
}

// ---------------------------------------------------------------------------
// Real binaries.

// The map functions whose sites the library probes.
var (
	sxtAssignFuncs = []string{"runtime.mapassign", "runtime.mapassign_fast32", "runtime.mapassign_fast64",
		"runtime.mapassign_faststr", "runtime.mapassign_fast32ptr", "runtime.mapassign_fast64ptr"}
	sxtAccessFuncs = []string{"runtime.mapaccess1", "runtime.mapaccess2",
		"runtime.mapaccess1_fast32", "runtime.mapaccess1_fast64", "runtime.mapaccess1_faststr",
		"runtime.mapaccess2_fast32", "runtime.mapaccess2_fast64", "runtime.mapaccess2_faststr"}
)

// sxtTargetSrc is the program built for the tests: map operations of every
// fast and generic flavour, a nil map write in a recover and nil map reads.
const sxtTargetSrc = `package main

import "fmt"

type big struct{ a [40]int64 } // > 128 bytes: stored indirectly
type key struct {
	a, b int64
	s    string
}

var sink any

//go:noinline
func use(v ...any) { sink = v }

func main() {
	ms := map[string]int{"a": 1}
	m64 := map[int64]int{1: 2}
	m32 := map[int32]int{1: 2}
	x := 5
	mp := map[*int]int{&x: 3}
	mk := map[key]big{{1, 2, "x"}: {}}
	mb := map[string]big{"q": {}}
	ms["b"], m64[2], m32[2], mp[nil], mk[key{}], mb["r"] = 2, 3, 3, 4, big{}, big{}
	v1, ok1 := ms["a"]
	v2, ok2 := m64[1]
	v3, ok3 := m32[1]
	v4, ok4 := mp[&x]
	v5, ok5 := mk[key{1, 2, "x"}]
	v6, ok6 := mb["q"]
	use(ms["a"], m64[1], m32[1], mp[&x], mk[key{}], mb["q"], v1, ok1, v2, ok2, v3, ok3, v4, ok4, v5, ok5, v6, ok6)

	func() {
		defer func() { sink = recover() }()
		var nm map[string]int
		nm["x"] = 1
	}()
	var ns map[string]int
	var n64 map[int64]int
	var n32 map[int32]int
	var nk map[key]big
	w1, k1 := ns["a"]
	w2, k2 := n64[3]
	w3, k3 := n32[3]
	w4, k4 := nk[key{}]
	use(ns["a"], n64[1], n32[1], nk[key{}], w1, k1, w2, k2, w3, k3, w4, k4)
	fmt.Println(len(ms), len(m64), len(m32), len(mp), len(mk), len(mb))
}
`

// sxtBinary is one built variant of the target program.
type sxtBinary struct {
	toolchain string // GOTOOLCHAIN value
	mode      string // default, pie, stripped, race
	path      string
	goVersion string // from the binary's build info
	pclntab   bool   // no .symtab: function bounds from .gopclntab, no objdump
}

func (b sxtBinary) name() string { return b.goVersion + "/" + b.mode }

// sxtMode is a build mode: its name and go build flags.
type sxtMode struct {
	mode  string
	flags []string
}

var sxtModes = []sxtMode{
	{"default", nil},
	{"pie", []string{"-buildmode=pie"}},
	{"stripped", []string{"-ldflags=-s -w"}},
	{"race", []string{"-race"}},
}

// sxtGoEnv is the environment for the go command building the target.
func sxtGoEnv(toolchain string, extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		switch strings.SplitN(kv, "=", 2)[0] {
		case "GOFLAGS", "GOTOOLCHAIN", "GOOS", "GOARCH", "CGO_ENABLED", "GOWORK", "GOEXPERIMENT":
			continue
		}
		env = append(env, kv)
	}
	return append(env, append([]string{"GOTOOLCHAIN=" + toolchain, "GOWORK=off", "GOFLAGS="}, extra...)...)
}

// sxtVariant is one build of a test program.
type sxtVariant struct {
	toolchain, mode, path string
	goVersion             string // from the binary's build info
}

// sxtBuildVariants writes src as module mod into dir and builds it with
// each available toolchain in each mode, two at a time (the machine has two
// cores). Toolchains that are not available are skipped with a log, as are
// -race builds in -short mode or where they fail (they need cgo and a C
// toolchain).
func sxtBuildVariants(t *testing.T, dir, mod, src string, modes []sxtMode) []sxtVariant {
	t.Helper()
	return sxtBuildWith(t, dir, mod, src, modes, []string{"local", "go1.25.14"})
}

// sxtBuildWith is sxtBuildVariants with the given toolchains (each skipped
// where the module proxy cannot give it).
func sxtBuildWith(t *testing.T, dir, mod, src string, modes []sxtMode, toolchains []string) []sxtVariant {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module "+mod+"\n\ngo 1.25\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "main.go"), []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	type job struct {
		sxtVariant
		flags []string
	}
	var todo []job
	for _, tc := range toolchains {
		cmd := exec.Command("go", "version")
		cmd.Dir, cmd.Env = dir, sxtGoEnv(tc)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Logf("toolchain %s unavailable, skipping its variants: %v\n%s", tc, err, out)
			continue
		}
		for _, m := range modes {
			if testing.Short() && m.mode == "race" {
				continue
			}
			todo = append(todo, job{sxtVariant{toolchain: tc, mode: m.mode, path: filepath.Join(dir, tc+"-"+m.mode)}, m.flags})
		}
	}
	var wg sync.WaitGroup
	sem := make(chan struct{}, 2)
	errs := make([]error, len(todo))
	for i := range todo {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			b := &todo[i]
			args := append([]string{"build", "-o", b.path}, b.flags...)
			cgo := "CGO_ENABLED=0"
			if b.mode == "race" {
				cgo = "CGO_ENABLED=1"
			}
			cmd := exec.Command("go", append(args, ".")...)
			cmd.Dir, cmd.Env = dir, sxtGoEnv(b.toolchain, cgo)
			if out, err := cmd.CombinedOutput(); err != nil {
				errs[i] = fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, out)
				return
			}
			bi, err := buildinfo.ReadFile(b.path)
			if err != nil {
				errs[i] = err
				return
			}
			b.goVersion = bi.GoVersion
		}()
	}
	wg.Wait()
	var built []sxtVariant
	for i, err := range errs {
		if err != nil {
			if todo[i].mode == "race" {
				t.Logf("skipping %s/%s: %v", todo[i].toolchain, todo[i].mode, err)
				continue
			}
			t.Fatal(err)
		}
		built = append(built, todo[i].sxtVariant)
	}
	return built
}

// sxtBuildAll builds every variant of sxtTargetSrc in dir.
func sxtBuildAll(t *testing.T, dir string) []sxtBinary {
	t.Helper()
	var bins []sxtBinary
	for _, v := range sxtBuildVariants(t, dir, "sitestarget", sxtTargetSrc, sxtModes) {
		bins = append(bins, sxtBinary{toolchain: v.toolchain, mode: v.mode, path: v.path, goVersion: v.goVersion, pclntab: v.mode == "stripped"})
	}
	return bins
}

// sxtImage gives function bodies of one binary.
type sxtImage struct {
	file  *elf.File
	funcs map[string]sxtSym
	names map[uint64]string // function entry -> name
}

type sxtSym struct{ entry, size uint64 }

// sxtOpen reads function bounds from .symtab, or from .gopclntab when the
// binary is stripped (pclntab = true).
func sxtOpen(path string, pclntab bool) (*sxtImage, error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, err
	}
	img := &sxtImage{file: f, funcs: map[string]sxtSym{}, names: map[uint64]string{}}
	if !pclntab {
		syms, err := f.Symbols()
		if err != nil {
			f.Close()
			return nil, err
		}
		for _, s := range syms {
			if elf.ST_TYPE(s.Info) == elf.STT_FUNC {
				img.add(s.Name, s.Value, s.Size)
			}
		}
		return img, nil
	}
	sec, text := f.Section(".gopclntab"), f.Section(".text")
	if sec == nil || text == nil {
		f.Close()
		return nil, errors.New("no .gopclntab or .text")
	}
	data, err := sec.Data()
	if err != nil {
		f.Close()
		return nil, err
	}
	tab, err := gosym.NewTable(nil, gosym.NewLineTable(data, text.Addr))
	if err != nil {
		f.Close()
		return nil, err
	}
	for _, fn := range tab.Funcs {
		img.add(fn.Name, fn.Entry, fn.End-fn.Entry)
	}
	return img, nil
}

func (img *sxtImage) add(name string, entry, size uint64) {
	if _, dup := img.funcs[name]; !dup {
		img.funcs[name] = sxtSym{entry, size}
	}
	img.names[entry] = name
}

func (img *sxtImage) callee(addr uint64) string { return img.names[addr] }

// symtabFunc returns the body of the named function and its entry address.
func (img *sxtImage) symtabFunc(name string) ([]byte, uint64, bool, error) {
	s, ok := img.funcs[name]
	if !ok {
		return nil, 0, false, nil
	}
	for _, sec := range img.file.Sections {
		if sec.Flags&elf.SHF_EXECINSTR == 0 || s.entry < sec.Addr || s.entry+s.size > sec.Addr+sec.Size {
			continue
		}
		code := make([]byte, s.size)
		if _, err := sec.ReadAt(code, int64(s.entry-sec.Addr)); err != nil {
			return nil, 0, true, err
		}
		return code, s.entry, true, nil
	}
	return nil, 0, true, fmt.Errorf("%s: no executable section holds %#x+%#x", name, s.entry, s.size)
}

// sxtObjInst is one line of go tool objdump output.
type sxtObjInst struct {
	addr uint64
	text string
}

// sxtObjdump disassembles the map functions of bin with go tool objdump.
func sxtObjdump(t *testing.T, bin string) map[string][]sxtObjInst {
	t.Helper()
	cmd := exec.Command("go", "tool", "objdump", "-s", `^runtime\.map(assign|access[12])(_fast32|_fast64|_faststr|_fast32ptr|_fast64ptr)?$`, bin)
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

// sxtTruth is what objdump says the sites are.
type sxtTruth struct {
	entry   uint64 // address after the first JBE
	nil     uint64 // JE target from the TESTQ BX, BX line (followed once through a JE there)
	merged  bool   // the JE target was itself a JE (the -race access form)
	hasTest bool
	// nilEmu is, for a nil block that does not start with a branch, its
	// first branch or NOP before any CALL, if no instruction before it
	// writes AX or BX (objdump's Go syntax puts the destination last): where
	// NilMapSite moves a mapassign site to.
	nilEmu uint64
}

func sxtGroundTruth(t *testing.T, insts []sxtObjInst) sxtTruth {
	t.Helper()
	var tr sxtTruth
	at := map[uint64]string{}
	for _, in := range insts {
		at[in.addr] = in.text
	}
	jeTarget := func(text string) (uint64, bool) {
		s, ok := strings.CutPrefix(text, "JE 0x")
		if !ok {
			return 0, false
		}
		v, err := strconv.ParseUint(s, 16, 64)
		return v, err == nil
	}
	for i, in := range insts {
		if tr.entry == 0 && strings.HasPrefix(in.text, "JBE ") && i+1 < len(insts) {
			tr.entry = insts[i+1].addr
		}
		if !tr.hasTest && in.text == "TESTQ BX, BX" && i+1 < len(insts) {
			target, ok := jeTarget(insts[i+1].text)
			if !ok {
				t.Fatalf("objdump: TESTQ BX, BX followed by %q", insts[i+1].text)
			}
			tr.hasTest, tr.nil = true, target
			if t2, ok := jeTarget(at[target]); ok {
				tr.nil, tr.merged = t2, true
			}
		}
	}
	for i, in := range insts {
		if !tr.hasTest || in.addr != tr.nil {
			continue
		}
		for j := i; j < len(insts) && j < i+12; j++ {
			text := insts[j].text
			if strings.HasPrefix(text, "J") || strings.HasPrefix(text, "NOP") {
				if j > i {
					tr.nilEmu = insts[j].addr
				}
				break
			}
			if strings.HasPrefix(text, "CALL") || strings.HasSuffix(text, ", AX") || strings.HasSuffix(text, ", BX") ||
				strings.HasPrefix(text, "RET") || strings.HasPrefix(text, "ENDBR") {
				break
			}
		}
		break
	}
	return tr
}

// sxtRow is one line of the result table.
type sxtRow struct {
	variant, fn, entry, nilSite, note string
}

func sxtDescribe(s Site, err error) string {
	if err != nil {
		return "rejected: " + err.Error()
	}
	return fmt.Sprintf("+%#x %s (emulated=%v framed=%v)", s.Offset, s.Inst, s.Emulated, s.Framed)
}

func TestSitesRealBinaries(t *testing.T) {
	if runtime.GOOS != "linux" || runtime.GOARCH != "amd64" {
		t.Skip("linux/amd64 only")
	}
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("no go command")
	}
	bins := sxtBuildAll(t, t.TempDir())
	// Sites per toolchain and function from the unstripped default build,
	// for comparing the stripped build (objdump cannot read it).
	ref := map[string]map[string][2]Site{}
	sort.SliceStable(bins, func(i, j int) bool { return bins[i].mode != "stripped" && bins[j].mode == "stripped" })
	var rows []sxtRow
	for _, b := range bins {
		t.Run(b.name(), func(t *testing.T) {
			rows = append(rows, sxtCheckBinary(t, b, ref)...)
		})
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "%-22s | %-27s | %-44s | %s\n", "variant", "function", "EntrySite", "NilMapSite")
	for _, r := range rows {
		fmt.Fprintf(&sb, "%-22s | %-27s | %-44s | %s%s\n", r.variant, r.fn, r.entry, r.nilSite, r.note)
	}
	t.Logf("sites:\n%s", sb.String())
}

// TestSitesSelf checks the running test binary, the kind of process the
// library probes.
func TestSitesSelf(t *testing.T) {
	if runtime.GOOS != "linux" || runtime.GOARCH != "amd64" {
		t.Skip("linux/amd64 only")
	}
	exe, err := os.Executable()
	if err != nil {
		t.Skip(err)
	}
	bi, err := buildinfo.ReadFile(exe)
	if err != nil {
		t.Skip(err)
	}
	// go test links test binaries without .symtab unless asked otherwise.
	pcln := false
	if img, err := sxtOpen(exe, false); err != nil {
		pcln = true
	} else {
		img.file.Close()
	}
	mode := "test-binary"
	for _, s := range bi.Settings {
		if s.Key == "-race" && s.Value == "true" {
			mode = "race"
		}
	}
	rows := sxtCheckBinary(t, sxtBinary{mode: mode, path: exe, goVersion: bi.GoVersion, pclntab: pcln}, nil)
	for _, r := range rows {
		t.Logf("%s %s: entry %s; nil %s%s", r.variant, r.fn, r.entry, r.nilSite, r.note)
	}
}

func sxtCheckBinary(t *testing.T, b sxtBinary, ref map[string]map[string][2]Site) []sxtRow {
	stripped := b.pclntab
	img, err := sxtOpen(b.path, stripped)
	if err != nil {
		t.Fatal(err)
	}
	defer img.file.Close()
	var obj map[string][]sxtObjInst
	if !stripped {
		obj = sxtObjdump(t, b.path)
	}
	if ref != nil && !stripped && b.mode == "default" {
		ref[b.goVersion] = map[string][2]Site{}
	}
	var rows []sxtRow
	found := 0
	for _, fn := range append(append([]string(nil), sxtAssignFuncs...), sxtAccessFuncs...) {
		op := MapAccess
		if strings.HasPrefix(fn, "runtime.mapassign") {
			op = MapAssign
		}
		code, entry, ok, err := img.symtabFunc(fn)
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			continue // not linked into this program (mapassign_fast32ptr on 64-bit)
		}
		// Go 1.27's mapaccess1* only call mapaccess2*: no nil check of
		// their own; the library probes the mapaccess2* they wrap.
		if w, _, err := WrapperCall(code, entry, img.callee); err == nil && w == strings.Replace(fn, "mapaccess1", "mapaccess2", 1) {
			found++
			rows = append(rows, sxtRow{variant: b.name(), fn: strings.TrimPrefix(fn, "runtime."), entry: "wrapper of " + w})
			continue
		} else if sxtWrapsReads(b.goVersion) && strings.HasPrefix(fn, "runtime.mapaccess1") {
			t.Errorf("%s: WrapperCall = %q, %v on %s", fn, w, err, b.goVersion)
		}
		found++
		insts, err := Decode(code)
		if err != nil {
			t.Errorf("%s: Decode: %v", fn, err)
			continue
		}
		es, eerr := EntrySite(code)
		ns, nerr := NilMapSite(code, entry, op, img.callee)
		row := sxtRow{variant: b.name(), fn: strings.TrimPrefix(fn, "runtime."), entry: sxtDescribe(es, eerr), nilSite: sxtDescribe(ns, nerr)}

		// EntrySite: the instruction after the JBE, PUSHQ BP, emulated.
		if eerr != nil {
			t.Errorf("%s: EntrySite: %v", fn, eerr)
		} else {
			sxtCheckBoundary(t, insts, es)
			if es.Inst != "PUSHQ BP" || !es.Emulated || es.Framed {
				t.Errorf("%s: EntrySite = %+v, want emulated PUSHQ BP, not framed", fn, es)
			}
		}
		// NilMapSite: recognised (a -race build may reject, but only with
		// ErrUnrecognized), on a boundary, framed.
		if nerr != nil {
			if !errors.Is(nerr, ErrUnrecognized) {
				t.Errorf("%s: NilMapSite error %v does not wrap ErrUnrecognized", fn, nerr)
			}
			if b.mode != "race" {
				t.Errorf("%s: NilMapSite: %v", fn, nerr)
			}
		} else {
			sxtCheckBoundary(t, insts, ns)
			if !ns.Framed {
				t.Errorf("%s: NilMapSite = %+v, want framed", fn, ns)
			}
		}

		// Ground truth.
		if stripped && ref == nil {
			row.note = " [no symbol table: invariants only]"
		} else if stripped {
			r, ok := ref[b.goVersion][fn]
			if !ok {
				t.Errorf("%s: no unstripped default build to compare with", fn)
			} else {
				if eerr == nil && (es.Offset != r[0].Offset || es.Inst != r[0].Inst) {
					t.Errorf("%s: stripped EntrySite %+v, default build %+v", fn, es, r[0])
				}
				if nerr == nil && (ns.Offset != r[1].Offset || sxtMnemonic(ns.Inst) != sxtMnemonic(r[1].Inst)) {
					t.Errorf("%s: stripped NilMapSite %+v, default build %+v", fn, ns, r[1])
				}
			}
			row.note = " [checked against the unstripped build]"
		} else {
			lines := obj[fn]
			if len(lines) == 0 {
				t.Errorf("%s: not in objdump output", fn)
				continue
			}
			// The linear decoding agrees with objdump's, instruction by instruction.
			if len(lines) != len(insts) {
				t.Errorf("%s: %d instructions, objdump has %d", fn, len(insts), len(lines))
			} else {
				for i, l := range lines {
					if insts[i].Offset != l.addr-entry {
						t.Errorf("%s: instruction %d at +%#x, objdump at %#x", fn, i, insts[i].Offset, l.addr)
						break
					}
				}
			}
			tr := sxtGroundTruth(t, lines)
			if eerr == nil && entry+es.Offset != tr.entry {
				t.Errorf("%s: EntrySite at %#x, objdump says %#x", fn, entry+es.Offset, tr.entry)
			}
			if !tr.hasTest {
				t.Errorf("%s: objdump shows no TESTQ BX, BX", fn)
			} else if want := tr.nil; nerr == nil {
				if op == MapAssign && tr.nilEmu != 0 {
					want = tr.nilEmu
				}
				if entry+ns.Offset != want {
					t.Errorf("%s: NilMapSite at %#x, objdump says %#x", fn, entry+ns.Offset, want)
				}
				if op == MapAssign && tr.nilEmu != 0 && !ns.Emulated {
					t.Errorf("%s: NilMapSite = %+v, want an emulated instruction", fn, ns)
				}
			}
			if tr.merged {
				row.note = " [JE target is a JE: -race merged form]"
			}
			if ref != nil && b.mode == "default" {
				ref[b.goVersion][fn] = [2]Site{es, ns}
			}
		}
		rows = append(rows, row)
	}
	if found == 0 {
		t.Errorf("no map functions in %s", b.path)
	}
	return rows
}

func sxtMnemonic(text string) string {
	if f := strings.Fields(text); len(f) > 0 {
		return f[0]
	}
	return ""
}
