package symbols

import (
	"fmt"
	"slices"
	"testing"
)

// sortKeys sorts as slices.Sort does, including keys that share a
// bucket or a hash, and empty and tiny indexes.
func TestSortKeys(t *testing.T) {
	for _, n := range []int{0, 1, 2, 5, 100, 5000, 200000} {
		keys := make([]uint64, n)
		for i := range keys {
			keys[i] = uint64(nameHash(fmt.Appendf(nil, "main.f%d", i%(n/2+1))))<<32 | uint64(i)
		}
		want := slices.Clone(keys)
		slices.Sort(want)
		sortKeys(keys)
		if !slices.Equal(keys, want) {
			t.Fatalf("%d keys: not sorted as slices.Sort does", n)
		}
	}
}
