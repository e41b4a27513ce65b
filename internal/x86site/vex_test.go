package x86site

import (
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"

	"golang.org/x/arch/x86/x86asm"

	"github.com/mapguard/mapguard/symbols"
)

func TestDecodeVEX(t *testing.T) {
	for _, c := range []struct {
		name string
		hex  []byte
		n    int
		regs []int
	}{
		{"SHLXQ", []byte{0xc4, 0xe2, 0xcb, 0xf7, 0xf0}, 5, []int{6}}, // reg = SI
		{"BLSRQ (vvvv dest)", []byte{0xc4, 0xc2, 0x90, 0xf3, 0xcf}, 5, []int{13}},
		{"VMOVDQU (DI), Y0", []byte{0xc5, 0xfe, 0x6f, 0x07}, 4, nil},
		{"VZEROUPPER", []byte{0xc5, 0xf8, 0x77}, 3, nil},
		{"VPCMPEQB 0x20(SI)(DX*1), Y0, Y1", []byte{0xc5, 0xfd, 0x74, 0x4c, 0x16, 0x20}, 6, nil},
		{"VPMOVMSKB Y1, DX", []byte{0xc5, 0xfd, 0xd7, 0xd1}, 4, []int{2}},
		{"RORXQ $3, AX, BX", []byte{0xc4, 0xe3, 0xfb, 0xf0, 0xd8, 0x03}, 6, []int{3}},
		{"VMOVDQU64 Z0, 0x40(DI) (EVEX, disp8)", []byte{0x62, 0xf1, 0xfe, 0x48, 0x7f, 0x47, 0x01}, 7, nil},
	} {
		in, err := sxDecodeOne(append(c.hex, 0x90, 0x90), false)
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		if in.Len != c.n || in.vex == nil || len(in.vex.regs) != len(c.regs) {
			t.Errorf("%s: length %d, vex %+v; want %d, regs %v", c.name, in.Len, in.vex, c.n, c.regs)
			continue
		}
		for i := range c.regs {
			if in.vex.regs[i] != c.regs[i] {
				t.Errorf("%s: writes %v, want %v", c.name, in.vex.regs, c.regs)
			}
		}
	}
	for _, b := range [][]byte{{0xc4}, {0xc5, 0xfe}, {0xc4, 0xe2, 0xcb, 0xf7}, {0x62, 0xf1, 0xfe}} {
		if _, err := sxDecodeOne(b, false); err == nil {
			t.Errorf("% x: truncated VEX decoded", b)
		}
	}
}

// vexTarget is a program that uses the map functions.
const vexTarget = `package main

import (
	"fmt"
	"os"
)

func main() {
	m := map[string]int{}
	for i, a := range os.Args {
		m[a] = i // runtime.mapassign_faststr
	}
	n := map[int64]string{}
	n[int64(len(os.Args))] = "x" // runtime.mapassign_fast64
	var nilMap map[string]int
	func() {
		defer func() { recover() }()
		nilMap["boom"] = 1 // runtime.gopanic
	}()
	fmt.Println(m["k"], n[1]) // runtime.mapaccess1_faststr, runtime.mapaccess1_fast64
}
`

// TestDecodeVEXAgainstX86asm decodes a GOAMD64=v3 build's whole text
// linearly, function by function, and checks each VEX instruction's length
// against x86asm's where x86asm knows it.
func TestDecodeVEXAgainstX86asm(t *testing.T) {
	if runtime.GOOS != "linux" || runtime.GOARCH != "amd64" {
		t.Skip("linux/amd64 only")
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "main.go"), []byte(vexTarget), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "v3")
	cmd := exec.Command("go", "build", "-o", out, "main.go")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOAMD64=v3", "GO111MODULE=off")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, b)
	}
	b, err := symbols.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ef, err := elf.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer ef.Close()
	var vex, compared, funcs int
	syms, err := ef.Symbols()
	if err != nil {
		t.Fatal(err)
	}
	for _, sym := range syms {
		if elf.ST_TYPE(sym.Info) != elf.STT_FUNC || sym.Size == 0 {
			continue
		}
		f, ok := b.FuncAt(sym.Value)
		if !ok || f.Entry != sym.Value {
			continue
		}
		code, err := b.Code(f)
		if err != nil || len(code) == 0 {
			continue
		}
		insts, err := Decode(code)
		if err != nil {
			continue // data in text, assembly with odd encodings: not ours to judge
		}
		funcs++
		for _, in := range insts {
			if in.vex == nil {
				continue
			}
			vex++
			x, err := x86asm.Decode(code[in.Offset:], 64)
			if err != nil || x.Op == 0 || x.Op == x86asm.VZEROUPPER {
				// x86asm counts the byte after VZEROUPPER (c5 f8 77) as
				// its own: "c5 f8 77 c3" is VZEROUPPER; RET.
				continue
			}
			compared++
			if x.Len != in.Len {
				t.Errorf("%s+%#x: % x: length %d, x86asm says %d (%v)", f.Name, in.Offset, code[in.Offset:in.Offset+uint64(max(x.Len, in.Len))], in.Len, x.Len, x)
			}
		}
	}
	t.Logf("%d functions decoded, %d VEX instructions, %d compared with x86asm", funcs, vex, compared)
	if vex == 0 || compared == 0 {
		t.Fatal("no VEX instructions compared")
	}
}
