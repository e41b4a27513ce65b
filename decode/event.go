package decode

import (
	"fmt"
	"strconv"
	"time"
)

// Kind is what an event reports. Its values are the wire values of the BPF
// program (enum mg_kind in bpf/src/mapguard.h).
type Kind uint8

const (
	// NilMapWrite is an assignment to a nil map. The runtime panics right
	// after the probe fires; the panic may be recovered (net/http does so per
	// request), the event arrives either way.
	NilMapWrite Kind = 1
	// NilMapRead is a read from a nil map, which silently returns the zero
	// value. It is how m[a][b] looks when m[a] is missing.
	NilMapRead Kind = 2
	// MapGrowth is a map that crossed the growth threshold (by default 1<<20
	// entries), and again at each doubling after that: the unbounded cache
	// that leaks memory. Site is the insert that made it grow; Len its
	// entries then.
	MapGrowth Kind = 3
	// MissingKeyRead is a single-value read (v := m[k]) of a key that is not
	// in a non-nil map: the silent zero value. Comma-ok reads are not
	// reported. The first read at a call site is an event with Count 1; later
	// ones at the same call site arrive about once a second as one event
	// whose Count is the number of reads since (Goroutine 0, no Stack).
	MissingKeyRead Kind = 4
	// UnhashableKey is the "hash of unhashable type" panic: an interface key
	// holding a slice, map or func. Detail is the runtime's message.
	UnhashableKey Kind = 5
	// MapBloat is a large map that was emptied but keeps its memory (maps
	// never shrink): reported when a delete removes the last entry, or
	// clear(m) runs, on a map of at least the growth threshold's capacity.
	// Capacity and Bytes say what it still holds.
	MapBloat Kind = 6
	// ConcurrentMisuse is the runtime's fatal "concurrent map writes" (or
	// read and write, iteration and write, clone and write). The process
	// dies right after, so the event is rarely delivered; it is kept in a
	// crash record and comes back as PreviousCrash. Detail is the message.
	ConcurrentMisuse Kind = 7
	// PreviousCrash is a ConcurrentMisuse that killed an earlier process of
	// the same program, delivered at the next Start. PID is that process.
	PreviousCrash Kind = 8
	// MissingKeyDelete is delete(m, k) of a key that is not in m: the
	// delete did nothing. A delete of a present key is never reported.
	// Deep watching (opt-in, under the CPU budget).
	MissingKeyDelete Kind = 9
	// NilMapDelete is delete on a nil map (a no-op). Deep watching.
	NilMapDelete Kind = 10
	// SharedWriters is one map written by two goroutines within a short
	// window: Goroutine and Site are the second writer, Peer the first. It
	// is the precursor of "concurrent map writes", or a map guarded by a
	// mutex (a false positive: exclude it). Deep watching.
	SharedWriters Kind = 11
	// NestedMapMiss is m[a][b] where m[a] was missing or held a nil map:
	// the outer read missed (or read a nil map, or found a nil map) and
	// returned a nil inner map, which the same expression then read. Site is the
	// expression; MapType the inner map's type. The first occurrence at a
	// call site is an event, later ones arrive about once a second as one
	// event whose Count is the number since.
	NestedMapMiss Kind = 12

	maxKind = NestedMapMiss
)

var kindNames = [...]string{
	NilMapWrite:      "nil-map-write",
	NilMapRead:       "nil-map-read",
	MapGrowth:        "map-growth",
	MissingKeyRead:   "missing-key-read",
	UnhashableKey:    "unhashable-key",
	MapBloat:         "map-bloat",
	ConcurrentMisuse: "concurrent-misuse",
	PreviousCrash:    "previous-crash",
	MissingKeyDelete: "missing-key-delete",
	NilMapDelete:     "nil-map-delete",
	SharedWriters:    "shared-writers",
	NestedMapMiss:    "nested-map-miss",
}

// Kinds returns every kind this version knows, in order.
func Kinds() []Kind {
	ks := make([]Kind, 0, maxKind)
	for k := Kind(1); k <= maxKind; k++ {
		ks = append(ks, k)
	}
	return ks
}

// String returns the kind's stable name, e.g. "nil-map-write".
func (k Kind) String() string {
	if k >= 1 && k <= maxKind {
		return kindNames[k]
	}
	return "kind(" + strconv.Itoa(int(k)) + ")"
}

// Valid reports whether k is a kind this version knows.
func (k Kind) Valid() bool { return k >= 1 && k <= maxKind }

// MaxFrames is the most frames an event's Stack holds.
const MaxFrames = 16

// Frame is one resolved stack frame.
type Frame struct {
	Function string  // package-qualified function name, e.g. "main.handler"
	File     string  // absolute source path as recorded by the compiler
	Line     int     // 1-based; 0 if unknown
	PC       uintptr // return PC in this process
}

// String returns "file:line (function)".
func (f Frame) String() string {
	if f.File == "" {
		return fmt.Sprintf("%#x", f.PC)
	}
	return f.File + ":" + strconv.Itoa(f.Line) + " (" + f.Function + ")"
}

// Event is one detected map misuse.
type Event struct {
	Kind Kind
	// Time is when the probe fired, as wall-clock time.
	Time time.Time
	// Goroutine is the id of the goroutine that performed the operation.
	Goroutine uint64
	// Site is the first frame outside the runtime's map code: the user's line.
	Site Frame
	// Stack holds up to Options.StackDepth frames starting at Site; nil when
	// StackDepth is 0. The slice is shared between events: do not modify it.
	Stack []Frame
	// MapType is the map's static type, e.g. "map[string]map[int]bool", or ""
	// if it could not be resolved.
	MapType string
	// Map identifies the map (its header address); 0 for a nil map. An
	// address can be reused after the map is garbage collected.
	Map uintptr
	// Len is the number of entries in the map when the probe fired.
	Len int
	// Count is how many occurrences this event stands for: 1 unless the
	// kind is aggregated.
	Count uint64
	// Probe is the runtime function the probe fired in, e.g.
	// "runtime.mapassign_faststr".
	Probe string
	// Detail is the runtime's message for UnhashableKey, ConcurrentMisuse
	// and PreviousCrash (at most 64 bytes of it), else "".
	Detail string
	// Capacity (slots) and Bytes (estimated memory of its groups) of the
	// map, for MapBloat; else 0.
	Capacity uint64
	Bytes    uint64
	// PID is the process that crashed, for PreviousCrash; else 0.
	PID int
	// Peer is the other goroutine of a SharedWriters event, or of a
	// ConcurrentMisuse or PreviousCrash when writers were being tracked
	// (SharedWriters watched); else nil.
	Peer *Peer
	// KeyHash (salted per Guard, so comparable only within one) and KeyLen
	// identify the key of a delete event without its bytes. Key is set only
	// with Options.CaptureKeys: the redaction function's output for the
	// key's first 16 bytes.
	KeyHash uint64
	KeyLen  int
	Key     string
	// Sampled is set while the budget governor samples the event's probe
	// site (attached for short windows, over the budget): the event is
	// real, and a Count is an estimate, scaled by the time the site was
	// attached.
	Sampled bool
}

// Peer is the other party of a SharedWriters or ConcurrentMisuse event.
type Peer struct {
	Goroutine uint64
	Site      Frame // the first frame of its map call outside the map code
}

// String returns a one-line human description of the event.
func (e Event) String() string {
	typ := e.MapType
	if typ == "" {
		typ = "map"
	}
	s := fmt.Sprintf("%s at %s in goroutine %d: %s len=%d", e.Kind, e.Site, e.Goroutine, typ, e.Len)
	if e.Count > 1 {
		s += " count=" + strconv.FormatUint(e.Count, 10)
	}
	if e.Capacity > 0 {
		s += fmt.Sprintf(" capacity=%d bytes=%d", e.Capacity, e.Bytes)
	}
	if e.Peer != nil {
		s += fmt.Sprintf(" (other goroutine %d at %s)", e.Peer.Goroutine, e.Peer.Site)
	}
	if e.KeyLen > 0 {
		s += fmt.Sprintf(" key=%016x/%dB", e.KeyHash, e.KeyLen)
	}
	if e.Key != "" {
		s += " " + strconv.Quote(e.Key)
	}
	if e.PID != 0 {
		s += " pid=" + strconv.Itoa(e.PID)
	}
	if e.Detail != "" {
		s += ": " + strconv.Quote(e.Detail)
	}
	return s
}

// IsStatistic reports whether kind is an idiom as often as a bug, and is
// therefore counted per call site by default rather than delivered as
// events: a read of a missing key, a read of a nil map.
func IsStatistic(kind Kind) bool {
	return kind == MissingKeyRead || kind == NilMapRead
}

// IsDeep reports whether kind is watched by probing every operation of a
// kind (opt-in, under the budget): missing-key and nil-map deletes, shared
// writers. A switch, not a map: the probe's reader calls it per event, and
// a map read that misses would hit mapguard's own probes.
func IsDeep(kind Kind) bool {
	switch kind {
	case MissingKeyDelete, NilMapDelete, SharedWriters:
		return true
	}
	return false
}
