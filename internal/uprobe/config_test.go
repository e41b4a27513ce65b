package uprobe

import (
	"slices"
	"testing"
	"time"

	"github.com/mapguard/mapguard/decode"
	"github.com/mapguard/mapguard/internal/wire"
)

// Pure logic, no kernel: these run everywhere, in -short too.

func TestConfigDefaults(t *testing.T) {
	var c Config
	if got := c.bufferSize(); got != 1024 {
		t.Errorf("bufferSize() = %d, want 1024", got)
	}
	if got := c.growthThreshold(); got != 1<<20 {
		t.Errorf("growthThreshold() = %d, want 1<<20", got)
	}
	if got := c.budget(); got != 0.01 {
		t.Errorf("budget() = %v, want 0.01", got)
	}
	if got := c.sharedWindow(); got != 100*time.Millisecond {
		t.Errorf("sharedWindow() = %v, want 100ms", got)
	}
	if got := c.kinds(); !slices.Equal(got, DefaultKinds()) {
		t.Errorf("kinds() = %v, want the defaults", got)
	}
	c = Config{BufferSize: 7, GrowthThreshold: 99, Budget: 3, SharedWindow: time.Second, Kinds: []decode.Kind{decode.SharedWriters}}
	if c.bufferSize() != 7 || c.growthThreshold() != 99 || c.budget() != 1 || c.sharedWindow() != time.Second {
		t.Errorf("set values not kept (a budget above one CPU is one CPU): %d %d %v %v", c.bufferSize(), c.growthThreshold(), c.budget(), c.sharedWindow())
	}
	if got := c.kinds(); !slices.Equal(got, []decode.Kind{decode.SharedWriters}) {
		t.Errorf("kinds() = %v", got)
	}
}

func TestDefaultKindsAreNotDeep(t *testing.T) {
	for _, k := range DefaultKinds() {
		if decode.IsDeep(k) {
			t.Errorf("default kind %v probes every operation", k)
		}
	}
}

// Config.deep decides, before the sites are chosen, whether the deep
// program is loaded: a deep kind or operation statistics.
func TestConfigDeep(t *testing.T) {
	for _, tc := range []struct {
		c    Config
		want bool
	}{
		{Config{}, false},
		{Config{Kinds: []decode.Kind{decode.NilMapWrite}}, false},
		{Config{Kinds: []decode.Kind{decode.NilMapWrite, decode.SharedWriters}}, true},
		{Config{Kinds: []decode.Kind{decode.MissingKeyDelete}}, true},
		{Config{OpStats: true}, true},
	} {
		if got := tc.c.deep(); got != tc.want {
			t.Errorf("%+v: deep() = %v, want %v", tc.c, got, tc.want)
		}
	}
}

func TestRingSize(t *testing.T) {
	for _, tc := range []struct {
		events int
		want   uint32
	}{
		{0, 4096},
		{1, 4096},
		{4096 / wire.RecordSize, 4096},
		{4096/wire.RecordSize + 1, 8192},
		{1024, 1 << 19},
		{1 << 30, 1 << 30}, // capped
	} {
		got := ringSize(tc.events)
		if got != tc.want {
			t.Errorf("ringSize(%d) = %d, want %d", tc.events, got, tc.want)
		}
		if got&(got-1) != 0 || got < 4096 {
			t.Errorf("ringSize(%d) = %d: not a power of two of at least a page", tc.events, got)
		}
		if tc.events*wire.RecordSize <= 1<<30 && int(got) < tc.events*wire.RecordSize {
			t.Errorf("ringSize(%d) = %d holds fewer than %d records", tc.events, got, tc.events)
		}
	}
}
