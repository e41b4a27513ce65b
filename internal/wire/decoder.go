package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"runtime"
	"strings"
	"time"

	"github.com/mapguard/mapguard/decode"
)

// Wire layout of struct event in bpf/src/mapguard.h. internal/uprobe's
// TestWireMatchesBPF checks it against the declaration bpf2go generates.
const (
	MaxFrames  = decode.MaxFrames
	DetailLen  = 64
	RecordSize = 104 + 8*decode.MaxFrames + DetailLen

	offTime      = 0
	offGoid      = 8
	offMap       = 16
	offTyp       = 24
	offLen       = 32
	offCount     = 40
	offSite      = 48
	offKind      = 52
	offNPCs      = 53
	offDetailLen = 54
	offCap       = 56
	offAux       = 64
	offPeerGoid  = 72
	offPeerPC    = 80
	offKeyHash   = 88
	offKeyLen    = 96
	offPCs       = 104
	offDetail    = 104 + 8*decode.MaxFrames
)

// Layout returns the offset at which the decoder reads each field of
// struct event, by the field's C name, for the test that compares it with
// the layout bpf2go generated from the program (internal/uprobe).
func Layout() map[string]uintptr {
	return map[string]uintptr{
		"time_ns": offTime, "goid": offGoid, "map": offMap, "typ": offTyp, "len": offLen,
		"count": offCount, "site": offSite, "kind": offKind, "npcs": offNPCs,
		"detail_len": offDetailLen, "cap": offCap, "aux": offAux, "peer_goid": offPeerGoid,
		"peer_pc": offPeerPC, "key_hash": offKeyHash, "key_len": offKeyLen, "pcs": offPCs,
		"detail": offDetail,
	}
}

// ErrRecord is returned for a record that is malformed.
var ErrRecord = errors.New("malformed record")

// ErrRuntimeOwned is returned for a record whose map belongs to the Go
// runtime or to reflect: the first caller outside the map code is runtime
// or reflect code (for example runtime.resolveTypeOff reads a nil module
// type map on every call, by design, and reflect.DeepEqual keeps a visited
// map of its own). It is not user misuse and is not reported.
var ErrRuntimeOwned = errors.New("map operation by the Go runtime")

// ErrStdlib is returned for a nil-map read whose site is in the Go standard
// library, when Config.Scope is set: the library reads nil maps on purpose
// (a nil map reads as empty; net/http does it on every request). Decode has
// filled in the event.
var ErrStdlib = errors.New("nil-map read in the standard library")

// ErrOutOfScope is returned for a MissingKeyRead whose site is outside
// Config.MissScope. Decode has filled in the event.
var ErrOutOfScope = errors.New("missing-key read outside the watched packages")

// Clock converts the BPF clock (CLOCK_MONOTONIC nanoseconds) to wall time.
// Take both readings at the same moment (internal/uprobe's newClock).
type Clock struct {
	Wall time.Time
	Mono int64 // CLOCK_MONOTONIC at Wall, in nanoseconds
}

// Time converts a CLOCK_MONOTONIC reading to wall time.
func (c Clock) Time(mono uint64) time.Time {
	return c.Wall.Add(time.Duration(int64(mono) - c.Mono))
}

// Config configures a Decoder. The zero value is valid.
type Config struct {
	// StackDepth is how many frames Event.Stack holds, from the site
	// outwards; 0 leaves Stack nil. At most MaxFrames.
	StackDepth int
	// Clock converts record times; the zero Clock yields times relative to
	// the zero time.Time.
	Clock Clock
	// Probes names the probed function of each site index.
	Probes []string
	// TypeName names a runtime map type pointer. It is only called with
	// pointers the BPF program has checked to be map types. Nil leaves
	// Event.MapType empty.
	TypeName func(typ uintptr) string
	// Scope, if set, makes Decode return ErrStdlib for nil-map and
	// missing-key reads whose site is not the program's own.
	Scope *Scope
	// MissScope, if set, makes Decode return ErrOutOfScope for missing-key
	// reads whose site it does not own.
	MissScope *Scope
	// CallSiteType, if set, returns the map type a call site passes to the
	// runtime (0 if unknown), for records whose probe could not read the
	// type. It must return only pointers checked to be map types.
	CallSiteType func(pc uintptr) uintptr
	// Redact, if set, turns a captured key prefix into Event.Key; without
	// it captured key bytes are dropped.
	Redact func(prefix []byte) string
	// MapBytes, if set, estimates the bytes a map of type typ holds for
	// capacity slots.
	MapBytes func(typ uintptr, capacity uint64) uint64
}

// cacheLimit bounds each cache; a full cache is cleared, not grown.
const cacheLimit = 4096

// Decoder decodes records. It is not safe for concurrent use.
type Decoder struct {
	cfg    Config
	frames map[uintptr][]decode.Frame                   // return PC -> frames, inlined ones expanded
	stacks map[[decode.MaxFrames]uintptr][]decode.Frame // PCs -> Stack
	types  map[uintptr]string
	// callTypes caches CallSiteType by return PC.
	callTypes map[uintptr]uintptr
	pcs       [decode.MaxFrames]uintptr
	rec       Rec // Decode's parse, reused
}

// NewDecoder returns a Decoder for cfg.
func NewDecoder(cfg Config) *Decoder {
	if cfg.StackDepth < 0 {
		cfg.StackDepth = 0
	}
	if cfg.StackDepth > decode.MaxFrames {
		cfg.StackDepth = decode.MaxFrames
	}
	return &Decoder{
		cfg:    cfg,
		frames: make(map[uintptr][]decode.Frame),
		stacks: make(map[[decode.MaxFrames]uintptr][]decode.Frame),
		types:  make(map[uintptr]string),

		callTypes: make(map[uintptr]uintptr),
	}
}

// Header is the part of a record needed to route it before decoding.
type Header struct {
	Site uint32
	Kind decode.Kind
	Goid uint64
	Typ  uintptr
	PC   uintptr // the call site: the kernel's, else the first return PC; 0 if none
}

// Rec is one record's fields. Parse fills one from the wire (a ring
// buffer's record, a crash record's event); records made in user space
// (aggregated counts, operation statistics) are built as a Rec directly,
// and a crash record of another process is adjusted as one (Rebase,
// Strip): nothing is encoded only to be decoded again.
type Rec struct {
	Mono     uint64 // CLOCK_MONOTONIC ns
	Goid     uint64
	Map      uintptr
	Typ      uintptr
	Len      uint64
	Count    uint64
	Site     uint32
	Kind     decode.Kind
	NPCs     int
	Cap      uint64
	Aux      uintptr // the call site, where the kernel keys aggregates by it
	PeerGoid uint64
	PeerPC   uintptr
	KeyHash  uint64
	KeyLen   uint32
	PCs      [MaxFrames]uintptr
	Detail   []byte // aliases the parsed record
}

// Parse reads raw into r. A record of the wrong size, an unknown kind or
// too many frames is an error wrapping ErrRecord.
func Parse(raw []byte, r *Rec) error {
	if len(raw) < RecordSize {
		return fmt.Errorf("record of %d bytes, want %d: %w", len(raw), RecordSize, ErrRecord)
	}
	le := binary.NativeEndian
	kind := decode.Kind(raw[offKind])
	if !kind.Valid() {
		return fmt.Errorf("unknown kind %d: %w", raw[offKind], ErrRecord)
	}
	npcs := int(raw[offNPCs])
	if npcs > MaxFrames {
		return fmt.Errorf("%d frames, at most %d: %w", npcs, MaxFrames, ErrRecord)
	}
	*r = Rec{
		Mono:     le.Uint64(raw[offTime:]),
		Goid:     le.Uint64(raw[offGoid:]),
		Map:      uintptr(le.Uint64(raw[offMap:])),
		Typ:      uintptr(le.Uint64(raw[offTyp:])),
		Len:      le.Uint64(raw[offLen:]),
		Count:    le.Uint64(raw[offCount:]),
		Site:     le.Uint32(raw[offSite:]),
		Kind:     kind,
		NPCs:     npcs,
		Cap:      le.Uint64(raw[offCap:]),
		Aux:      uintptr(le.Uint64(raw[offAux:])),
		PeerGoid: le.Uint64(raw[offPeerGoid:]),
		PeerPC:   uintptr(le.Uint64(raw[offPeerPC:])),
		KeyHash:  le.Uint64(raw[offKeyHash:]),
		KeyLen:   le.Uint32(raw[offKeyLen:]),
	}
	for i := 0; i < npcs; i++ {
		r.PCs[i] = uintptr(le.Uint64(raw[offPCs+8*i:]))
	}
	if n := int(raw[offDetailLen]); n > 0 {
		r.Detail = raw[offDetail : offDetail+min(n, DetailLen)]
	}
	return nil
}

// Rebase moves r's PCs and type by delta and clears its map address, for
// a record written by another process of the same binary loaded at
// another address.
func (r *Rec) Rebase(delta int64) {
	move := func(p uintptr) uintptr {
		if p == 0 {
			return 0
		}
		return uintptr(int64(p) + delta)
	}
	for i := 0; i < r.NPCs; i++ {
		r.PCs[i] = uintptr(int64(r.PCs[i]) + delta)
	}
	r.Typ, r.PeerPC, r.Aux = move(r.Typ), move(r.PeerPC), move(r.Aux)
	r.Map = 0
}

// Strip removes r's PCs, type and map, for a record whose addresses mean
// nothing in this process.
func (r *Rec) Strip() {
	r.NPCs = 0
	r.Typ, r.PeerPC, r.Aux, r.Map = 0, 0, 0, 0
}

// Peek returns a record's header without decoding the rest.
func Peek(raw []byte) (Header, error) {
	if len(raw) < RecordSize {
		return Header{}, fmt.Errorf("record of %d bytes, want %d: %w", len(raw), RecordSize, ErrRecord)
	}
	le := binary.NativeEndian
	h := Header{
		Site: le.Uint32(raw[offSite:]),
		Kind: decode.Kind(raw[offKind]),
		Goid: le.Uint64(raw[offGoid:]),
		Typ:  uintptr(le.Uint64(raw[offTyp:])),
	}
	if raw[offNPCs] > 0 {
		h.PC = uintptr(le.Uint64(raw[offPCs:]))
	}
	if site := le.Uint64(raw[offAux:]); site != 0 {
		h.PC = uintptr(site) // the call site, as the kernel's aggregates key it
	}
	return h, nil
}

// Decode decodes raw into ev, overwriting every field.
func (d *Decoder) Decode(raw []byte, ev *decode.Event) error {
	if err := Parse(raw, &d.rec); err != nil {
		return err
	}
	return d.DecodeRec(&d.rec, ev)
}

// SetProbes replaces Config.Probes (sites added after the decoder was
// made). Like Decode, it must not be called concurrently with the
// decoder's other methods.
func (d *Decoder) SetProbes(probes []string) { d.cfg.Probes = probes }

// DecodeRec decodes r into ev, overwriting every field: the call site and
// stack from its PCs, the map type, and whether the program owns it (a
// record of the runtime's own maps is ErrRuntimeOwned, of the standard
// library's idioms ErrStdlib, of a miss outside the scope ErrOutOfScope;
// ev is filled in either way, but for the map type and size of those).
func (d *Decoder) DecodeRec(r *Rec, ev *decode.Event) error {
	probe := ""
	if int(r.Site) < len(d.cfg.Probes) {
		probe = d.cfg.Probes[r.Site]
	}
	d.pcs = [decode.MaxFrames]uintptr{}
	npcs := min(r.NPCs, decode.MaxFrames)
	copy(d.pcs[:], r.PCs[:npcs])
	kind := r.Kind
	typ := r.Typ
	*ev = decode.Event{
		Kind:      kind,
		Time:      d.cfg.Clock.Time(r.Mono),
		Goroutine: r.Goid,
		Map:       r.Map,
		Len:       int(min(r.Len, math.MaxInt64)),
		Count:     r.Count,
		Capacity:  r.Cap,
		Probe:     probe,
	}
	if len(r.Detail) > 0 {
		switch kind {
		case decode.MissingKeyDelete, decode.NilMapDelete:
			// A captured key prefix: only the redaction function sees it.
			if d.cfg.Redact != nil {
				ev.Key = d.cfg.Redact(r.Detail)
			}
		default:
			ev.Detail = string(r.Detail)
		}
	}
	ev.KeyHash = r.KeyHash
	ev.KeyLen = int(r.KeyLen)
	if r.PeerGoid != 0 {
		ev.Peer = &decode.Peer{Goroutine: r.PeerGoid}
		if r.PeerPC != 0 {
			ev.Peer.Site = d.siteOf(r.PeerPC)
		}
	}
	var owned bool
	var sitePC uintptr
	ev.Site, ev.Stack, sitePC, owned = d.symbolize(npcs)
	if owned {
		return ErrRuntimeOwned
	}
	// Whose read it is comes first: a record that is dropped for it needs
	// no map type, and finding it from the caller's code decodes the whole
	// calling function (the first time for each call site: on a loaded
	// net/http service, a quarter of the reader's CPU went to the standard
	// library's call sites, whose records were then dropped).
	if (kind == decode.NilMapRead || kind == decode.MissingKeyRead || kind == decode.NestedMapMiss) && d.cfg.Scope != nil && !d.cfg.Scope.Own(ev.Site.Function) {
		return ErrStdlib
	}
	if kind == decode.MissingKeyRead && d.cfg.MissScope != nil && !d.cfg.MissScope.Own(ev.Site.Function) {
		return ErrOutOfScope
	}
	if typ == 0 && d.cfg.CallSiteType != nil && sitePC != 0 {
		typ = d.callSiteType(sitePC)
	}
	ev.MapType = d.typeName(typ)
	if ev.Capacity > 0 && typ != 0 && d.cfg.MapBytes != nil {
		ev.Bytes = d.cfg.MapBytes(typ, ev.Capacity)
	}
	return nil
}

func (d *Decoder) callSiteType(pc uintptr) uintptr {
	if typ, ok := d.callTypes[pc]; ok {
		return typ
	}
	if len(d.callTypes) >= cacheLimit {
		clear(d.callTypes)
	}
	typ := d.cfg.CallSiteType(pc)
	d.callTypes[pc] = typ
	return typ
}

func (d *Decoder) typeName(typ uintptr) string {
	if typ == 0 || d.cfg.TypeName == nil {
		return ""
	}
	if name, ok := d.types[typ]; ok {
		return name
	}
	if len(d.types) >= cacheLimit {
		clear(d.types)
	}
	name := d.cfg.TypeName(typ)
	d.types[typ] = name
	return name
}

// symbolize finds the user's frame among d.pcs[:n] and, if asked, the stack
// from there. pc is the return PC holding the site, for CallSiteType when
// the site is not inlined into its caller (0 otherwise). owned reports that
// the caller is the runtime itself.
func (d *Decoder) symbolize(n int) (site decode.Frame, stack []decode.Frame, pc uintptr, owned bool) {
	first := -1 // index into pcs of the PC holding the site
	for i := 0; i < n && first < 0; i++ {
		fs := d.pcFrames(d.pcs[i])
		for j, f := range fs {
			if isMapCode(f.Function) {
				continue
			}
			if isRuntime(f.Function) {
				return f, nil, 0, true
			}
			site, first = f, i
			if j == 0 {
				// The call instruction itself is in site's function.
				pc = d.pcs[i]
			}
			break
		}
	}
	if first < 0 {
		// Every frame is map code (or unknown): report the outermost.
		if n > 0 {
			fs := d.pcFrames(d.pcs[n-1])
			site = fs[len(fs)-1]
		}
		return site, nil, 0, false
	}
	if d.cfg.StackDepth == 0 {
		return site, nil, pc, false
	}

	var key [decode.MaxFrames]uintptr
	copy(key[:], d.pcs[first:n])
	if st, ok := d.stacks[key]; ok {
		return site, st, pc, false
	}
	st := make([]decode.Frame, 0, d.cfg.StackDepth)
	seen := false
	for i := first; i < n && len(st) < d.cfg.StackDepth; i++ {
		for _, f := range d.pcFrames(d.pcs[i]) {
			if !seen {
				// Skip the runtime frames inlined before the site.
				if f != site {
					continue
				}
				seen = true
			}
			if len(st) == d.cfg.StackDepth {
				break
			}
			st = append(st, f)
		}
	}
	if len(d.stacks) >= cacheLimit {
		clear(d.stacks)
	}
	d.stacks[key] = st
	return site, st, pc, false
}

// SiteOf returns the call site of the map call that returns to pc: its
// first frame outside the map code.
func (d *Decoder) SiteOf(pc uintptr) decode.Frame { return d.siteOf(pc) }

// siteOf returns the first frame of pc outside the map code.
func (d *Decoder) siteOf(pc uintptr) decode.Frame {
	fs := d.pcFrames(pc)
	for _, f := range fs {
		if !isMapCode(f.Function) {
			return f
		}
	}
	return fs[len(fs)-1]
}

// pcFrames returns the frames of one return PC, innermost first; never empty.
func (d *Decoder) pcFrames(pc uintptr) []decode.Frame {
	if fs, ok := d.frames[pc]; ok {
		return fs
	}
	var fs []decode.Frame
	frames := runtime.CallersFrames([]uintptr{pc})
	for {
		f, more := frames.Next()
		if f.Function != "" || f.File != "" {
			fs = append(fs, decode.Frame{Function: f.Function, File: f.File, Line: f.Line, PC: pc})
		}
		if !more {
			break
		}
	}
	if len(fs) == 0 {
		fs = []decode.Frame{{PC: pc}}
	}
	if len(d.frames) >= cacheLimit {
		clear(d.frames)
	}
	d.frames[pc] = fs
	return fs
}

// isMapCode reports whether a frame belongs to the code between a map's
// user and the probed runtime function: the runtime's map functions and
// their wrappers (mapaccess1_fat, ...), reflect's map operations (the
// operation is its caller's: v.MapIndex(k) is the user's read) and the
// standard maps package (maps.Copy(dst, src) writes its caller's map).
func isMapCode(fn string) bool {
	return strings.HasPrefix(fn, "runtime.map") ||
		fn == "runtime.interhash" || fn == "runtime.nilinterhash" || fn == "runtime.typehash" ||
		strings.HasPrefix(fn, "internal/runtime/maps.") ||
		isReflectMapAPI(fn) ||
		strings.HasPrefix(fn, "maps.")
}

// isReflectMapAPI reports whether fn is one of reflect's map operations on
// a map its caller passes: the runtime's helpers linked into reflect
// (reflect.mapaccess, reflect.mapassign0, reflect.mapiterinit, ...) and the
// Value and MapIter methods that call them. Every other reflect function
// that reaches a map function works on a map of reflect's own (DeepEqual's
// visited set, the runtime's reflectOffs table behind reflect.addReflectOff).
func isReflectMapAPI(fn string) bool {
	if !strings.HasPrefix(fn, "reflect.") {
		return false
	}
	fn = fn[len("reflect."):]
	if strings.HasPrefix(fn, "map") { // the runtime's linknamed helpers
		return true
	}
	switch fn {
	case "Value.MapIndex", "Value.SetMapIndex", "Value.MapKeys", "Value.MapRange", "Value.Clear",
		"Value.SetIterKey", "Value.SetIterValue", "copyVal":
		return true
	}
	return strings.HasPrefix(fn, "(*MapIter).")
}

// isRuntime reports whether fn is Go runtime code other than map code, or
// reflect code working on a map of its own: the map is not the program's.
func isRuntime(fn string) bool {
	return strings.HasPrefix(fn, "runtime.") || strings.HasPrefix(fn, "internal/") ||
		strings.HasPrefix(fn, "reflect.")
}
