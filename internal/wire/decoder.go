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

// Record builds a wire record: what the BPF program writes, for records
// made in user space (aggregated counts, crash records, tests). pcs beyond
// MaxFrames and detail beyond DetailLen are cut.
func Record(raw []byte, kind decode.Kind, site uint32, goid uint64, mono uint64, count uint64, pcs []uintptr, detail string) []byte {
	if cap(raw) < RecordSize {
		raw = make([]byte, RecordSize)
	}
	raw = raw[:RecordSize]
	clear(raw)
	le := binary.NativeEndian
	le.PutUint64(raw[offTime:], mono)
	le.PutUint64(raw[offGoid:], goid)
	le.PutUint64(raw[offCount:], count)
	le.PutUint32(raw[offSite:], site)
	raw[offKind] = byte(kind)
	n := min(len(pcs), decode.MaxFrames)
	raw[offNPCs] = byte(n)
	for i := 0; i < n; i++ {
		le.PutUint64(raw[offPCs+8*i:], uint64(pcs[i]))
	}
	raw[offDetailLen] = byte(copy(raw[offDetail:offDetail+DetailLen], detail))
	return raw
}

// SetKind overwrites a record's kind.
func SetKind(raw []byte, kind decode.Kind) { raw[offKind] = byte(kind) }

// Rebase moves a record's PCs and type by delta and clears its map
// address, for a record written by another process of the same binary
// loaded at another address.
func Rebase(raw []byte, delta int64) {
	le := binary.NativeEndian
	for i := 0; i < int(min(raw[offNPCs], decode.MaxFrames)); i++ {
		p := raw[offPCs+8*i:]
		le.PutUint64(p, uint64(int64(le.Uint64(p))+delta))
	}
	for _, off := range []int{offTyp, offPeerPC, offAux} {
		if v := le.Uint64(raw[off:]); v != 0 {
			le.PutUint64(raw[off:], uint64(int64(v)+delta))
		}
	}
	le.PutUint64(raw[offMap:], 0)
}

// Strip removes a record's PCs and type, for a record whose addresses mean
// nothing in this process.
func Strip(raw []byte) {
	raw[offNPCs] = 0
	binary.NativeEndian.PutUint64(raw[offTyp:], 0)
	binary.NativeEndian.PutUint64(raw[offPeerPC:], 0)
	binary.NativeEndian.PutUint64(raw[offAux:], 0)
	binary.NativeEndian.PutUint64(raw[offMap:], 0)
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
	if len(raw) < RecordSize {
		return fmt.Errorf("record of %d bytes, want %d: %w", len(raw), RecordSize, ErrRecord)
	}
	le := binary.NativeEndian
	kind := decode.Kind(raw[offKind])
	if !kind.Valid() {
		return fmt.Errorf("unknown kind %d: %w", raw[offKind], ErrRecord)
	}
	npcs := int(raw[offNPCs])
	if npcs > decode.MaxFrames {
		return fmt.Errorf("%d frames, at most %d: %w", npcs, decode.MaxFrames, ErrRecord)
	}
	site := le.Uint32(raw[offSite:])
	probe := ""
	if int(site) < len(d.cfg.Probes) {
		probe = d.cfg.Probes[site]
	}

	d.pcs = [decode.MaxFrames]uintptr{}
	for i := 0; i < npcs; i++ {
		d.pcs[i] = uintptr(le.Uint64(raw[offPCs+8*i:]))
	}

	typ := uintptr(le.Uint64(raw[offTyp:]))
	*ev = decode.Event{
		Kind:      kind,
		Time:      d.cfg.Clock.Time(le.Uint64(raw[offTime:])),
		Goroutine: le.Uint64(raw[offGoid:]),
		Map:       uintptr(le.Uint64(raw[offMap:])),
		Len:       int(min(le.Uint64(raw[offLen:]), math.MaxInt64)),
		Count:     le.Uint64(raw[offCount:]),
		Capacity:  le.Uint64(raw[offCap:]),
		Probe:     probe,
	}
	if n := int(raw[offDetailLen]); n > 0 {
		b := raw[offDetail : offDetail+min(n, DetailLen)]
		switch kind {
		case decode.MissingKeyDelete, decode.NilMapDelete:
			// A captured key prefix: only the redaction function sees it.
			if d.cfg.Redact != nil {
				ev.Key = d.cfg.Redact(b)
			}
		default:
			ev.Detail = string(b)
		}
	}
	ev.KeyHash = le.Uint64(raw[offKeyHash:])
	ev.KeyLen = int(le.Uint32(raw[offKeyLen:]))
	if pg := le.Uint64(raw[offPeerGoid:]); pg != 0 {
		ev.Peer = &decode.Peer{Goroutine: pg}
		if pc := uintptr(le.Uint64(raw[offPeerPC:])); pc != 0 {
			ev.Peer.Site = d.siteOf(pc)
		}
	}
	var owned bool
	var sitePC uintptr
	ev.Site, ev.Stack, sitePC, owned = d.symbolize(npcs)
	if owned {
		return ErrRuntimeOwned
	}
	if typ == 0 && d.cfg.CallSiteType != nil && sitePC != 0 {
		typ = d.callSiteType(sitePC)
	}
	ev.MapType = d.typeName(typ)
	if ev.Capacity > 0 && typ != 0 && d.cfg.MapBytes != nil {
		ev.Bytes = d.cfg.MapBytes(typ, ev.Capacity)
	}
	if (kind == decode.NilMapRead || kind == decode.MissingKeyRead || kind == decode.NestedMapMiss) && d.cfg.Scope != nil && !d.cfg.Scope.Own(ev.Site.Function) {
		return ErrStdlib
	}
	if kind == decode.MissingKeyRead && d.cfg.MissScope != nil && !d.cfg.MissScope.Own(ev.Site.Function) {
		return ErrOutOfScope
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
