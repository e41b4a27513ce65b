//go:build linux && amd64

package probe

// Crash records. The runtime's "concurrent map writes" kills the process
// right after the probe fires, before the reader could deliver the event, so
// the BPF program also writes it into a hash map that this file pins on the
// BPF file system: the kernel keeps the record after the process is gone.
// The next Start of the same program reads it and delivers it as a
// PreviousCrash event.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"path/filepath"
	"strings"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/mapguard/mapguard/bpf"
	"github.com/mapguard/mapguard/decode"
)

// BPFFS is where mapguard pins crash records, in a directory "mapguard".
// If no BPF file system is mounted there, Start mounts one (as bpftool
// does); that needs CAP_SYS_ADMIN.
const BPFFS = "/sys/fs/bpf"

// crashRecord is one crash record read back: the raw event and the
// identity of the process and binary that wrote it.
type crashRecord struct {
	pid   int
	bias  uint64
	exeID uint64
	raw   []byte // decode wire record, kind ConcurrentMisuse
}

// crashPinPath returns where the crash records of the program at exe are
// pinned: the file name and a hash of the absolute path, so that two
// programs never share records.
func crashPinPath(exe string) (string, error) {
	abs, err := filepath.Abs(exe)
	if err != nil {
		return "", err
	}
	h := fnv.New64a()
	h.Write([]byte(abs))
	base := strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '_':
			return r
		}
		return '_'
	}, filepath.Base(abs))
	if len(base) > 64 {
		base = base[:64]
	}
	return filepath.Join(BPFFS, "mapguard", fmt.Sprintf("crash-%s-%016x", base, h.Sum64())), nil
}

// exeIdentity identifies the binary at path: records written by a process
// of another build cannot be symbolised here.
func exeIdentity(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, err
	}
	var b []byte
	for _, v := range []uint64{st.Dev, st.Ino, uint64(st.Size), uint64(st.Mtim.Sec), uint64(st.Mtim.Nsec)} {
		b = binary.NativeEndian.AppendUint64(b, v)
	}
	h := fnv.New64a()
	h.Write(b)
	return h.Sum64(), nil
}

// ensureBPFFS mounts a BPF file system at BPFFS if none is there.
func ensureBPFFS() error {
	var st unix.Statfs_t
	if err := unix.Statfs(BPFFS, &st); err != nil {
		return fmt.Errorf("%s: %w", BPFFS, err)
	}
	if st.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	if err := unix.Mount("bpf", BPFFS, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount BPF file system at %s: %w", BPFFS, err)
	}
	return nil
}

// openCrashMap opens the pinned crash map of this program, creating
// and pinning it from spec if it does not exist or no longer matches.
func openCrashMap(spec *ebpf.MapSpec) (*ebpf.Map, string, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, "", err
	}
	if err := ensureBPFFS(); err != nil {
		return nil, "", err
	}
	path, err := crashPinPath(exe)
	if err != nil {
		return nil, "", err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, "", err
	}
	if m, err := ebpf.LoadPinnedMap(path, nil); err == nil {
		if spec.Compatible(m) == nil {
			return m, path, nil
		}
		// Written by another version of mapguard: its records cannot be
		// read; start afresh.
		m.Close()
		os.Remove(path)
	}
	m, err := ebpf.NewMap(spec)
	if err != nil {
		return nil, "", err
	}
	if err := m.Pin(path); err != nil {
		m.Close()
		return nil, "", err
	}
	return m, path, nil
}

// readCrashes reads the records of other processes from m: the crashed
// ones are returned. Unless readOnly, the entries of processes that are gone
// without crashing are deleted; entries of live processes stay.
func readCrashes(m *ebpf.Map, self int, readOnly bool) ([]crashRecord, error) {
	var (
		key   uint64
		val   bpf.MapguardCrash
		out   []crashRecord
		stale []uint64
	)
	it := m.Iterate()
	for it.Next(&key, &val) {
		pid := int(key)
		if pid == self {
			continue
		}
		if val.Crashed == 0 {
			if unix.Kill(pid, 0) == unix.ESRCH {
				stale = append(stale, key)
			}
			continue
		}
		raw := make([]byte, decode.RecordSize)
		copy(raw, unsafe.Slice((*byte)(unsafe.Pointer(&val.Ev)), decode.RecordSize))
		out = append(out, crashRecord{pid: pid, bias: val.Bias, exeID: val.ExeId, raw: raw})
	}
	if err := it.Err(); err != nil {
		return nil, err
	}
	if !readOnly {
		for _, k := range stale {
			if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return out, err
			}
		}
	}
	return out, nil
}

// ReadCrashes returns the crash records left by processes of the program
// at exe ("" for this program) that died of a concurrent map misuse, without
// removing them. Records of this very binary are symbolised (file:line,
// map type); for another build only the message, goroutine, time and PID
// are known. It needs the privileges to open pinned BPF maps.
func ReadCrashes(exe string) ([]decode.Event, error) {
	self := exe == ""
	if self {
		var err error
		if exe, err = os.Executable(); err != nil {
			return nil, err
		}
	}
	path, err := crashPinPath(exe)
	if err != nil {
		return nil, err
	}
	m, err := ebpf.LoadPinnedMap(path, &ebpf.LoadPinOptions{ReadOnly: true})
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open crash records %s: %w", path, err)
	}
	defer m.Close()
	spec, err := bpf.LoadMapguard()
	if err != nil {
		return nil, err
	}
	if err := spec.Maps[bpf.MapguardMapCrashes].Compatible(m); err != nil {
		return nil, fmt.Errorf("crash records %s: written by another mapguard version: %w", path, err)
	}
	recs, err := readCrashes(m, os.Getpid(), true)
	if err != nil {
		return nil, err
	}
	var own *ownBinary
	if self || sameFile(exe, selfExe) {
		if own, err = openOwnBinary(); err != nil {
			return nil, err
		}
	}
	evs := make([]decode.Event, len(recs))
	for i, r := range recs {
		own.decodeCrash(r, &evs[i])
	}
	return evs, nil
}

func sameFile(a, b string) bool {
	sa, err := os.Stat(a)
	if err != nil {
		return false
	}
	sb, err := os.Stat(b)
	return err == nil && os.SameFile(sa, sb)
}
