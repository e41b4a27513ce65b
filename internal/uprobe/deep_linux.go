//go:build linux && amd64

package uprobe

// Deep watching: probes on every operation of a kind, under the same CPU
// budget as every other site (governor.go).

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/mapguard/mapguard/decode"
	"github.com/mapguard/mapguard/internal/wire"
	"github.com/mapguard/mapguard/probe"
)

// threadCPU is the CPU time of the calling thread, in ns. A raw system
// call (clock_gettime never blocks, and a thread's CPU clock is not in the
// vDSO): a plain one tells the scheduler, which wakes sysmon from its long
// sleep, and sysmon then polls every 20 us for a while; the Guard's
// goroutines read it several times a tick.
func threadCPU() time.Duration {
	var ts unix.Timespec
	_, _, e := unix.RawSyscall(unix.SYS_CLOCK_GETTIME, unix.CLOCK_THREAD_CPUTIME_ID, uintptr(unsafe.Pointer(&ts)), 0)
	if e != 0 {
		return 0
	}
	return time.Duration(ts.Nano())
}

func randomSalt() uint64 {
	var b [8]byte
	rand.Read(b[:])
	return binary.LittleEndian.Uint64(b[:])
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// excluded reports whether a SharedWriters event is excluded by the user.
func (u *uprobes) excluded(ev *decode.Event) bool {
	for _, x := range u.cfg.SharedExclude {
		if ev.MapType == x || strings.HasPrefix(ev.Site.Function, x) {
			return true
		}
	}
	return false
}

// OpStats returns the operation counts per call site and kind, as counted
// in the kernel since Start (while the deep probes were attached).
func (u *uprobes) OpStats() []probe.OpStat {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.aggs == nil || !u.cfg.OpStats {
		return nil
	}
	if u.statsDec == nil {
		clock, _ := newClock()
		cfg := decoderConfig(u.offsets, clock)
		cfg.Scope, cfg.MissScope = nil, nil
		u.statsDec = wire.NewDecoder(cfg)
	}
	var (
		key mapguardAggKey
		val mapguardAggVal
		ev  decode.Event
		out []probe.OpStat
	)
	it := u.aggs.Iterate()
	for it.Next(&key, &val) {
		if int(key.Site) >= len(u.sites) || u.sites[key.Site].flags&siteCount == 0 {
			continue
		}
		s := u.sites[key.Site]
		rec := wire.Rec{Kind: decode.NilMapRead, Site: key.Site, Count: val.Count, NPCs: 1}
		rec.PCs[0] = uintptr(key.Pc)
		if err := u.statsDec.DecodeRec(&rec, &ev); err != nil && !errors.Is(err, wire.ErrRuntimeOwned) {
			continue
		}
		out = append(out, probe.OpStat{Op: s.op, Site: ev.Site, MapType: ev.MapType, Count: val.Count})
	}
	return out
}
