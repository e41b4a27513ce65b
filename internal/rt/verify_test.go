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
	} {
		o := *known
		mutate(&o)
		if err := verify(&o); !errors.Is(err, ErrMismatch) {
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
