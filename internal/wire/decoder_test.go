package wire

import (
	"encoding/binary"
	"errors"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/mapguard/mapguard/decode"
)

// record builds a wire record as the BPF program would.
func record(kind decode.Kind, site uint32, goid uint64, mono uint64, typ uintptr, pcs ...uintptr) []byte {
	b := make([]byte, RecordSize)
	le := binary.NativeEndian
	le.PutUint64(b[offTime:], mono)
	le.PutUint64(b[offGoid:], goid)
	le.PutUint64(b[offTyp:], uint64(typ))
	le.PutUint64(b[offLen:], 7)
	le.PutUint64(b[offCount:], 1)
	le.PutUint32(b[offSite:], site)
	b[offKind] = byte(kind)
	b[offNPCs] = byte(len(pcs))
	for i, pc := range pcs {
		le.PutUint64(b[offPCs+8*i:], uint64(pc))
	}
	return b
}

// callerPCs returns return PCs as a probe inside a runtime function would
// see them: the first is a PC inside the runtime (runtime.Callers itself),
// then this package's callers.
//
//go:noinline
func callerPCs() []uintptr {
	pcs := make([]uintptr, 8)
	n := runtime.Callers(0, pcs)
	return pcs[:n]
}

//go:noinline
func userSite() ([]uintptr, int) {
	_, _, line, _ := runtime.Caller(0)
	return callerPCs(), line + 1
}

func TestDecodeSite(t *testing.T) {
	pcs, line := userSite()
	wall := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	d := NewDecoder(Config{
		StackDepth: 2,
		Clock:      Clock{Wall: wall, Mono: 1000},
		Probes:     []string{"runtime.mapassign_faststr"},
		TypeName:   func(uintptr) string { return "map[string]int" },
	})
	var ev decode.Event
	// The first PC is inside runtime.Callers, which is not map code: such a
	// record belongs to the runtime.
	if err := d.Decode(record(decode.NilMapWrite, 0, 42, 1500, 0x1234, pcs...), &ev); !errors.Is(err, ErrRuntimeOwned) {
		t.Fatalf("runtime caller: err = %v, want ErrRuntimeOwned", err)
	}
	if err := d.Decode(record(decode.NilMapWrite, 0, 42, 1500, 0x1234, pcs[1:]...), &ev); err != nil {
		t.Fatal(err)
	}
	if ev.Kind != decode.NilMapWrite || ev.Goroutine != 42 || ev.Len != 7 || ev.Count != 1 {
		t.Fatalf("event %+v", ev)
	}
	if !ev.Time.Equal(wall.Add(500)) {
		t.Errorf("time %v, want %v", ev.Time, wall.Add(500))
	}
	if !strings.HasSuffix(ev.Site.Function, ".callerPCs") {
		t.Errorf("site %v, want callerPCs", ev.Site)
	}
	if len(ev.Stack) != 2 || ev.Stack[0] != ev.Site || !strings.HasSuffix(ev.Stack[1].Function, ".userSite") || ev.Stack[1].Line != line {
		t.Errorf("stack %v, want callerPCs then userSite line %d", ev.Stack, line)
	}
	if ev.MapType != "map[string]int" || ev.Probe != "runtime.mapassign_faststr" {
		t.Errorf("type %q probe %q", ev.MapType, ev.Probe)
	}
	if s := ev.String(); !strings.Contains(s, "nil-map-write at ") || !strings.Contains(s, "goroutine 42") {
		t.Errorf("String() = %q", s)
	}
}

func TestDecodeNoTypeName(t *testing.T) {
	d := NewDecoder(Config{})
	var ev decode.Event
	if err := d.Decode(record(decode.NilMapRead, 9, 1, 0, 0x1234), &ev); err != nil {
		t.Fatal(err)
	}
	if ev.MapType != "" || ev.Probe != "" || ev.Stack != nil || ev.Site.PC != 0 {
		t.Fatalf("event %+v", ev)
	}
}

func TestDecodeErrors(t *testing.T) {
	d := NewDecoder(Config{})
	var ev decode.Event
	for name, raw := range map[string][]byte{
		"short":  make([]byte, RecordSize-1),
		"kind0":  record(0, 0, 0, 0, 0),
		"kind99": record(99, 0, 0, 0, 0),
		"frames": func() []byte { b := record(decode.NilMapRead, 0, 0, 0, 0); b[offNPCs] = decode.MaxFrames + 1; return b }(),
	} {
		if err := d.Decode(raw, &ev); !errors.Is(err, ErrRecord) {
			t.Errorf("%s: err = %v, want ErrRecord", name, err)
		}
	}
}

func TestKindString(t *testing.T) {
	for _, k := range decode.Kinds() {
		if !k.Valid() || strings.HasPrefix(k.String(), "kind(") {
			t.Errorf("kind %d has no name", k)
		}
	}
	if decode.NilMapWrite.String() != "nil-map-write" || decode.NilMapRead.String() != "nil-map-read" || decode.MapGrowth.String() != "map-growth" || decode.Kind(200).String() != "kind(200)" {
		t.Error("kind names changed")
	}
}

func BenchmarkDecode(b *testing.B) {
	pcs, _ := userSite()
	for _, depth := range []int{0, 4} {
		b.Run("StackDepth="+string(rune('0'+depth)), func(b *testing.B) {
			d := NewDecoder(Config{StackDepth: depth, TypeName: func(uintptr) string { return "map[string]int" }})
			raw := record(decode.NilMapWrite, 0, 42, 1500, 0x1234, pcs[1:]...)
			var ev decode.Event
			b.ReportAllocs()
			for b.Loop() {
				if err := d.Decode(raw, &ev); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func FuzzDecode(f *testing.F) {
	pcs, _ := userSite()
	f.Add(record(decode.NilMapWrite, 0, 42, 1500, 0x1234, pcs...))
	f.Add(record(decode.NilMapRead, 3, 1, 0, 0))
	f.Add([]byte{1, 2, 3})
	d := NewDecoder(Config{StackDepth: 3, Probes: []string{"a", "b"}})
	f.Fuzz(func(t *testing.T, raw []byte) {
		var ev decode.Event
		if err := d.Decode(raw, &ev); err != nil && !errors.Is(err, ErrRecord) && !errors.Is(err, ErrRuntimeOwned) {
			t.Fatalf("error %v does not wrap ErrRecord", err)
		}
	})
}

func TestScope(t *testing.T) {
	s := ProgramScope()
	for fn, own := range map[string]bool{
		"main.main": true,
		"github.com/mapguard/mapguard/decode.TestScope": true,
		"github.com/mapguard/mapguard.New":              true,
		"github.com/mapguard/mapguard_test.init.func1":  true,
		"net/http.(*conn).serve":                        false,
		"net/textproto.MIMEHeader.Get":                  false,
		"fmt.Sprintf":                                   false,
		"github.com/mapguard/mapguardian.f":             false,
	} {
		if got := s.Own(fn); got != own {
			t.Errorf("Own(%q) = %v, want %v", fn, got, own)
		}
	}
	if !(Scope{}).Own("net/http.f") {
		t.Error("the zero Scope owns everything")
	}
}

func TestDecodeStdlib(t *testing.T) {
	pcs, _ := userSite()
	s := Scope{prefixes: []string{"main."}} // this package is not "own" here
	d := NewDecoder(Config{Scope: &s})
	var ev decode.Event
	if err := d.Decode(record(decode.NilMapRead, 0, 1, 0, 0, pcs[1:]...), &ev); !errors.Is(err, ErrStdlib) {
		t.Fatalf("err = %v, want ErrStdlib", err)
	}
	if err := d.Decode(record(decode.NilMapWrite, 0, 1, 0, 0, pcs[1:]...), &ev); err != nil {
		t.Fatalf("nil-map writes are reported wherever they are: %v", err)
	}
	// A dropped record's map type is not looked for in its caller's code
	// (a whole function decoded, for nothing).
	looked := 0
	d = NewDecoder(Config{Scope: &s, CallSiteType: func(uintptr) uintptr { looked++; return 0 }})
	if err := d.Decode(record(decode.NilMapRead, 0, 1, 0, 0, pcs[1:]...), &ev); !errors.Is(err, ErrStdlib) {
		t.Fatalf("err = %v, want ErrStdlib", err)
	}
	if looked != 0 {
		t.Errorf("CallSiteType called %d times for a dropped record", looked)
	}
	if err := d.Decode(record(decode.NilMapWrite, 0, 1, 0, 0, pcs[1:]...), &ev); err != nil || looked != 1 {
		t.Errorf("a kept record without a type: err %v, CallSiteType called %d times, want 1", err, looked)
	}
}

// Blame goes to the code that did the map operation: reflect's map API is
// its caller's operation, reflect's own maps are not the program's.
func TestBlameReflect(t *testing.T) {
	for _, c := range []struct {
		fn               string
		mapCode, rtOwned bool
	}{
		{"reflect.mapaccess_faststr", true, false},
		{"reflect.mapassign0", true, false},
		{"reflect.Value.MapIndex", true, false},
		{"reflect.Value.SetMapIndex", true, false},
		{"reflect.(*MapIter).Next", true, false},
		{"reflect.deepValueEqual", false, true},
		{"reflect.addReflectOff", false, true},
		{"reflect.DeepEqual", false, true},
		{"maps.Copy[...]", true, false},
		{"runtime.mapaccess1_faststr", true, false},
		{"internal/runtime/maps.(*Map).getWithKey", true, false},
		{"runtime.resolveTypeOff", false, true},
		{"encoding/json.(*decodeState).object", false, false},
		{"main.handler", false, false},
	} {
		if got := isMapCode(c.fn); got != c.mapCode {
			t.Errorf("isMapCode(%s) = %v", c.fn, got)
		}
		if got := !isMapCode(c.fn) && isRuntime(c.fn); got != c.rtOwned {
			t.Errorf("%s owned by the runtime or reflect = %v", c.fn, got)
		}
	}
}

// reflect.DeepEqual's visited map is reflect's own: never the caller's.
func TestBlameDeepEqualIsNotTheCallers(t *testing.T) {
	// The frames a probe in a map function called by reflect.DeepEqual
	// sees: reflect's internal function first, then the user's.
	d := NewDecoder(Config{})
	if site, _, _, owned := d.symbolizeNames("reflect.deepValueEqual", "reflect.DeepEqual", "main.check"); !owned {
		t.Fatalf("DeepEqual's map blamed on %v", site)
	}
	if site, _, _, owned := d.symbolizeNames("reflect.mapaccess", "reflect.Value.MapIndex", "main.lookup"); owned || site.Function != "main.lookup" {
		t.Fatalf("MapIndex blamed on %v (owned %v), want main.lookup", site, owned)
	}
}

// symbolizeNames runs symbolize on frames with the given function names,
// one per return PC.
func (d *Decoder) symbolizeNames(fns ...string) (decode.Frame, []decode.Frame, uintptr, bool) {
	for i, fn := range fns {
		pc := uintptr(0x1000 + i)
		d.frames[pc] = []decode.Frame{{Function: fn, PC: pc}}
		d.pcs[i] = pc
	}
	return d.symbolize(len(fns))
}

// A crash record of another process is adjusted as a Rec: Rebase moves
// every address it carries and forgets the map; Strip forgets them all.
func TestRecRebaseStrip(t *testing.T) {
	raw := record(decode.ConcurrentMisuse, 3, 9, 100, 0x5000, 0x1000, 0x2000)
	le := binary.NativeEndian
	le.PutUint64(raw[offMap:], 0xc000)
	le.PutUint64(raw[offPeerPC:], 0x3000)
	le.PutUint64(raw[offAux:], 0x4000)
	var r Rec
	if err := Parse(raw, &r); err != nil {
		t.Fatal(err)
	}
	if r.Kind != decode.ConcurrentMisuse || r.Site != 3 || r.Goid != 9 || r.Mono != 100 || r.Len != 7 || r.NPCs != 2 || r.Map != 0xc000 {
		t.Fatalf("parsed %+v", r)
	}
	r.Rebase(0x100)
	if r.PCs[0] != 0x1100 || r.PCs[1] != 0x2100 || r.Typ != 0x5100 || r.PeerPC != 0x3100 || r.Aux != 0x4100 || r.Map != 0 {
		t.Errorf("rebased %+v", r)
	}
	r.Strip()
	if r.NPCs != 0 || r.Typ != 0 || r.PeerPC != 0 || r.Aux != 0 || r.Map != 0 {
		t.Errorf("stripped %+v", r)
	}
	if r.Goid != 9 || r.Kind != decode.ConcurrentMisuse {
		t.Errorf("strip lost the goroutine or kind: %+v", r)
	}
}
