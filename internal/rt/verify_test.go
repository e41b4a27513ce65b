package rt

import (
	"errors"
	"sync"
	"testing"
)

func TestLoad(t *testing.T) {
	o, err := Load()
	if err != nil {
		t.Fatal(err)
	}
	if o.GoID == 0 {
		t.Fatal("goid offset is zero")
	}
}

func TestVerifyRejectsWrongOffsets(t *testing.T) {
	for name, mutate := range map[string]func(*Offsets){
		"used":  func(o *Offsets) { o.MapUsed = 8 },
		"dir":   func(o *Offsets) { o.MapDirLen = 16 },
		"depth": func(o *Offsets) { o.MapGlobalDepth = 34 },
		"kind":  func(o *Offsets) { o.TypeKind = 20 },
		"goid":  func(o *Offsets) { o.GoID += 8 },
		"group": func(o *Offsets) { o.MapTypeGroupSize += 8 },
	} {
		o, err := Load()
		if err != nil {
			t.Fatal(err)
		}
		mutate(o)
		if err := verify(o); !errors.Is(err, ErrMismatch) {
			t.Errorf("%s: verify = %v, want ErrMismatch", name, err)
		}
	}
}

func TestGoID(t *testing.T) {
	ids := make(chan uint64, 2)
	var wg sync.WaitGroup
	for i := 0; i < 2; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); ids <- GoID() }()
	}
	wg.Wait()
	a, b := <-ids, <-ids
	if a == 0 || b == 0 || a == b || a == GoID() {
		t.Fatalf("goroutine ids %d, %d, %d", a, b, GoID())
	}
}

func TestTypeString(t *testing.T) {
	typ := uintptr(TypeOf(map[string]map[int]bool(nil)))
	if got := TypeString(typ); got != "map[string]map[int]bool" {
		t.Fatalf("TypeString = %q", got)
	}
}

// The derived offsets are the ones read from the Go 1.25-1.27 sources.
func TestDerive(t *testing.T) {
	o := tabled
	if err := derive(&o); err != nil {
		t.Fatal(err)
	}
	if o.GoID != 152 || o.MapTypeGroupSize != 80 {
		t.Fatalf("derived goid at +%d, GroupSize at +%d; want 152 and 80 (Go 1.25-1.27)", o.GoID, o.MapTypeGroupSize)
	}
}

func TestGoMinor(t *testing.T) {
	for v, want := range map[string]int{"go1.25.14": 25, "go1.27.3": 27, "go1.28rc1": 28, "go1.26": 26, "devel go1.28-abc": -1} {
		got, ok := goMinor(v)
		if !ok {
			got = -1
		}
		if got != want {
			t.Errorf("goMinor(%q) = %d, want %d", v, got, want)
		}
	}
}
