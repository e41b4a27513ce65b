package x86site

import (
	"bytes"
	"errors"
	"math/rand"
	"os"
	"testing"
)

// sxtFuzzBody is a function body the fuzzer mutates, with the addresses
// that make NilMapSite accept it unmodified.
type sxtFuzzBody struct {
	code           []byte
	entry, panicAt uint64
}

// sxtFuzzBodies returns the map function bodies of this test binary (real
// Go code, read through .symtab or .gopclntab) followed by the hand-written
// shapes of sites_test.go. Every fuzz worker process is the same binary, so
// the list is the same in all of them.
func sxtFuzzBodies() []sxtFuzzBody {
	var bodies []sxtFuzzBody
	if exe, err := os.Executable(); err == nil {
		img, err := sxtOpen(exe, false)
		if err != nil {
			img, err = sxtOpen(exe, true)
		}
		if err == nil {
			panicAt := img.funcs["runtime.gopanic"].entry
			for _, fn := range append(append([]string(nil), sxtAssignFuncs...), sxtAccessFuncs...) {
				if code, entry, ok, err := img.symtabFunc(fn); err == nil && ok {
					bodies = append(bodies, sxtFuzzBody{code, entry, panicAt})
				}
			}
			// CallSites and CallArgType targets (see calls_test.go).
			for _, fn := range sxtFuzzCallFuncs {
				if code, entry, ok, err := img.symtabFunc(fn); err == nil && ok {
					bodies = append(bodies, sxtFuzzBody{code, entry, panicAt})
				}
			}
			img.file.Close()
		}
	}
	for _, a := range []*sxtAsm{
		sxtAssign(sxtOpts{}), sxtAssign(sxtOpts{jne: true}), sxtAssign(sxtOpts{endbr: true, bigFrame: true}),
		sxtAccess(sxtOpts{}, false, "", ""), sxtAccess(sxtOpts{}, true, "", ""),
	} {
		bodies = append(bodies, sxtFuzzBody{a.code(sxtEntry), sxtEntry, sxtGopanic})
	}
	return append(bodies, sxtFuzzCallBodies()...)
}

// FuzzSites feeds arbitrary function bodies to Decode, ParsePrologue,
// EntrySite and NilMapSite, and to MissSites, CallSites and CallArgType
// (see sxtFuzzCalls). They must never panic, must fail closed (with
// ErrUnrecognized) on code that does not decode, and every site returned
// must be the start of an instruction of Decode's output that agrees with
// the site.
//
// base == 0 fuzzes the raw bytes of patch. Otherwise the body is a known
// one (a real runtime map or hash function of this test binary, a map
// call of it, or a hand-written shape), with patch written over it at offset at, the last cut bytes
// dropped, and entry and panicAt added to its real entry and
// runtime.gopanic addresses. Keeping the real bodies out of the fuzz input
// keeps inputs small, so the fuzzer's minimisation of new inputs (quadratic
// in their length) stays fast.
func FuzzSites(f *testing.F) {
	bodies := sxtFuzzBodies()
	rng := rand.New(rand.NewSource(1))
	for i, b := range bodies {
		f.Add(uint8(i+1), []byte(nil), uint16(0), uint16(0), uint64(0), uint64(0), uint8(0))
		p := make([]byte, 1+rng.Intn(4))
		rng.Read(p)
		f.Add(uint8(i+1), p, uint16(rng.Intn(len(b.code))), uint16(0), uint64(0), uint64(0), uint8(0))
		f.Add(uint8(i+1), []byte(nil), uint16(0), uint16(1+rng.Intn(len(b.code))), uint64(0), uint64(0), uint8(0))
	}
	for i := 0; i < 24; i++ {
		p := make([]byte, 1+rng.Intn(64))
		rng.Read(p)
		f.Add(uint8(0), p, uint16(0), uint16(0), rng.Uint64(), rng.Uint64(), uint8(rng.Intn(8)))
	}
	for _, p := range [][]byte{
		{0xf3, 0x0f, 0x1e, 0xfa},       // ENDBR64
		{0xf3, 0x0f, 0x1e, 0xfa, 0xc3}, // ENDBR64; RET
		{0x62, 0xf1, 0xfd, 0x48},       // truncated EVEX: x86asm panics
		{0x49, 0x3b, 0x66, 0x10, 0x76, 0x00, 0x55, 0x48, 0x89, 0xe5, 0x48, 0x85, 0xdb, 0x74, 0x00, 0xe8, 0, 0, 0, 0},
	} {
		f.Add(uint8(0), p, uint16(0), uint16(0), uint64(0), uint64(0), uint8(1))
	}

	f.Fuzz(func(t *testing.T, base uint8, patch []byte, at, cut uint16, entry, panicAt uint64, mod uint8) {
		code := patch
		if base != 0 && len(bodies) > 0 {
			b := bodies[int(base-1)%len(bodies)]
			code = bytes.Clone(b.code)
			if len(code) > 0 {
				copy(code[int(at)%len(code):], patch)
				code = code[:len(code)-int(cut)%len(code)]
			}
			entry += b.entry
			panicAt += b.panicAt
		}
		callee := func(addr uint64) string {
			if addr == panicAt || mod != 0 && addr%uint64(mod) == 0 {
				return "runtime.gopanic"
			}
			return ""
		}

		insts, decErr := Decode(code)
		if decErr == nil {
			var next uint64
			for _, in := range insts {
				if in.Offset != next || in.Len < 1 || in.Len > 15 || in.Text == "" {
					t.Fatalf("bad instruction %+v (expected offset %#x)", in, next)
				}
				next += uint64(in.Len)
			}
			if next != uint64(len(code)) {
				t.Fatalf("decoded %d of %d bytes", next, len(code))
			}
			if p, err := ParsePrologue(insts); err == nil {
				if !sxtIsBoundary(insts, p.AfterStackCheck) || p.FrameSet != 0 && !sxtIsBoundary(insts, p.FrameSet) {
					t.Fatalf("prologue %+v not on instruction boundaries", p)
				}
			} else if !errors.Is(err, ErrUnrecognized) {
				t.Fatalf("ParsePrologue error %v does not wrap ErrUnrecognized", err)
			}
		}
		check := func(what string, s Site, err error, framed bool) {
			if err != nil {
				if !errors.Is(err, ErrUnrecognized) {
					t.Fatalf("%s: error %v does not wrap ErrUnrecognized", what, err)
				}
				return
			}
			if decErr != nil {
				t.Fatalf("%s = %+v for code that does not decode (%v)", what, s, decErr)
			}
			if s.Framed != framed {
				t.Fatalf("%s = %+v, want Framed %v", what, s, framed)
			}
			for _, in := range insts {
				if in.Offset == s.Offset {
					if in.Text != s.Inst || in.Emulated != s.Emulated {
						t.Fatalf("%s = %+v disagrees with %+v", what, s, in)
					}
					return
				}
			}
			t.Fatalf("%s = %+v: not an instruction boundary", what, s)
		}
		s, err := EntrySite(code)
		check("EntrySite", s, err, false)
		s, err = NilMapSite(code, entry, MapAssign, callee)
		check("NilMapSite(MapAssign)", s, err, true)
		s, err = NilMapSite(code, entry, MapAccess, callee)
		check("NilMapSite(MapAccess)", s, err, true)
		sxtFuzzCalls(t, code, insts, decErr, entry, callee, at)
	})
}

func sxtIsBoundary(insts []Inst, off uint64) bool {
	for _, in := range insts {
		if in.Offset == off {
			return true
		}
	}
	return false
}
