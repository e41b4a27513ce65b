package record

import (
	"bufio"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/mapguard/mapguard/internal/testutil"
)

func read(t *testing.T, path string) []Record {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var recs []Record
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 16<<20)
	for sc.Scan() {
		var r Record
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("%s: %v", sc.Bytes(), err)
		}
		recs = append(recs, r)
	}
	return recs
}

//go:noinline
func writeNil(m map[string]int) (recovered bool) {
	defer func() { recovered = recover() != nil }()
	m["x"] = 1
	return false
}

// A Guard started by Start records the event of a nil-map write, and its
// Stats when stopped; the round trip through JSON keeps kind and site.
func TestStartRecordsEvents(t *testing.T) {
	testutil.RequirePrivileged(t)
	path := filepath.Join(t.TempDir(), "out.jsonl")
	stop := Start(Default, path)
	if !writeNil(nil) {
		t.Fatal("no panic")
	}
	stop()
	stop() // idempotent
	var started, stats, events int
	for _, r := range read(t, path) {
		switch r.Type {
		case "started":
			started++
			if r.CPU <= 0 {
				t.Errorf("started record without CPU time: %+v", r)
			}
		case "stats":
			stats++
		case "event":
			if r.Kind == "nil-map-write" && r.Event.Site.Function == "github.com/mapguard/mapguard/bench/corpus/record.writeNil" {
				events++
			}
		case "start-error":
			t.Fatalf("Guard did not start: %s", r.Error)
		}
	}
	if started != 1 || stats != 1 || events != 1 {
		t.Errorf("started %d, stats %d, nil-map-write events at writeNil %d; want 1 each", started, stats, events)
	}
}

// Off records only where the baseline's CPU time starts.
func TestStartOff(t *testing.T) {
	path := filepath.Join(t.TempDir(), "out.jsonl")
	Start(Off, path)()
	recs := read(t, path)
	if len(recs) != 1 || recs[0].Type != "started" || recs[0].Mode != Off {
		t.Errorf("records %+v, want one started record in mode off", recs)
	}
	if _, ok := Options(Off); ok {
		t.Error("Options(Off) reports a Guard")
	}
	if o, ok := Options(Deep); !ok || !o.OpStats || len(o.Detect) == 0 {
		t.Errorf("Options(Deep) = %+v, %v", o, ok)
	}
}
