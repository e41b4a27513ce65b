package rt

import (
	"fmt"
	"runtime"
	"strconv"
	"strings"
	"unsafe"
)

// Oldest is the oldest Go release line mapguard supports (swiss maps and
// runtime.g.goid where Load expects them); Newest the newest one it was
// checked against. A newer release is tried: its layouts are derived and
// verified like any other's, and the site finders refuse any function whose
// shape they do not recognise.
const (
	Oldest = 25
	Newest = 27
)

// tabled are the offsets that cannot be derived from values this process
// can make: the swiss map header and table, internal/abi.Type and the map
// type's key. They have not changed from Go 1.24 to 1.27 and are verified
// against maps built at Load (verify).
var tabled = Offsets{
	MapUsed:        0,
	MapSeed:        8,
	MapDirPtr:      16,
	MapDirLen:      24,
	MapGlobalDepth: 32,
	MapGlobalShift: 33,
	TypeKind:       23,
	// table{used, capacity uint16; growthLeft uint16; localDepth uint8; ...}
	TableCapacity:   2,
	TableLocalDepth: 6,
	// MapType{Type (48 bytes); Key, Elem, Group *Type; ...}
	MapTypeKey: 48,
	TypeSize:   0,
}

// NewerThanChecked reports whether the running Go release is newer than
// Newest (or a development version): its layouts are derived and verified
// like any other's, but nobody has read its sources for mapguard yet.
func NewerThanChecked() bool {
	minor, ok := goMinor(runtime.Version())
	return !ok || minor > Newest
}

// goMinor returns the minor version of a Go release string ("go1.27.3" ->
// 27); ok is false for a development or unparsable version.
func goMinor(v string) (int, bool) {
	rest, ok := strings.CutPrefix(v, "go1.")
	if !ok {
		return 0, false
	}
	if i := strings.IndexAny(rest, ".rcbeta -"); i >= 0 {
		rest = rest[:i]
	}
	n, err := strconv.Atoi(rest)
	return n, err == nil
}

// derive fills in the offsets read from values this process makes: the
// goroutine id's offset in runtime.g and the map type's GroupSize.
func derive(o *Offsets) error {
	var err error
	if o.GoID, err = deriveGoID(); err != nil {
		return err
	}
	o.MapTypeGroupSize, err = deriveGroupSize()
	return err
}

// gScan is how much of runtime.g deriveGoID reads: goid has been at 152 or
// 160 since Go 1.21, and g is far larger than this.
const gScan = 256

// deriveGoID finds the offset of runtime.g.goid: the one 8-byte word of
// the current goroutine's g that holds its id (as runtime.Stack prints it)
// in each of three goroutines.
func deriveGoID() (uint64, error) {
	var cands []uint64
	for round := 0; round < 3; round++ {
		found := make(chan []uint64, 1)
		go func() {
			id, g := GoID(), getg()
			var offs []uint64
			if g != nil && id != 0 {
				for off := uintptr(0); off < gScan; off += 8 {
					if *(*uint64)(unsafe.Add(g, off)) == id {
						offs = append(offs, uint64(off))
					}
				}
			}
			found <- offs
		}()
		offs := <-found
		if round == 0 {
			cands = offs
			continue
		}
		cands = intersect(cands, offs)
	}
	if len(cands) != 1 {
		return 0, fmt.Errorf("%s: runtime.g.goid: %d candidate offsets %v: %w", runtime.Version(), len(cands), cands, ErrMismatch)
	}
	return cands[0], nil
}

func intersect(a, b []uint64) []uint64 {
	var out []uint64
	for _, x := range a {
		for _, y := range b {
			if x == y {
				out = append(out, x)
			}
		}
	}
	return out
}

// deriveGroupSize finds the offset of internal/abi.MapType.GroupSize: the
// one word after the Type header and its four pointers (Key, Elem, Group,
// Hasher) that holds each test type's group size. The sizes hold with keys
// and elems interleaved and with GOEXPERIMENT=mapsplitgroup: 8 control
// bytes and 8 keys and elems of the same size.
func deriveGroupSize() (uint64, error) {
	types := []struct {
		typ  unsafe.Pointer
		size uintptr
	}{
		{TypeOf(map[uint64]uint64(nil)), 8 + 8*16},
		{TypeOf(map[[2]uint64][2]uint64(nil)), 8 + 8*32},
		{TypeOf(map[uint8]uint8(nil)), 8 + 8*2},
	}
	var cands []uint64
	for off := uintptr(48 + 4*8); off < 48+4*8+8*8; off += 8 {
		ok := true
		for _, t := range types {
			ok = ok && *(*uintptr)(unsafe.Add(t.typ, off)) == t.size
		}
		if ok {
			cands = append(cands, uint64(off))
		}
	}
	if len(cands) != 1 {
		return 0, fmt.Errorf("%s: internal/abi.MapType.GroupSize: %d candidate offsets %v: %w", runtime.Version(), len(cands), cands, ErrMismatch)
	}
	return cands[0], nil
}
