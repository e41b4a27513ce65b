package rt

// Offsets are the byte offsets into runtime structures that the BPF program
// reads. Load derives some from the running process and tables the rest
// (layout.go), then verifies them all.
type Offsets struct {
	// GoID is the offset of runtime.g.goid (derived).
	GoID uint64
	// MapUsed is the offset of internal/runtime/maps.Map.used (the entry count).
	MapUsed uint64
	// MapSeed is the offset of internal/runtime/maps.Map.seed, random per
	// map: with the address, a map's identity.
	MapSeed uint64
	// MapDirPtr, MapDirLen, MapGlobalDepth and MapGlobalShift are the
	// directory's fields: Verify checks them to tell a swiss map header
	// from anything else, and the BPF program reads them to walk a map's
	// tables (its capacity, for MapBloat).
	MapDirPtr, MapDirLen, MapGlobalDepth, MapGlobalShift uint64
	// TypeKind is the offset of internal/abi.Type.Kind_.
	TypeKind uint64
	// TableCapacity and TableLocalDepth are the offsets of
	// internal/runtime/maps.table.capacity (uint16) and .localDepth (uint8),
	// for a map's capacity: the sum over its directory's distinct tables.
	TableCapacity, TableLocalDepth uint64
	// MapTypeGroupSize is the offset of GroupSize in the map type
	// (internal/abi.MapType; SwissMapType in 1.25), derived: 80 in 1.25-1.27.
	MapTypeGroupSize uint64
	// MapTypeKey is the offset of the key type (*Type) in the map type, and
	// TypeSize that of internal/abi.Type.Size_.
	MapTypeKey, TypeSize uint64
}

// KindMask and KindMap decode internal/abi.Type.Kind_.
const (
	KindMask = 0x1f
	KindMap  = 21
)
