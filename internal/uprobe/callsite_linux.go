//go:build linux && amd64

package uprobe

import (
	"os"
	"runtime"
	"slices"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/mapguard/mapguard/internal/rt"
	"github.com/mapguard/mapguard/internal/x86site"
)

// maxCallerCode bounds how much of a caller's code callSiteType decodes.
const maxCallerCode = 64 << 10

// probed holds, for each address of the program's own code where a probe
// is attached (a nested read's CALL, siteCaller), the byte the kernel's
// breakpoint (int3) replaced there: the code the Guard decodes from memory
// is the program's, not the breakpoints'.
var probed struct {
	sync.RWMutex
	orig map[uintptr]byte
}

// addProbed records that a probe will be attached at addr, whose first
// byte is b; removeProbed that it was detached for good.
func addProbed(addr uintptr, b byte) {
	probed.Lock()
	defer probed.Unlock()
	if probed.orig == nil {
		probed.orig = make(map[uintptr]byte)
	}
	probed.orig[addr] = b
}

func removeProbed(addr uintptr) {
	probed.Lock()
	defer probed.Unlock()
	delete(probed.orig, addr)
}

// codeAt returns this binary's code from lo to hi (both in its text, which
// the caller has checked): the memory itself, or a copy with the bytes
// under the Guard's own breakpoints put back.
func codeAt(lo, hi uintptr) []byte {
	mem := unsafe.Slice((*byte)(*(*unsafe.Pointer)(unsafe.Pointer(&lo))), hi-lo)
	probed.RLock()
	defer probed.RUnlock()
	var out []byte
	for a, b := range probed.orig {
		if a >= lo && a < hi {
			if out == nil {
				out = slices.Clone(mem)
			}
			out[a-lo] = b
		}
	}
	if out != nil {
		return out
	}
	return mem
}

// callSiteType returns the map type that the call returning to pc passes
// in AX, when the compiler loads it as a constant right before the call
// (LEAQ type:map[K]V(SB), AX), as it does for every map operation outside
// generic code; 0 otherwise. It is used where the probe cannot read the
// type itself. The candidate is read back through process_vm_readv, so an
// address that is not mapped costs an error, not a fault, and it is kept
// only if it reads as a map type.
func callSiteType(o *rt.Offsets, pc uintptr) uintptr {
	f := runtime.FuncForPC(pc - 1)
	if f == nil {
		return 0
	}
	entry := f.Entry()
	if pc <= entry || pc-entry > maxCallerCode {
		return 0
	}
	code := codeAt(entry, pc)
	addr, ok := x86site.CallArgType(code, uint64(entry), uint64(pc))
	if !ok || addr == 0 {
		return 0
	}
	var kind [1]byte
	local := []unix.Iovec{{Base: &kind[0], Len: 1}}
	remote := []unix.RemoteIovec{{Base: uintptr(addr + o.TypeKind), Len: 1}}
	if n, err := unix.ProcessVMReadv(os.Getpid(), local, remote, 0); err != nil || n != 1 {
		return 0
	}
	if kind[0]&rt.KindMask != rt.KindMap {
		return 0
	}
	return uintptr(addr)
}

// callTarget names the function that the direct call returning to pc
// (CALL rel32, 5 bytes) calls, "" if the instruction before pc is not one.
// pc must be a return address in this binary's code, which the runtime
// knows (checked first, so nothing unmapped is read).
func callTarget(pc uintptr) string {
	f := runtime.FuncForPC(pc - 1)
	if f == nil || pc < f.Entry()+5 {
		return ""
	}
	call := codeAt(pc-5, pc)
	if call[0] != 0xe8 {
		return ""
	}
	rel := int32(uint32(call[1]) | uint32(call[2])<<8 | uint32(call[3])<<16 | uint32(call[4])<<24)
	target := runtime.FuncForPC(uintptr(int64(pc) + int64(rel)))
	if target == nil {
		return ""
	}
	return target.Name()
}

// nestedOuter returns, for a map read that returns to pc, the return
// address of the outer read when the call is the inner read of m[a][b]
// (see x86site.NestedRead): the map it reads is the value an earlier
// plain read in the same function returned a pointer to. Where both
// reads' static map types are known, the outer map's elements must be
// maps of the inner read's type.
func nestedOuter(o *rt.Offsets, pc uintptr) (uintptr, bool) {
	f := runtime.FuncForPC(pc - 1)
	if f == nil {
		return 0, false
	}
	entry := f.Entry()
	if pc <= entry || pc-entry > maxCallerCode {
		return 0, false
	}
	code := codeAt(entry, funcEnd(entry, pc))
	callee := func(addr uint64) string {
		if g := runtime.FuncForPC(uintptr(addr)); g != nil && uint64(g.Entry()) == addr {
			return g.Name()
		}
		return ""
	}
	outer, ok := x86site.NestedRead(code, uint64(entry), uint64(pc), callee)
	if !ok {
		return 0, false
	}
	ot, it := callSiteType(o, uintptr(outer)), callSiteType(o, pc)
	if ot != 0 && it != 0 && rt.MapElem(ot) != it {
		return 0, false
	}
	return uintptr(outer), true
}

// funcEnd returns the end of the function at entry that holds pc (where
// the next function's code begins, or pc+maxCallerCode), from the
// runtime's function table: it grows a step until the step's end is in
// another function, then halves it.
func funcEnd(entry, pc uintptr) uintptr {
	in := func(a uintptr) bool {
		f := runtime.FuncForPC(a)
		return f != nil && f.Entry() == entry
	}
	lo, step := pc, uintptr(256) // lo is in the function
	for in(lo + step) {
		lo += step
		if lo-entry >= maxCallerCode {
			return entry + maxCallerCode
		}
		step *= 2
	}
	hi := lo + step // not in it
	for hi-lo > 1 {
		mid := lo + (hi-lo)/2
		if in(mid) {
			lo = mid
		} else {
			hi = mid
		}
	}
	return hi
}

// sameCode reports whether the running code at addr holds want (bytes read
// from the executable file): a site is probed only where the process runs
// the code it was found in.
func sameCode(want []byte, addr uintptr) bool {
	if addr == 0 || len(want) == 0 {
		return false
	}
	return string(codeAt(addr, addr+uintptr(len(want)))) == string(want)
}
