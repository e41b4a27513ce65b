package uprobe

import (
	"fmt"
	"slices"
	"time"

	"github.com/go-logr/logr"

	"github.com/mapguard/mapguard/decode"
	"github.com/mapguard/mapguard/internal/wire"
	"github.com/mapguard/mapguard/internal/x86site"
	"github.com/mapguard/mapguard/probe"
)

// Config configures New. The zero value is valid.
type Config struct {
	// Kinds to watch; nil means DefaultKinds.
	Kinds []decode.Kind
	// Statistics lists kinds of Kinds (decode.IsStatistic) that are only
	// counted per call site (Stats.CallSites), without events.
	Statistics []decode.Kind
	// StackDepth is how many frames each event's Stack holds (0: the call
	// site only). At most decode.MaxFrames.
	StackDepth int
	// BufferSize is how many events the kernel ring buffer holds between two
	// drains (every 100 ms). Default 1024.
	BufferSize int
	// GrowthThreshold is the entry count at which MapGrowth first reports a
	// map, then at each doubling. Default 1<<20.
	GrowthThreshold int
	// MissingKeyScope lists the packages (import path prefixes) whose
	// missing-key reads are reported; empty means the main module's packages.
	// Libraries, and the standard library always, read missing keys on
	// purpose.
	MissingKeyScope []string
	// NoCrashRecord turns off the crash record pinned under BPFFS, with
	// which a ConcurrentMisuse that kills the process is reported as
	// PreviousCrash at the next Start.
	NoCrashRecord bool
	// OpStats counts map operations per call site and kind (deep watching,
	// see Budget); read them with OpStats.
	OpStats bool
	// Budget is the share of one CPU that every probe site together may
	// cost, averaged over time (see governor.go). Default 0.01 (1%).
	Budget float64
	// SharedWindow is how close two writes by different goroutines must be
	// to report SharedWriters. Default 100 ms.
	SharedWindow time.Duration
	// SharedExclude drops SharedWriters events whose map type equals an
	// entry, or whose site's function starts with one.
	SharedExclude []string
	// CaptureKeys, if set, lets the first 16 bytes of a deleted key leave
	// the kernel, through this function only: its result is Event.Key.
	// Nil (the default) keeps key bytes in the kernel; events carry a
	// salted hash and the length.
	CaptureKeys func(prefix []byte) string
	// Logger receives errors, V(1) warnings, V(4) lifecycle and V(8) events.
	Logger logr.Logger
}

// DefaultKinds are the kinds whose probes sit only on paths that run when
// something is wrong, or rarely (a read that misses, a table of a large map
// growing, a map emptied), so a healthy operation that finds its key pays
// nothing. Every site lives under the budget (see governor.go).
func DefaultKinds() []decode.Kind {
	return []decode.Kind{
		decode.NilMapWrite, decode.NilMapRead, decode.MapGrowth, decode.MissingKeyRead,
		decode.UnhashableKey, decode.MapBloat, decode.ConcurrentMisuse, decode.NestedMapMiss,
	}
}

// New returns a Probe that attaches eBPF uprobes to this process. It
// does no work until Start; on platforms other than linux/amd64 Start
// returns ErrNotSupported.
func New(cfg Config) probe.Probe { return newUprobes(cfg) }

func (c Config) kinds() []decode.Kind {
	if len(c.Kinds) == 0 {
		return DefaultKinds()
	}
	return c.Kinds
}

// deep reports whether deep sites are wanted: a deep kind, or operation
// statistics.
func (c Config) deep() bool {
	return c.OpStats || slices.ContainsFunc(c.kinds(), decode.IsDeep)
}

func (c Config) bufferSize() int {
	if c.BufferSize <= 0 {
		return 1024
	}
	return c.BufferSize
}

func (c Config) growthThreshold() uint64 {
	if c.GrowthThreshold <= 0 {
		return 1 << 20
	}
	return uint64(c.GrowthThreshold)
}

func (c Config) budget() float64 {
	if c.Budget <= 0 {
		return 0.01
	}
	return min(c.Budget, 1)
}

func (c Config) sharedWindow() time.Duration {
	if c.SharedWindow <= 0 {
		return 100 * time.Millisecond
	}
	return c.SharedWindow
}

// ringSize is the ring buffer size in bytes for n events: a power of two of
// at least one page.
func ringSize(n int) uint32 {
	size := uint32(4096)
	for int(size) < n*wire.RecordSize && size < 1<<30 {
		size <<= 1
	}
	return size
}

const (
	maxSites = 256 // MG_MAX_SITES

	// site_conf.flags: enum mg_site_flag in bpf/src/mapguard.h, which is
	// their one source (consts_linux.go does not compile if one differs).
	siteFramed  = 1
	siteNilOnly = 2
	siteGrowth  = 4
	siteNonNil  = 8
	siteAgg     = 16
	siteStr     = 32
	siteErr     = 64
	siteCrash   = 128
	siteBloat   = 256
	siteCount   = 512
	siteWriter  = 1024
	siteDelNil  = 2048
	siteDelIn   = 4096
	siteDelDone = 8192
	siteUnwrap  = 32768
	siteWrapped = 65536
	siteCaller  = 131072
	sitePrinted = 262144

	// enum mg_key
	keyNone = 0
	keyU32  = 1
	keyU64  = 2
	keyStr  = 3
	keyPtr  = 4

	// enum mg_reg: where a site finds the map and its type.
	regAX    = 0
	regBX    = 1
	regCX    = 2
	regNone  = 3
	regHome0 = 4 // the probed function's first register argument's spill slot, [BP+16]
	regHome1 = 5 // its second's, [BP+24]
	regDX    = 6
	regSI    = 7
	regDI    = 8

	// aggNested marks the aggregates of nested-map misses (MG_AGG_NESTED).
	aggNested = 0x80000000

	// calibIndex is the site index of the cost calibration's probe.
	calibIndex = maxSites - 1

	pollInterval = 100 * time.Millisecond
	// planInterval is the longest the reader's ticks go without running
	// the whole governor (see planDueLocked).
	planInterval = 3 * pollInterval
	// aggInterval is how often aggregated counts are reported.
	aggInterval   = time.Second
	canaryTimeout = 3 * time.Second
)

// found is one probe site in a function and how the BPF program reads it.
type found struct {
	at             x86site.Site
	flags          uint32
	mapReg, typReg uint8
	// wrapRet are the return addresses of the calls by wrappers, for
	// siteUnwrap (see findWrappers).
	wrapRet [2]uint64
}

// target lists runtime functions probed for one kind and how the probe
// sites are found in each.
type target struct {
	find  func(code []byte, entry uint64, callee func(uint64) string) ([]found, error)
	funcs []string
	// record: only for the crash record (not probed with NoCrashRecord).
	record bool
}

// siteFinder chooses the probe site in one function's code.
type siteFinder func(code []byte, entry uint64, callee func(uint64) string) (x86site.Site, error)

// one is a target with one site per function.
func one(f siteFinder, flags uint32, mapReg, typReg uint8) func([]byte, uint64, func(uint64) string) ([]found, error) {
	return func(code []byte, entry uint64, callee func(uint64) string) ([]found, error) {
		at, err := f(code, entry, callee)
		if err != nil {
			return nil, err
		}
		return []found{{at: at, flags: flags, mapReg: mapReg, typReg: typReg}}, nil
	}
}

func nilBranch(op x86site.MapOp) siteFinder {
	return func(code []byte, entry uint64, callee func(uint64) string) (x86site.Site, error) {
		return x86site.NilMapSite(code, entry, op, callee)
	}
}

func afterStackCheck(code []byte, _ uint64, _ func(uint64) string) (x86site.Site, error) {
	return x86site.EntrySite(code)
}

// printed finds where runtime.fatal's call of printlock returns.
func printed(code []byte, entry uint64, callee func(uint64) string) (x86site.Site, error) {
	return x86site.ReturnSite(code, entry, callee, "runtime.printlock")
}

// calls finds every direct call to fn, each a site.
func calls(fn string, flags uint32, mapReg, typReg uint8) func([]byte, uint64, func(uint64) string) ([]found, error) {
	return func(code []byte, entry uint64, callee func(uint64) string) ([]found, error) {
		sites, err := x86site.CallSites(code, entry, callee, fn)
		if err != nil {
			return nil, err
		}
		if len(sites) == 0 {
			return nil, fmt.Errorf("no call to %s", fn)
		}
		fs := make([]found, len(sites))
		for i, at := range sites {
			fs[i] = found{at: at, flags: flags, mapReg: mapReg, typReg: typReg}
		}
		return fs, nil
	}
}

// missBlocks finds every block of a mapaccess1 function (or of the
// mapaccess2 it wraps) that returns the zero value. The nil-or-empty block is reported only for an empty map (a
// nil one is NilMapRead); the map and its type are only known there.
func missBlocks(code []byte, entry uint64, callee func(uint64) string) ([]found, error) {
	nilAt, err := x86site.NilMapSite(code, entry, x86site.MapAccess, callee)
	if err != nil {
		return nil, err
	}
	_, sites, err := x86site.MissSites(code, entry, callee)
	if err != nil {
		return nil, err
	}
	fs := make([]found, len(sites))
	for i, at := range sites {
		if at.Offset == nilAt.Offset {
			fs[i] = found{at: at, flags: siteAgg | siteNonNil, mapReg: regBX, typReg: regAX}
		} else {
			fs[i] = found{at: at, flags: siteAgg, mapReg: regNone, typReg: regNone}
		}
	}
	return fs, nil
}

// deepFunc is a runtime map entry point that deep watching probes after its
// stack check (an emulated PUSHQ BP): the type is in AX, the map in BX and
// the key from CX.
type deepFunc struct {
	name string
	op   probe.Op
	key  uint8 // deletes: enum mg_key
}

var deepFuncs = []deepFunc{
	{"runtime.mapaccess1", probe.OpRead, 0},
	{"runtime.mapaccess2", probe.OpRead, 0},
	{"runtime.mapaccess1_fast32", probe.OpRead, 0},
	{"runtime.mapaccess2_fast32", probe.OpRead, 0},
	{"runtime.mapaccess1_fast64", probe.OpRead, 0},
	{"runtime.mapaccess2_fast64", probe.OpRead, 0},
	{"runtime.mapaccess1_faststr", probe.OpRead, 0},
	{"runtime.mapaccess2_faststr", probe.OpRead, 0},
	{"runtime.mapassign", probe.OpWrite, 0},
	{"runtime.mapassign_fast32", probe.OpWrite, 0},
	{"runtime.mapassign_fast32ptr", probe.OpWrite, 0},
	{"runtime.mapassign_fast64", probe.OpWrite, 0},
	{"runtime.mapassign_fast64ptr", probe.OpWrite, 0},
	{"runtime.mapassign_faststr", probe.OpWrite, 0},
	{"runtime.mapdelete", probe.OpDelete, keyPtr},
	{"runtime.mapdelete_fast32", probe.OpDelete, keyU32},
	{"runtime.mapdelete_fast64", probe.OpDelete, keyU64},
	{"runtime.mapdelete_faststr", probe.OpDelete, keyStr},
	{"runtime.mapIterStart", probe.OpIterate, 0},
}

// deleteDoneFunc is where a delete's outcome is checked: the JNE guarding
// (*Map).Delete's call of rand (if m.used == 0).
const (
	deleteDoneFunc = "internal/runtime/maps.(*Map).Delete"
	deleteDoneCall = "internal/runtime/maps.rand"
)

// The start-up canary is a nil-map write through the generic
// runtime.mapassign, whose site is attached whatever kinds are watched.
const (
	canaryKind = decode.NilMapWrite
	canaryFunc = "runtime.mapassign"
)

var targets = map[decode.Kind][]target{
	decode.NilMapWrite: {{
		find: one(nilBranch(x86site.MapAssign), 0, regBX, regAX),
		funcs: []string{
			"runtime.mapassign",
			"runtime.mapassign_fast32",
			"runtime.mapassign_fast32ptr",
			"runtime.mapassign_fast64",
			"runtime.mapassign_fast64ptr",
			"runtime.mapassign_faststr",
		},
	}},
	decode.NilMapRead: {{
		find: one(nilBranch(x86site.MapAccess), siteNilOnly|siteAgg, regBX, regAX),
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
	}},
	// A table of a large map grows or splits O(log n) times over the map's
	// life; the probe sits on the emulated PUSHQ BP after the stack check.
	// (*table).grow(typ, m, capacity) and split(typ, m) take the table in AX.
	decode.MapGrowth: {{
		find: one(afterStackCheck, siteGrowth, regCX, regBX),
		funcs: []string{
			"internal/runtime/maps.(*table).grow",
			"internal/runtime/maps.(*table).split",
		},
	}},
	// Only the single-value reads: mapaccess2 is the comma-ok form. Where
	// mapaccess1 only wraps mapaccess2 (Go 1.27), the sites are in
	// mapaccess2 and report only its calls by the wrapper (findWrappers).
	decode.MissingKeyRead: {{
		find: missBlocks,
		funcs: []string{
			"runtime.mapaccess1",
			"runtime.mapaccess1_fast32",
			"runtime.mapaccess1_fast64",
			"runtime.mapaccess1_faststr",
		},
	}},
	// The hash functions of interface keys panic with "hash of unhashable
	// type T"; the probe sits on their CALL runtime.gopanic (emulated), with
	// the boxed message in AX, BX.
	decode.UnhashableKey: {{
		find: calls("runtime.gopanic", siteErr, regNone, regNone),
		funcs: []string{
			"runtime.interhash",
			"runtime.nilinterhash",
			"runtime.typehash",
		},
	}},
	// (*Map).Delete(typ, key) calls rand for a new seed when the delete
	// removed the last entry; clear(m) is runtime.mapclear(typ, m).
	decode.MapBloat: {{
		find:  calls("internal/runtime/maps.rand", siteBloat, regHome0, regHome1),
		funcs: []string{"internal/runtime/maps.(*Map).Delete"},
	}, {
		find:  one(afterStackCheck, siteBloat, regBX, regAX),
		funcs: []string{"runtime.mapclear"},
	}},
	// Every "concurrent map ..." report goes through maps.fatal(s string).
	// Two goroutines can race into it; the runtime prints the report of
	// the first to take its print lock, in runtime.fatal, and the crash
	// record keeps that one's (the site where printlock returns, single-
	// stepped, in a function that runs once before the process dies).
	decode.ConcurrentMisuse: {{
		find:  one(afterStackCheck, siteStr|siteCrash, regNone, regNone),
		funcs: []string{"internal/runtime/maps.fatal"},
	}, {
		find:   one(printed, sitePrinted, regNone, regNone),
		funcs:  []string{"runtime.fatal"},
		record: true,
	}},
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
