//go:build linux && amd64

package uprobe

import (
	"testing"
	"unsafe"

	"github.com/mapguard/mapguard/decode"
	"github.com/mapguard/mapguard/internal/wire"
)

// The record layout and kind numbers decode uses must match the BPF
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
	for name, off := range map[string][2]uintptr{
		"time_ns":    {unsafe.Offsetof(ev.TimeNs), 0},
		"goid":       {unsafe.Offsetof(ev.Goid), 8},
		"map":        {unsafe.Offsetof(ev.Map), 16},
		"typ":        {unsafe.Offsetof(ev.Typ), 24},
		"len":        {unsafe.Offsetof(ev.Len), 32},
		"count":      {unsafe.Offsetof(ev.Count), 40},
		"site":       {unsafe.Offsetof(ev.Site), 48},
		"kind":       {unsafe.Offsetof(ev.Kind), 52},
		"npcs":       {unsafe.Offsetof(ev.Npcs), 53},
		"detail_len": {unsafe.Offsetof(ev.DetailLen), 54},
		"cap":        {unsafe.Offsetof(ev.Cap), 56},
		"aux":        {unsafe.Offsetof(ev.Aux), 64},
		"peer_goid":  {unsafe.Offsetof(ev.PeerGoid), 72},
		"peer_pc":    {unsafe.Offsetof(ev.PeerPc), 80},
		"key_hash":   {unsafe.Offsetof(ev.KeyHash), 88},
		"key_len":    {unsafe.Offsetof(ev.KeyLen), 96},
		"pcs":        {unsafe.Offsetof(ev.Pcs), 104},
		"detail":     {unsafe.Offsetof(ev.Detail), 232},
	} {
		if off[0] != off[1] {
			t.Errorf("field %s at %d in BPF, decode reads it at %d", name, off[0], off[1])
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
