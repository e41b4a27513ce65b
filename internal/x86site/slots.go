package x86site

// sxSlots are the tracked 8-byte stack slots of a data-flow pass, by
// frame offset: a short slice, not a map. The decoder runs in the
// watched process, after its probes are attached, and a map read of an
// untracked slot would be a missing-key read: a trap at the Guard's own
// probe. A pass tracks a few slots at a time.
type sxSlots[V comparable] []sxSlot[V]

type sxSlot[V comparable] struct {
	off int64
	v   V
}

// get returns the value at off, the zero value if it is not tracked.
func (s sxSlots[V]) get(off int64) V {
	for _, e := range s {
		if e.off == off {
			return e.v
		}
	}
	var zero V
	return zero
}

// set tracks v at off.
func (s *sxSlots[V]) set(off int64, v V) {
	for i := range *s {
		if (*s)[i].off == off {
			(*s)[i].v = v
			return
		}
	}
	*s = append(*s, sxSlot[V]{off, v})
}

// forget drops the slots for which gone reports true.
func (s *sxSlots[V]) forget(gone func(off int64) bool) {
	kept := (*s)[:0]
	for _, e := range *s {
		if !gone(e.off) {
			kept = append(kept, e)
		}
	}
	*s = kept
}

// reset drops every slot.
func (s *sxSlots[V]) reset() { *s = (*s)[:0] }

// clone returns a copy that shares nothing with s.
func (s sxSlots[V]) clone() sxSlots[V] { return append(sxSlots[V](nil), s...) }
