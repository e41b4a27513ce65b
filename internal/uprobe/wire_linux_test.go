//go:build linux && amd64

package uprobe

import (
	"testing"
	"unsafe"

	"github.com/mapguard/mapguard/decode"
	"github.com/mapguard/mapguard/internal/wire"
)

// The record layout internal/wire decodes and the kind numbers of decode must match the BPF
// program's, as bpf2go generated them from its BTF.
func TestWireMatchesBPF(t *testing.T) {
	if got := unsafe.Sizeof(mapguardEvent{}); got != wire.RecordSize {
		t.Errorf("struct event is %d bytes, wire.RecordSize %d", got, wire.RecordSize)
	}
	if got := len(mapguardEvent{}.Detail); got != wire.DetailLen {
		t.Errorf("struct event holds %d detail bytes, wire.DetailLen %d", got, wire.DetailLen)
	}
	if got := len(mapguardEvent{}.Pcs); got != decode.MaxFrames {
		t.Errorf("struct event holds %d frames, decode.MaxFrames %d", got, decode.MaxFrames)
	}
	var ev mapguardEvent
	layout := wire.Layout()
	bpf := map[string]uintptr{
		"time_ns":    unsafe.Offsetof(ev.TimeNs),
		"goid":       unsafe.Offsetof(ev.Goid),
		"map":        unsafe.Offsetof(ev.Map),
		"typ":        unsafe.Offsetof(ev.Typ),
		"len":        unsafe.Offsetof(ev.Len),
		"count":      unsafe.Offsetof(ev.Count),
		"site":       unsafe.Offsetof(ev.Site),
		"kind":       unsafe.Offsetof(ev.Kind),
		"npcs":       unsafe.Offsetof(ev.Npcs),
		"detail_len": unsafe.Offsetof(ev.DetailLen),
		"cap":        unsafe.Offsetof(ev.Cap),
		"aux":        unsafe.Offsetof(ev.Aux),
		"peer_goid":  unsafe.Offsetof(ev.PeerGoid),
		"peer_pc":    unsafe.Offsetof(ev.PeerPc),
		"key_hash":   unsafe.Offsetof(ev.KeyHash),
		"key_len":    unsafe.Offsetof(ev.KeyLen),
		"pcs":        unsafe.Offsetof(ev.Pcs),
		"detail":     unsafe.Offsetof(ev.Detail),
	}
	if len(bpf) != len(layout) {
		t.Errorf("struct event has %d fields here, wire.Layout %d", len(bpf), len(layout))
	}
	for name, off := range bpf {
		if got, ok := layout[name]; !ok || got != off {
			t.Errorf("field %s at %d in BPF, wire reads it at %d (known: %v)", name, off, got, ok)
		}
	}
	for c, k := range map[mapguardMgKind]decode.Kind{
		mapguardMgKindMG_KIND_NIL_MAP_WRITE:      decode.NilMapWrite,
		mapguardMgKindMG_KIND_NIL_MAP_READ:       decode.NilMapRead,
		mapguardMgKindMG_KIND_MAP_GROWTH:         decode.MapGrowth,
		mapguardMgKindMG_KIND_MISSING_KEY_READ:   decode.MissingKeyRead,
		mapguardMgKindMG_KIND_UNHASHABLE_KEY:     decode.UnhashableKey,
		mapguardMgKindMG_KIND_MAP_BLOAT:          decode.MapBloat,
		mapguardMgKindMG_KIND_CONCURRENT_MISUSE:  decode.ConcurrentMisuse,
		mapguardMgKindMG_KIND_PREVIOUS_CRASH:     decode.PreviousCrash,
		mapguardMgKindMG_KIND_MISSING_KEY_DELETE: decode.MissingKeyDelete,
		mapguardMgKindMG_KIND_NIL_MAP_DELETE:     decode.NilMapDelete,
		mapguardMgKindMG_KIND_SHARED_WRITERS:     decode.SharedWriters,
		mapguardMgKindMG_KIND_NESTED_MAP_MISS:    decode.NestedMapMiss,
	} {
		if uint32(c) != uint32(k) {
			t.Errorf("BPF kind %d is decode kind %v (%d)", c, k, k)
		}
	}
}
