package rt

import (
	"bytes"
	"errors"
	"fmt"
	"math/bits"
	"reflect"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"unsafe"
)

// ErrUnknownRuntime means this Go release or map implementation has no
// known layout.
var ErrUnknownRuntime = errors.New("unknown Go runtime layout")

// ErrMismatch means a known layout did not verify in this process.
var ErrMismatch = errors.New("runtime layout does not match")

// Load returns the offsets for the running Go release: the goroutine id's
// and the map type's group size derived from this process, the rest tabled,
// all verified against maps and types this function builds itself. It
// returns ErrUnknownRuntime for a Go release older than 1.Oldest or without
// swiss maps, and ErrMismatch, naming the field and the Go version, for a
// layout that cannot be derived or does not verify.
func Load() (*Offsets, error) {
	if minor, ok := goMinor(runtime.Version()); ok && minor < Oldest {
		return nil, fmt.Errorf("%s: %w", runtime.Version(), ErrUnknownRuntime)
	}
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, s := range info.Settings {
			if s.Key == "GOEXPERIMENT" && strings.Contains(s.Value, "noswissmap") {
				return nil, fmt.Errorf("GOEXPERIMENT=%s: %w", s.Value, ErrUnknownRuntime)
			}
		}
	}
	o := tabled
	if err := derive(&o); err != nil {
		return nil, err
	}
	if err := verify(&o); err != nil {
		return nil, err
	}
	return &o, nil
}

// eface is the layout of an empty interface: its first word is the type.
type eface struct {
	typ  unsafe.Pointer
	data unsafe.Pointer
}

// TypeOf returns the runtime type pointer of v's dynamic type.
func TypeOf(v any) unsafe.Pointer {
	return (*eface)(unsafe.Pointer(&v)).typ
}

// mapHeader returns the address of m's internal/runtime/maps.Map.
func mapHeader[K comparable, V any](m map[K]V) unsafe.Pointer {
	return *(*unsafe.Pointer)(unsafe.Pointer(&m))
}

// verify checks each layout field against a structure built here, one
// field after another; its length is the number of fields.
func verify(o *Offsets) error {
	mismatch := func(format string, args ...any) error {
		return fmt.Errorf("%s: %s: %w", runtime.Version(), fmt.Sprintf(format, args...), ErrMismatch)
	}

	// Type kind: a map type reads back as Map, an int type does not.
	mapKind := *(*uint8)(unsafe.Add(TypeOf(map[uint64]uint64(nil)), o.TypeKind)) & KindMask
	intKind := *(*uint8)(unsafe.Add(TypeOf(0), o.TypeKind)) & KindMask
	if mapKind != KindMap || intKind == KindMap {
		return mismatch("type kind at +%d reads %d for a map and %d for an int", o.TypeKind, mapKind, intKind)
	}

	// A small map: one group, no directory.
	small := map[uint64]uint64{1: 1, 2: 2, 3: 3}
	h := mapHeader(small)
	if used := *(*uint64)(unsafe.Add(h, o.MapUsed)); used != 3 {
		return mismatch("small map used = %d, want 3", used)
	}
	if dirLen := *(*int64)(unsafe.Add(h, o.MapDirLen)); dirLen != 0 {
		return mismatch("small map dirLen = %d, want 0", dirLen)
	}
	if *(*unsafe.Pointer)(unsafe.Add(h, o.MapDirPtr)) == nil {
		return mismatch("small map has no group")
	}

	// A large map: a directory of 2^globalDepth tables.
	large := make(map[uint64]uint64)
	const n = 5000
	for i := uint64(0); i < n; i++ {
		large[i] = i
	}
	h = mapHeader(large)
	used := *(*uint64)(unsafe.Add(h, o.MapUsed))
	dirLen := *(*int64)(unsafe.Add(h, o.MapDirLen))
	depth := *(*uint8)(unsafe.Add(h, o.MapGlobalDepth))
	shift := *(*uint8)(unsafe.Add(h, o.MapGlobalShift))
	if used != n {
		return mismatch("map used = %d, want %d", used, n)
	}
	if dirLen < 2 || dirLen&(dirLen-1) != 0 || bits.TrailingZeros64(uint64(dirLen)) != int(depth) || int(shift) != 64-int(depth) {
		return mismatch("map directory: dirLen %d, globalDepth %d, globalShift %d", dirLen, depth, shift)
	}
	// Tables: each distinct table covers 2^(globalDepth-localDepth)
	// directory entries; their capacities hold every entry at a load of at
	// most 7/8, and are powers of two.
	dir := *(*unsafe.Pointer)(unsafe.Add(h, o.MapDirPtr))
	var capacity uint64
	for i := int64(0); i < dirLen; {
		t := *(*unsafe.Pointer)(unsafe.Add(dir, 8*i))
		c := *(*uint16)(unsafe.Add(t, o.TableCapacity))
		ld := *(*uint8)(unsafe.Add(t, o.TableLocalDepth))
		if t == nil || c == 0 || c&(c-1) != 0 || ld > depth {
			return mismatch("table %d: capacity %d, localDepth %d, globalDepth %d", i, c, ld, depth)
		}
		capacity += uint64(c)
		i += 1 << (depth - ld)
	}
	if capacity < n || capacity > 4*n {
		return mismatch("map capacity %d for %d entries", capacity, n)
	}
	if cap := MapCapacity(uintptr(h), o); cap != capacity {
		return mismatch("MapCapacity = %d, want %d", cap, capacity)
	}
	// Group size of map[uint64]uint64: 8 control bytes and 8 keys and
	// elems of 8 bytes.
	mt := TypeOf(large)
	if gs := *(*uintptr)(unsafe.Add(mt, o.MapTypeGroupSize)); gs != 8+8*16 {
		return mismatch("map type GroupSize at +%d reads %d, want 136", o.MapTypeGroupSize, gs)
	}
	// The goroutine id: this goroutine's g holds what runtime.Stack prints.
	if g := getg(); g == nil || *(*uint64)(unsafe.Add(g, o.GoID)) != GoID() {
		return mismatch("runtime.g.goid at +%d does not hold the goroutine id", o.GoID)
	}
	// Key types and sizes: uint64 is 8 bytes, [3]int64 24.
	for _, c := range []struct {
		mt   unsafe.Pointer
		size uintptr
	}{{mt, 8}, {TypeOf(map[[3]int64]bool(nil)), 24}} {
		kt := *(*unsafe.Pointer)(unsafe.Add(c.mt, o.MapTypeKey))
		if kt == nil || *(*uintptr)(unsafe.Add(kt, o.TypeSize)) != c.size {
			return mismatch("map key type size is not %d", c.size)
		}
	}
	// Seeds are random per map: two maps of one type (almost surely)
	// differ, and a map's seed does not change while it is written.
	seedSmall := *(*uint64)(unsafe.Add(mapHeader(small), o.MapSeed))
	seedLarge := *(*uint64)(unsafe.Add(h, o.MapSeed))
	if seedSmall == seedLarge || seedSmall == 0 {
		return mismatch("map seeds at +%d read %#x and %#x", o.MapSeed, seedSmall, seedLarge)
	}
	large[n] = n
	if *(*uint64)(unsafe.Add(h, o.MapSeed)) != seedLarge {
		return mismatch("map seed at +%d changed on a write", o.MapSeed)
	}
	delete(large, n)
	delete(large, 0)
	if used := *(*uint64)(unsafe.Add(h, o.MapUsed)); used != n-1 {
		return mismatch("map used after delete = %d, want %d", used, n-1)
	}
	runtime.KeepAlive(small)
	runtime.KeepAlive(large)
	return nil
}

// MapCapacity returns the slots of the map whose header is at h: 8 for a
// small map, else the sum of its tables' capacities. h must be a live map
// that no other goroutine is writing.
func MapCapacity(h uintptr, o *Offsets) uint64 {
	p := *(*unsafe.Pointer)(unsafe.Pointer(&h))
	dirLen := *(*int64)(unsafe.Add(p, o.MapDirLen))
	if dirLen <= 0 {
		return 8
	}
	dir := *(*unsafe.Pointer)(unsafe.Add(p, o.MapDirPtr))
	depth := *(*uint8)(unsafe.Add(p, o.MapGlobalDepth))
	var capacity uint64
	for i := int64(0); i < dirLen; {
		t := *(*unsafe.Pointer)(unsafe.Add(dir, 8*i))
		capacity += uint64(*(*uint16)(unsafe.Add(t, o.TableCapacity)))
		i += 1 << (depth - *(*uint8)(unsafe.Add(t, o.TableLocalDepth)))
	}
	return capacity
}

// MapBytes estimates the bytes a map of the type at typ holds for capacity
// slots: its groups (8 slots and 8 control bytes each). typ must be a live
// map type.
func MapBytes(typ uintptr, capacity uint64, o *Offsets) uint64 {
	p := *(*unsafe.Pointer)(unsafe.Pointer(&typ))
	groupSize := *(*uintptr)(unsafe.Add(p, o.MapTypeGroupSize))
	return capacity / 8 * uint64(groupSize)
}

// GoID returns the calling goroutine's id, as the runtime prints it. It is
// slow (it formats a stack header) and meant for start-up and tests.
func GoID() uint64 {
	var buf [64]byte
	b := buf[:runtime.Stack(buf[:], false)]
	b = bytes.TrimPrefix(b, []byte("goroutine "))
	if i := bytes.IndexByte(b, ' '); i > 0 {
		b = b[:i]
	}
	id, err := strconv.ParseUint(string(b), 10, 64)
	if err != nil {
		return 0
	}
	return id
}

// TypeString names the runtime type at typ, e.g. "map[string]int". typ must
// be a live *abi.Type; callers only pass pointers the BPF program has read
// back as map types.
func TypeString(typ uintptr) string {
	var v any
	(*eface)(unsafe.Pointer(&v)).typ = *(*unsafe.Pointer)(unsafe.Pointer(&typ))
	return reflect.TypeOf(v).String()
}

// MapElem returns the element type of the map type at typ, 0 if its
// elements are not maps. typ must be a live map type.
func MapElem(typ uintptr) uintptr {
	var v any
	(*eface)(unsafe.Pointer(&v)).typ = *(*unsafe.Pointer)(unsafe.Pointer(&typ))
	e := reflect.TypeOf(v).Elem()
	if e.Kind() != reflect.Map {
		return 0
	}
	return uintptr(TypeOf(reflect.Zero(e).Interface()))
}
