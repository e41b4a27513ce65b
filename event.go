package mapguard

import (
	"time"
	"unsafe"

	"github.com/mapguard/mapguard/decode"
)

// Kind is what an event reports; String gives its stable name.
type Kind uint8

// The kinds of map misuse mapguard reports.
const (
	// NilMapWrite: an assignment to a nil map. The runtime panics right
	// after; the panic may be recovered (net/http does so per request), and
	// the event arrives either way.
	NilMapWrite Kind = Kind(decode.NilMapWrite)
	// NilMapRead: a read from a nil map, which silently returns the zero
	// value. Often an idiom (a nil map reads as empty), so by default it is
	// a statistic (Stats.CallSites), not an event; listed in
	// Options.Detect, the first plain read at a call site is an event and
	// later ones arrive about once a second as one event whose Count is
	// the number since. A comma-ok read (v, ok := m[k]) of a nil map is
	// never an event.
	NilMapRead = Kind(decode.NilMapRead)
	// MapGrowth: a map crossed Options.GrowthThreshold entries, or doubled
	// again after that; Site is the insert that grew it and Len its entries.
	// Maps never shrink, so this is how an unbounded cache shows.
	MapGrowth = Kind(decode.MapGrowth)
	// MissingKeyRead: a single-value read (v := m[k]) of a key that is not
	// in a non-nil map, which silently returns the zero value. Usually an
	// idiom (zero means absent), so by default it is a statistic
	// (Stats.CallSites), not an event; listed in Options.Detect, the first
	// read at a call site is an event and later ones there arrive about
	// once a second as one event whose Count is the number since. Comma-ok
	// reads are not counted, nor reads outside Options.MissingKeyScope.
	MissingKeyRead = Kind(decode.MissingKeyRead)
	// UnhashableKey: the "hash of unhashable type" panic, an interface key
	// holding a slice, map or func. Detail is the runtime's message.
	UnhashableKey = Kind(decode.UnhashableKey)
	// MapBloat: a map of at least GrowthThreshold slots was emptied (its
	// last entry deleted, or clear(m)) and keeps its memory, since maps
	// never shrink. Capacity and Bytes say what it holds; copy the live
	// entries into a new map, or drop it, to give the memory back.
	MapBloat = Kind(decode.MapBloat)
	// ConcurrentMisuse: the runtime's fatal "concurrent map writes" (or read
	// and write, iteration and write, clone and write). The process dies
	// right after, so this event is rarely delivered live; a crash record
	// keeps it, and the next Start reports it as PreviousCrash.
	ConcurrentMisuse = Kind(decode.ConcurrentMisuse)
	// PreviousCrash: a ConcurrentMisuse that killed an earlier process of
	// this program (PID), delivered once by the next Guard to start.
	PreviousCrash = Kind(decode.PreviousCrash)

	// Deep kinds probe every operation of a kind, so they are opt-in (list
	// them in Options.Detect) and kept within Options.Budget.

	// MissingKeyDelete: delete(m, k) of a key that is not there; the delete
	// did nothing. A delete of a present key is never reported.
	MissingKeyDelete = Kind(decode.MissingKeyDelete)
	// NilMapDelete: delete on a nil map, a silent no-op.
	NilMapDelete = Kind(decode.NilMapDelete)
	// SharedWriters: one map written by two goroutines within
	// Options.SharedWindow; Peer is the first. The precursor of "concurrent
	// map writes" — or a map correctly guarded by a mutex, which is a false
	// positive: list its type or site in Options.SharedExclude.
	SharedWriters = Kind(decode.SharedWriters)

	// NestedMapMiss: m[a][b] where m[a] was missing or held a nil map (or
	// m was nil), so the inner read is of a nil map: the silent zero value
	// of a two-level lookup, a classic bug (the code meant to create m[a]
	// first, or to check it). Site is the expression, MapType the inner
	// map's type, Peer the outer read. A default kind. Start finds such
	// expressions in the program's code and probes each inner read's CALL
	// (emulated, and taken only where the expression runs); elsewhere the
	// runtime's miss and nil-map sites see it (the kernel pairs a miss with
	// the same goroutine's nil-map read a few instructions later, or the
	// caller's code shows the nested read), and the Guard checks that the
	// outer map's elements are maps of the inner type. The first
	// occurrence at a call site is an event; later ones arrive about once
	// a second as one event whose Count is the number since.
	NestedMapMiss = Kind(decode.NestedMapMiss)
)

// String returns the kind's stable name, e.g. "nil-map-write".
func (k Kind) String() string { return decode.Kind(k).String() }

// Valid reports whether k is a kind this version knows.
func (k Kind) Valid() bool { return decode.Kind(k).Valid() }

// Kinds returns every kind this version knows, in order.
func Kinds() []Kind {
	var ks []Kind
	for _, k := range decode.Kinds() {
		ks = append(ks, Kind(k))
	}
	return ks
}

// Event is one detected misuse: what, when, where (Site is the user's
// file:line), on which goroutine and on which map.
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

// Frame is one resolved stack frame.
type Frame struct {
	Function string  // package-qualified function name, e.g. "main.handler"
	File     string  // absolute source path as recorded by the compiler
	Line     int     // 1-based; 0 if unknown
	PC       uintptr // return PC in this process
}

// Peer is the other goroutine of a SharedWriters or ConcurrentMisuse event.
type Peer struct {
	Goroutine uint64
	Site      Frame // the first frame of its map call outside the map code
}

// String returns "file:line (function)".
func (f Frame) String() string { return decode.Frame(f).String() }

// String returns a one-line human description of the event.
func (e Event) String() string {
	d := e.toDecode()
	return d.String()
}

// toDecode is eventOf's inverse, for Fake.
func (e Event) toDecode() decode.Event {
	d := decode.Event{
		Kind:      decode.Kind(e.Kind),
		Time:      e.Time,
		Goroutine: e.Goroutine,
		Site:      decode.Frame(e.Site),
		Stack:     unsafe.Slice((*decode.Frame)(unsafe.Pointer(unsafe.SliceData(e.Stack))), len(e.Stack)),
		MapType:   e.MapType,
		Map:       e.Map,
		Len:       e.Len,
		Count:     e.Count,
		Probe:     e.Probe,
		Detail:    e.Detail,
		Capacity:  e.Capacity,
		Bytes:     e.Bytes,
		PID:       e.PID,
		KeyHash:   e.KeyHash,
		KeyLen:    e.KeyLen,
		Key:       e.Key,
		Sampled:   e.Sampled,
	}
	if e.Peer != nil {
		d.Peer = &decode.Peer{Goroutine: e.Peer.Goroutine, Site: decode.Frame(e.Peer.Site)}
	}
	return d
}

// eventOf copies a probe's event into the Guard's. Stack is shared, not
// copied: Frame and decode.Frame have one layout (frameLayout checks it).
func eventOf(ev *decode.Event) Event {
	e := Event{
		Kind:      Kind(ev.Kind),
		Time:      ev.Time,
		Goroutine: ev.Goroutine,
		Site:      Frame(ev.Site),
		Stack:     framesOf(ev.Stack),
		MapType:   ev.MapType,
		Map:       ev.Map,
		Len:       ev.Len,
		Count:     ev.Count,
		Probe:     ev.Probe,
		Detail:    ev.Detail,
		Capacity:  ev.Capacity,
		Bytes:     ev.Bytes,
		PID:       ev.PID,
		KeyHash:   ev.KeyHash,
		KeyLen:    ev.KeyLen,
		Key:       ev.Key,
		Sampled:   ev.Sampled,
	}
	if ev.Peer != nil {
		e.Peer = &Peer{Goroutine: ev.Peer.Goroutine, Site: Frame(ev.Peer.Site)}
	}
	return e
}

// frameLayout fails to compile if Frame and decode.Frame ever differ.
var _ = Frame(decode.Frame{})

func framesOf(s []decode.Frame) []Frame {
	if len(s) == 0 {
		return nil
	}
	return unsafe.Slice((*Frame)(unsafe.Pointer(unsafe.SliceData(s))), len(s))
}
