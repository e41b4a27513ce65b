//go:build go1.25 && !go1.27

package rt

// Go 1.25 and 1.26 share these offsets (checked against DWARF of binaries
// built by each toolchain): runtime.g.goid moved from 160 to 152 in 1.25;
// the swiss map header has been stable since 1.24.
var known = &Offsets{
	GoID:           152,
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
	// MapType{Type (48 bytes); Key, Elem, Group *Type; Hasher func; GroupSize, SlotSize uintptr; ...}
	MapTypeGroupSize: 80,
	MapTypeSlotSize:  88,
	MapTypeKey:       48,
	TypeSize:         0,
}
