package probe

import (
	"time"

	"github.com/go-logr/logr"

	"github.com/mapguard/mapguard/decode"
	"github.com/mapguard/mapguard/symbols"
)

// UprobeConfig configures NewUprobes. The zero value is valid.
type UprobeConfig struct {
	// Kinds to watch; nil means DefaultKinds.
	Kinds []decode.Kind
	// StackDepth is how many frames each event's Stack holds (0: the call
	// site only). At most decode.MaxFrames.
	StackDepth int
	// BufferSize is how many events the kernel ring buffer holds between two
	// drains (every 100 ms). Default 1024.
	BufferSize int
	// SiteRateLimit is how many hits per second one probe site may take
	// before it is detached for a back-off (5 s, doubling to 5 min). Default
	// 200; a site on an instruction the kernel emulates, which costs several
	// times less, may take 20 times as many. Either way one site stays under
	// about 0.5% of one CPU here (200 hits of at most 23 us, or 4000 of about
	// 1 us). Negative disables the limit.
	SiteRateLimit int
	// GrowthThreshold is the entry count at which MapGrowth first reports a
	// map, then at each doubling. Default 1<<20.
	GrowthThreshold int
	// Logger receives errors, V(1) warnings, V(4) lifecycle and V(8) events.
	Logger logr.Logger
}

// DefaultKinds are the kinds whose probes sit only on paths that run when
// something is wrong, or rarely (a table of a large map growing), so a
// healthy map operation pays nothing.
func DefaultKinds() []decode.Kind {
	return []decode.Kind{decode.NilMapWrite, decode.NilMapRead, decode.MapGrowth}
}

// NewUprobes returns a Probe that attaches eBPF uprobes to this process. It
// does no work until Start; on platforms other than linux/amd64 Start
// returns ErrNotSupported.
func NewUprobes(cfg UprobeConfig) Probe { return newUprobes(cfg) }

func (c UprobeConfig) kinds() []decode.Kind {
	if len(c.Kinds) == 0 {
		return DefaultKinds()
	}
	return c.Kinds
}

func (c UprobeConfig) bufferSize() int {
	if c.BufferSize <= 0 {
		return 1024
	}
	return c.BufferSize
}

func (c UprobeConfig) growthThreshold() uint64 {
	if c.GrowthThreshold <= 0 {
		return 1 << 20
	}
	return uint64(c.GrowthThreshold)
}

func (c UprobeConfig) siteRateLimit() int {
	if c.SiteRateLimit == 0 {
		return 200
	}
	return c.SiteRateLimit
}

// ringSize is the ring buffer size in bytes for n events: a power of two of
// at least one page.
func ringSize(n int) uint32 {
	size := uint32(4096)
	for int(size) < n*decode.RecordSize && size < 1<<30 {
		size <<= 1
	}
	return size
}

const (
	maxSites    = 256 // MG_MAX_SITES
	siteFramed  = 1   // MG_SITE_FRAMED
	siteNilOnly = 2   // MG_SITE_NIL_ONLY
	siteGrowth  = 4   // MG_SITE_GROWTH

	// enum mg_reg: argument registers.
	regAX        = 0
	regBX        = 1
	regCX        = 2
	pollInterval = 100 * time.Millisecond

	// emulatedRateFactor scales the rate limit of sites on emulated
	// instructions: ~1 us a hit against 6-23 us single-stepped, measured on
	// the project's VMs.
	emulatedRateFactor = 20
	canaryTimeout      = 3 * time.Second
)

// target lists the runtime functions probed for one kind, how the probe
// site is found in each, and which argument registers hold the map and its
// type there.
type target struct {
	site           siteFinder
	flags          uint8
	mapReg, typReg uint8
	funcs          []string
}

// siteFinder chooses the probe site in one function's code.
type siteFinder func(code []byte, entry uint64, callee func(uint64) string) (symbols.Site, error)

func nilBranch(op symbols.MapOp) siteFinder {
	return func(code []byte, entry uint64, callee func(uint64) string) (symbols.Site, error) {
		return symbols.NilMapSite(code, entry, op, callee)
	}
}

func afterStackCheck(code []byte, _ uint64, _ func(uint64) string) (symbols.Site, error) {
	return symbols.EntrySite(code)
}

// The start-up canary is a nil-map write through the generic
// runtime.mapassign, whose site is attached whatever kinds are watched.
const (
	canaryKind = decode.NilMapWrite
	canaryFunc = "runtime.mapassign"
)

var targets = map[decode.Kind]target{
	decode.NilMapWrite: {
		site:   nilBranch(symbols.MapAssign),
		mapReg: regBX, typReg: regAX,
		funcs: []string{
			"runtime.mapassign",
			"runtime.mapassign_fast32",
			"runtime.mapassign_fast32ptr",
			"runtime.mapassign_fast64",
			"runtime.mapassign_fast64ptr",
			"runtime.mapassign_faststr",
		},
	},
	decode.NilMapRead: {
		site:   nilBranch(symbols.MapAccess),
		flags:  siteNilOnly,
		mapReg: regBX, typReg: regAX,
		funcs: []string{
			"runtime.mapaccess1",
			"runtime.mapaccess2",
			"runtime.mapaccess1_fast32",
			"runtime.mapaccess2_fast32",
			"runtime.mapaccess1_fast64",
			"runtime.mapaccess2_fast64",
			"runtime.mapaccess1_faststr",
			"runtime.mapaccess2_faststr",
		},
	},
	// A table of a large map grows or splits O(log n) times over the map's
	// life; the probe sits on the emulated PUSHQ BP after the stack check.
	// (*table).grow(typ, m, capacity) and split(typ, m) take the table in AX.
	decode.MapGrowth: {
		site:   afterStackCheck,
		flags:  siteGrowth,
		mapReg: regCX, typReg: regBX,
		funcs: []string{
			"internal/runtime/maps.(*table).grow",
			"internal/runtime/maps.(*table).split",
		},
	},
}

// canaryKey is 16 bytes, so its maps use the generic runtime.mapassign,
// which every program using mapguard therefore contains.
type canaryKey struct{ a, b uint64 }

//go:noinline
func canaryWrite() {
	defer func() { _ = recover() }()
	var m map[canaryKey]uint8
	m[canaryKey{1, 2}] = 1
}
