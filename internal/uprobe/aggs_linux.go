//go:build linux && amd64

package uprobe

import (
	"errors"

	"github.com/cilium/ebpf"
)

// aggChunk is how many aggregates one batch lookup reads.
const aggChunk = 256

// aggReader reads the per-call-site aggregates (the aggs map) whole, with
// batch lookups: a few system calls for the map rather than two an entry
// (an iterator's next key and lookup). On the seeded service, with a
// few hundred call sites, the iterator took the reader 230 us a flush,
// 7% of the Guard's own CPU. Its buffers are kept from one read to the
// next.
type aggReader struct {
	keys  []mapguardAggKey
	vals  []mapguardAggVal
	chunk struct {
		keys []mapguardAggKey
		vals []mapguardAggVal
	}
	noBatch bool // the kernel has no batch lookups for hash maps (before 5.6)
}

// read returns every entry of m, keys and values at one index (valid
// until the next read). Entries that change meanwhile are read before or
// after the change, as with an iterator.
func (r *aggReader) read(m *ebpf.Map) ([]mapguardAggKey, []mapguardAggVal, error) {
	r.keys, r.vals = r.keys[:0], r.vals[:0]
	if !r.noBatch {
		err := r.readBatch(m)
		if err == nil {
			return r.keys, r.vals, nil
		}
		// No batch lookups on this kernel: the iterator from now on. Any
		// other failure (a hash bucket longer than a chunk, ENOSPC): the
		// iterator this time, so that no report is lost.
		r.noBatch = errors.Is(err, ebpf.ErrNotSupported)
		r.keys, r.vals = r.keys[:0], r.vals[:0]
	}
	var (
		key mapguardAggKey
		val mapguardAggVal
	)
	it := m.Iterate()
	for it.Next(&key, &val) {
		r.keys = append(r.keys, key)
		r.vals = append(r.vals, val)
	}
	return r.keys, r.vals, it.Err()
}

func (r *aggReader) readBatch(m *ebpf.Map) error {
	if r.chunk.keys == nil {
		r.chunk.keys = make([]mapguardAggKey, aggChunk)
		r.chunk.vals = make([]mapguardAggVal, aggChunk)
	}
	var cursor ebpf.MapBatchCursor
	for {
		n, err := m.BatchLookup(&cursor, r.chunk.keys, r.chunk.vals, nil)
		r.keys = append(r.keys, r.chunk.keys[:n]...)
		r.vals = append(r.vals, r.chunk.vals[:n]...)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil // the end, with the last entries or none
		}
		if err != nil {
			return err
		}
	}
}
