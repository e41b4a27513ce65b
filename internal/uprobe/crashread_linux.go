//go:build linux && amd64

package uprobe

import (
	"debug/buildinfo"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/mapguard/mapguard/decode"
	"github.com/mapguard/mapguard/internal/rt"
	"github.com/mapguard/mapguard/internal/wire"
	"github.com/mapguard/mapguard/symbols"
)

// checkEntry returns why an entry read from a pin cannot be trusted ("" if
// it can): its key must be the hash of who wrote it, and a crash must look
// like one the BPF program wrote. Addresses are checked by ownBinary.check.
func checkEntry(key uint64, v *mapguardCrash, nowMono uint64) string {
	if key != identityOf(v).key() {
		return "key is not the hash of the writer's identity"
	}
	switch v.Crashed {
	case 0:
		return ""
	case 1:
	default:
		return fmt.Sprintf("crashed flag %d", v.Crashed)
	}
	e := &v.Ev
	if decode.Kind(e.Kind) != decode.ConcurrentMisuse {
		return fmt.Sprintf("kind %d", e.Kind)
	}
	if int(e.Npcs) > decode.MaxFrames {
		return fmt.Sprintf("%d frames", e.Npcs)
	}
	if int(e.DetailLen) > wire.DetailLen {
		return fmt.Sprintf("detail of %d bytes", e.DetailLen)
	}
	for _, c := range e.Detail[:e.DetailLen] {
		if c < 0x20 || c > 0x7e {
			return "detail is not printable text"
		}
	}
	if e.Goid == 0 {
		return "no goroutine"
	}
	if e.TimeNs < v.StartNs || e.TimeNs > nowMono {
		return "crash time outside the writer's life"
	}
	// The probe on the fatal error reads no map type: one here is forged.
	if e.Typ != 0 {
		return "a map type where the probe reads none"
	}
	return ""
}

// readCrashes reads, without removing anything, the crashed entries of m
// that pass every check.
func readCrashes(m *ebpf.Map, own *ownBinary) ([]crashRecord, error) {
	var (
		key uint64
		val mapguardCrash
		out []crashRecord
	)
	now, err := kernelMono()
	if err != nil {
		return nil, err
	}
	it := m.Iterate()
	for it.Next(&key, &val) {
		if val.Crashed == 0 || checkEntry(key, &val, now) != "" {
			continue
		}
		r := crashRecord{key: key, pid: int(val.Pid), val: val}
		if own.check(r) != "" {
			continue
		}
		out = append(out, r)
	}
	return out, it.Err()
}

// raw returns the record's event as the kernel wrote it (wire layout).
func (r crashRecord) raw() []byte {
	return unsafe.Slice((*byte)(unsafe.Pointer(&r.val.Ev)), wire.RecordSize)
}

// ReadCrashes returns the crash records left by processes of the program
// at exe ("" for this program) that died of a concurrent map misuse, without
// removing them. exe is the path the program is started as; if no records
// are pinned for it, those of the file it resolves to are read. Records of
// this very build are symbolised (file:line, map type); for another build
// only the message, goroutine, time and PID are known. Damaged records are
// left out. It needs the privileges to open pinned BPF maps.
func ReadCrashes(exe string) ([]decode.Event, error) {
	var paths []string
	var main string
	if exe == "" {
		p, err := startedAs()
		if err != nil {
			return nil, err
		}
		exe, main = p, mainPackage()
		paths = []string{programPinPath(p, main)}
	} else {
		abs, err := filepath.Abs(exe)
		if err != nil {
			return nil, err
		}
		bi, err := buildinfo.ReadFile(abs)
		if err != nil {
			return nil, fmt.Errorf("read crash records: %s: %w", exe, err)
		}
		main = bi.Path
		paths = []string{programPinPath(abs, main)}
		if real, err := filepath.EvalSymlinks(abs); err == nil && real != abs {
			paths = append(paths, programPinPath(real, main))
		}
		exe = abs
	}
	spec, err := loadMapguard()
	if err != nil {
		return nil, err
	}
	var own *ownBinary
	if id, err := buildID(exe); err == nil {
		if self, err := buildID(selfExe); err == nil && id == self {
			if own, err = openOwnBinary(); err != nil {
				return nil, err
			}
		}
	}
	var evs []decode.Event
	for _, path := range paths {
		m, err := ebpf.LoadPinnedMap(path, &ebpf.LoadPinOptions{ReadOnly: true})
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("open crash records %s: %w", path, err)
		}
		if err := spec.Maps[mapguardMapCrashes].Compatible(m); err != nil {
			m.Close()
			return nil, fmt.Errorf("crash records %s: not a crash record map of this mapguard version: %w", path, err)
		}
		recs, err := readCrashes(m, own)
		m.Close()
		if err != nil {
			return nil, err
		}
		for _, r := range recs {
			var ev decode.Event
			own.decodeCrash(r, &ev)
			evs = append(evs, ev)
		}
		if len(evs) > 0 {
			break
		}
	}
	return evs, nil
}

// inText reports whether pc is a return address in this binary's code.
func inText(pc uintptr) bool {
	return pc > 1 && runtime.FuncForPC(pc-1) != nil
}

// ownBinary decodes crash records written by processes of this binary.
type ownBinary struct {
	bias  uint64
	exeID uint64
	dec   *wire.Decoder
}

// newOwnBinary describes this binary, loaded at bias from its link-time
// addresses.
func newOwnBinary(bias uint64, o *rt.Offsets, clock wire.Clock) (*ownBinary, error) {
	id, err := buildID(selfExe)
	if err != nil {
		return nil, err
	}
	cfg := decoderConfig(o, clock)
	cfg.StackDepth = decode.MaxFrames
	cfg.Scope, cfg.MissScope = nil, nil
	return &ownBinary{bias: bias, exeID: id, dec: wire.NewDecoder(cfg)}, nil
}

func openOwnBinary() (*ownBinary, error) {
	o, err := rt.Load()
	if err != nil {
		return nil, err
	}
	bin, err := symbols.OpenSelf()
	if err != nil {
		return nil, err
	}
	defer bin.Close()
	clock, err := newClock()
	if err != nil {
		return nil, err
	}
	return newOwnBinary(bin.LoadBias(), o, clock)
}

// check returns why the addresses in a crash record of this build cannot
// be trusted ("" if they can): every return PC, moved to this process's
// load address, must be in this binary's code. The map address is never
// used and checkEntry refused a type. A record of another build (or with o
// nil) is decoded without its addresses, so nothing in it is looked up.
func (o *ownBinary) check(r crashRecord) string {
	if o == nil || r.val.ExeId != o.exeID {
		return ""
	}
	delta := o.bias - r.val.Bias
	e := &r.val.Ev
	for i := 0; i < int(min(e.Npcs, decode.MaxFrames)); i++ {
		if pc := uintptr(e.Pcs[i] + delta); !inText(pc) {
			return fmt.Sprintf("return PC %#x outside this binary's code", pc)
		}
	}
	if e.PeerPc != 0 && !inText(uintptr(e.PeerPc+delta)) {
		return fmt.Sprintf("peer PC %#x outside this binary's code", uintptr(e.PeerPc+delta))
	}
	return ""
}

// decodeCrash turns a crash record that passed checkEntry and check into a
// PreviousCrash event. Only a record of this very build has addresses that
// mean something here; o may be nil (no binary to symbolise with).
func (o *ownBinary) decodeCrash(r crashRecord, ev *decode.Event) {
	var rec wire.Rec
	if err := wire.Parse(r.raw(), &rec); err != nil {
		*ev = decode.Event{Kind: decode.PreviousCrash, PID: r.pid}
		return
	}
	var dec *wire.Decoder
	if o != nil && r.val.ExeId == o.exeID {
		rec.Rebase(int64(o.bias - r.val.Bias))
		dec = o.dec
	} else {
		rec.Strip()
		dec = wire.NewDecoder(wire.Config{})
	}
	rec.Kind = decode.PreviousCrash
	if err := dec.DecodeRec(&rec, ev); err != nil && !errors.Is(err, wire.ErrRuntimeOwned) {
		*ev = decode.Event{Kind: decode.PreviousCrash}
	}
	ev.PID = r.pid
}

// crashUnavailableLocked records and logs (at V(0): the user asked for the
// record and will not get it) why there is no crash record.
func (u *uprobes) crashUnavailableLocked(err error) {
	u.crashErr = err.Error()
	u.own = nil
	u.log.Info("crash record unavailable: a concurrent map misuse that kills the process will not be reported at the next start; "+
		"it needs CAP_BPF and write access to a BPF file system at "+BPFFS+" (see the README)", "error", err.Error())
}

// deliverCrashesLocked reports the crash records of earlier processes,
// each one only if this process is the one that removes it from the map.
func (u *uprobes) deliverCrashesLocked() {
	var ev decode.Event
	for _, r := range u.pending {
		ok, err := u.crash.claim(r)
		if err != nil {
			u.log.Error(err, "claim crash record")
		}
		if !ok {
			continue
		}
		u.own.decodeCrash(r, &ev)
		u.sink(&ev)
	}
	u.pending = nil
}

// crashKey is the key of this process's crash entry, 0 without one.
func (u *uprobes) crashKey() uint64 {
	if u.crash == nil {
		return 0
	}
	return u.crash.key
}
