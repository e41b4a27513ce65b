//go:build linux && amd64

package uprobe

// Crash records. The runtime's "concurrent map writes" kills the process
// right after the probe fires, before the reader could deliver the event, so
// the BPF program also writes it into a hash map that this file pins on the
// BPF file system: the kernel keeps the record after the process is gone.
// The next Start of the same program reads it and delivers it as a
// PreviousCrash event.
//
// Who is who:
//   - a program is its main package and the path it was started as, symlinks
//     not resolved (AT_EXECFN): a redeploy that switches a symlink, or
//     replaces the file, is the same program; the pin path comes from it;
//   - a process is (PID namespace, PID, start time): a container's PID 1
//     after a restart is another process; its entry's key is a hash of it;
//   - a build is its Go build ID: only a record of this very build is
//     symbolised here.
//
// One entry per process, shared by its Guards (crashStore counts them); only
// its owner removes it, or a reader that proves the owner gone (the owner
// holds an flock on a directory of its own while the entry is in use; see
// aliveDir). Creating the
// pin and adding an entry, and removing an entry and unpinning the empty map,
// happen under an flock of the directory, so the map is never unpinned
// between another process's open and its entry.

import (
	"bytes"
	"debug/buildinfo"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/go-logr/logr"
	"golang.org/x/sys/unix"

	"github.com/mapguard/mapguard/decode"
	"github.com/mapguard/mapguard/internal/rt"
	"github.com/mapguard/mapguard/internal/wire"
	"github.com/mapguard/mapguard/symbols"
)

// BPFFS is where mapguard pins crash records, in a directory "mapguard".
// If no BPF file system is mounted there, Start mounts one (as bpftool
// does); that needs CAP_SYS_ADMIN.
const BPFFS = "/sys/fs/bpf"

// pinDir holds the pins, their lock and the alive directories; tests that
// hold its lock use a directory of their own.
var pinDir = filepath.Join(BPFFS, "mapguard")

// crashLayout is part of the pin name: a pin of another layout of struct
// crash is another object, left alone.
const crashLayout = 2

// aliveDir is where a process holds an flock while its entry is in use:
// BPFFS/mapguard/alive-<key>, a directory (the BPF file system has no
// regular files). The lock goes when the process dies, whatever its PID
// namespace; a reader that gets it has proven the owner gone.
func aliveDir(dir string, key uint64) string {
	return filepath.Join(dir, fmt.Sprintf("%s%016x", alivePrefix, key))
}

const alivePrefix = "alive-"

// removeIfUnlocked removes the alive directory at path if no process holds
// its lock.
func removeIfUnlocked(path string) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return
	}
	if unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB) == nil {
		os.Remove(path)
	}
	unix.Close(fd)
}

// crashRecord is one crashed entry read back.
type crashRecord struct {
	key uint64
	pid int
	val mapguardCrash
}

// procIdentity is who wrote an entry.
type procIdentity struct {
	pidns     uint64
	pid       uint32
	procStart uint64
}

func (p procIdentity) key() uint64 {
	var b [20]byte
	binary.LittleEndian.PutUint64(b[0:], p.pidns)
	binary.LittleEndian.PutUint32(b[8:], p.pid)
	binary.LittleEndian.PutUint64(b[12:], p.procStart)
	h := fnv.New64a()
	h.Write(b[:])
	return h.Sum64()
}

func identityOf(v *mapguardCrash) procIdentity {
	return procIdentity{pidns: v.Pidns, pid: v.Pid, procStart: v.ProcStart}
}

// selfIdentity is this process's identity.
func selfIdentity() (procIdentity, error) {
	var st unix.Stat_t
	if err := unix.Stat("/proc/self/ns/pid", &st); err != nil {
		return procIdentity{}, fmt.Errorf("read PID namespace: %w", err)
	}
	start, err := procStartTime("self")
	if err != nil {
		return procIdentity{}, err
	}
	return procIdentity{pidns: st.Ino, pid: uint32(os.Getpid()), procStart: start}, nil
}

// procStartTime returns field 22 of /proc/<pid>/stat: the start time in
// clock ticks after boot.
func procStartTime(pid string) (uint64, error) {
	b, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		return 0, err
	}
	// The command name may hold spaces and parentheses: count from the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%s/stat: no command", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return 0, fmt.Errorf("/proc/%s/stat: %d fields", pid, len(f))
	}
	return strconv.ParseUint(f[19], 10, 64)
}

// programPinPath returns where the crash records of a program are pinned:
// its file name and a hash of its main package and of path, the absolute
// path it is started as.
func programPinPath(path, mainPkg string) string {
	h := fnv.New64a()
	h.Write([]byte(mainPkg))
	h.Write([]byte{0})
	h.Write([]byte(path))
	base := strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '_':
			return r
		}
		return '_'
	}, filepath.Base(path))
	if len(base) > 64 {
		base = base[:64]
	}
	return filepath.Join(pinDir, fmt.Sprintf("crash%d-%s-%016x", crashLayout, base, h.Sum64()))
}

// atExecFn is the auxiliary vector entry naming the file passed to execve.
const atExecFn = 31

// startedAs returns the absolute path this process was started as, symlinks
// not resolved: the file name execve was given, made absolute against the
// working directory. If it no longer names a file, the running executable.
func startedAs() (string, error) {
	if auxv, err := unix.Auxv(); err == nil {
		for _, kv := range auxv {
			if kv[0] != atExecFn || kv[1] == 0 {
				continue
			}
			// The string lives on the initial stack; read it without
			// dereferencing, so a strange auxv costs an error, not a fault.
			buf := make([]byte, unix.PathMax)
			local := []unix.Iovec{{Base: &buf[0], Len: uint64(len(buf))}}
			remote := []unix.RemoteIovec{{Base: kv[1], Len: len(buf)}}
			n, err := unix.ProcessVMReadv(os.Getpid(), local, remote, 0)
			if err != nil || n <= 0 {
				break
			}
			name := buf[:n]
			if i := bytes.IndexByte(name, 0); i > 0 {
				if abs, err := filepath.Abs(string(name[:i])); err == nil {
					if _, err := os.Stat(abs); err == nil {
						return abs, nil
					}
				}
			}
		}
	}
	return os.Executable()
}

// mainPackage names the program's main package, "" if unknown.
func mainPackage() string {
	if bi, ok := debug.ReadBuildInfo(); ok {
		return bi.Path
	}
	return ""
}

// buildID identifies the build of the executable at path: a hash of its Go
// build ID, else of the file's identity (inode, size, time).
func buildID(path string) (uint64, error) {
	h := fnv.New64a()
	if f, err := elf.Open(path); err == nil {
		defer f.Close()
		if s := f.Section(".note.go.buildid"); s != nil {
			if b, err := s.Data(); err == nil && len(b) > 16 {
				h.Write(b)
				return h.Sum64(), nil
			}
		}
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, err
	}
	var b []byte
	for _, v := range []uint64{st.Dev, st.Ino, uint64(st.Size), uint64(st.Mtim.Sec), uint64(st.Mtim.Nsec)} {
		b = binary.NativeEndian.AppendUint64(b, v)
	}
	h.Write(b)
	return h.Sum64(), nil
}

// kernelMono returns the clock the BPF program stamps records with
// (bpf_ktime_get_ns): CLOCK_MONOTONIC without this process's time
// namespace offset, so that an entry's times compare in any namespace.
func kernelMono() (uint64, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0, fmt.Errorf("read monotonic clock: %w", err)
	}
	now := ts.Nano()
	if b, err := os.ReadFile("/proc/self/timens_offsets"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			f := strings.Fields(l)
			if len(f) == 3 && f[0] == "monotonic" {
				sec, _ := strconv.ParseInt(f[1], 10, 64)
				nsec, _ := strconv.ParseInt(f[2], 10, 64)
				now -= sec*1e9 + nsec
			}
		}
	}
	return uint64(now), nil
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

// lockWait bounds how long Start and Close wait for the pin directory's
// lock: a process stopped while holding it must not stop this one.
const lockWait = 2 * time.Second

// lockDir takes an exclusive flock of the pin directory (the BPF file
// system has no regular files to lock); unlock releases it. It gives up
// after lockWait.
func lockDir(dir string) (unlock func(), err error) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", dir, err)
	}
	deadline := time.Now().Add(lockWait)
	for {
		err = unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB)
		if err != unix.EWOULDBLOCK && err != unix.EINTR || time.Now().After(deadline) {
			break
		}
		time.Sleep(2 * time.Millisecond)
	}
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	return func() { unix.Close(fd) }, nil
}

// crashStore is this process's entry in the pinned map of its program,
// shared by its Guards.
type crashStore struct {
	m     *ebpf.Map
	path  string
	self  procIdentity
	key   uint64
	alive int // fd of aliveDir, flocked
	users int
}

var crashStores struct {
	sync.Mutex
	s *crashStore
}

// crashTake is what a Guard got from acquireCrashStore: the shared store,
// and if it made the entry, the records of earlier processes to deliver
// and how many damaged ones it removed.
type crashTake struct {
	store   *crashStore
	pending []crashRecord
	damaged int
}

// acquireCrashStore returns this process's crash store, creating its entry
// if no Guard holds it yet; own describes this binary.
func acquireCrashStore(spec *ebpf.MapSpec, own *ownBinary, log logr.Logger) (crashTake, error) {
	crashStores.Lock()
	defer crashStores.Unlock()
	if s := crashStores.s; s != nil {
		s.users++
		return crashTake{store: s}, nil
	}
	self, err := selfIdentity()
	if err != nil {
		return crashTake{}, err
	}
	exe, err := startedAs()
	if err != nil {
		return crashTake{}, err
	}
	if err := ensureBPFFS(); err != nil {
		return crashTake{}, err
	}
	path := programPinPath(exe, mainPackage())
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return crashTake{}, err
	}
	unlock, err := lockDir(dir)
	if err != nil {
		return crashTake{}, err
	}
	defer unlock()

	m, err := openOrCreatePin(spec, path, log)
	if err != nil {
		return crashTake{}, err
	}
	alive, err := holdAlive(aliveDir(dir, self.key()))
	if err != nil {
		unpinIfEmpty(m, log)
		m.Close()
		return crashTake{}, err
	}
	s := &crashStore{m: m, path: path, self: self, key: self.key(), alive: alive, users: 1}
	take := crashTake{store: s}
	take.pending, take.damaged = s.collect(own, log)
	now, err := kernelMono()
	if err != nil {
		unpinIfEmpty(m, log)
		s.close()
		return crashTake{}, err
	}
	v := mapguardCrash{
		Bias: own.bias, ExeId: own.exeID, StartNs: now,
		Pidns: self.pidns, ProcStart: self.procStart, Pid: self.pid,
	}
	if err := m.Update(s.key, v, ebpf.UpdateAny); err != nil {
		unpinIfEmpty(m, log)
		s.close()
		return crashTake{}, fmt.Errorf("add crash entry: %w", err)
	}
	crashStores.s = s
	return take, nil
}

// openOrCreatePin opens the pinned map at path, or creates and pins it. An
// object there that is not a compatible map is removed, and the log says so.
func openOrCreatePin(spec *ebpf.MapSpec, path string, log logr.Logger) (*ebpf.Map, error) {
	m, err := ebpf.LoadPinnedMap(path, nil)
	if err == nil {
		cerr := spec.Compatible(m)
		if cerr == nil {
			return m, nil
		}
		m.Close()
		log.Info("removing an incompatible object at the crash record path", "path", path, "reason", cerr.Error())
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove incompatible %s: %w", path, err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		if _, serr := os.Lstat(path); serr == nil {
			// Not a BPF map we can open: not ours to remove.
			return nil, fmt.Errorf("open %s: %w", path, err)
		}
	}
	m, err = ebpf.NewMap(spec)
	if err != nil {
		return nil, err
	}
	if err := m.Pin(path); err != nil {
		m.Close()
		return nil, err
	}
	return m, nil
}

// holdAlive creates the directory at path and holds an exclusive flock of
// it; the returned descriptor keeps it.
func holdAlive(path string) (int, error) {
	if err := os.Mkdir(path, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return -1, fmt.Errorf("create %s: %w", path, err)
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open %s: %w", path, err)
	}
	if err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("lock %s: %w", path, err)
	}
	return fd, nil
}

// collect reads the entries of other processes: the crashed ones that pass
// every check are returned; damaged ones, and those of processes proven
// gone without crashing, are removed.
func (s *crashStore) collect(own *ownBinary, log logr.Logger) (pending []crashRecord, damaged int) {
	var (
		key uint64
		val mapguardCrash
		del []uint64
	)
	now, _ := kernelMono()
	it := s.m.Iterate()
	for it.Next(&key, &val) {
		if key == s.key {
			continue
		}
		if why := checkEntry(key, &val, now); why != "" {
			log.Info("crash record damaged: removed, not reported", "path", s.path, "pid", val.Pid, "reason", why)
			damaged++
			del = append(del, key)
			continue
		}
		if val.Crashed == 0 {
			if gone, why := s.ownerGone(key, &val); gone {
				log.V(1).Info("removing the crash entry of a process that is gone", "pid", val.Pid, "proof", why)
				del = append(del, key)
			}
			continue
		}
		r := crashRecord{key: key, pid: int(val.Pid), val: val}
		if why := own.check(r); why != "" {
			log.Info("crash record damaged: removed, not reported", "path", s.path, "pid", val.Pid, "reason", why)
			damaged++
			del = append(del, key)
			continue
		}
		pending = append(pending, r)
	}
	if err := it.Err(); err != nil {
		log.Info("read crash records", "path", s.path, "error", err.Error())
	}
	for _, k := range del {
		if err := s.m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			log.Info("remove crash entry", "error", err.Error())
		}
		s.dropAlive(k)
	}
	s.sweepAlive()
	return pending, damaged
}

// sweepAlive removes the alive directories no process holds: those of
// processes that died after their entry was claimed (a crashed process
// lives on for a few milliseconds after its record is written). It runs
// under the directory lock, under which processes also create theirs, so
// none is caught between its creation and its flock.
func (s *crashStore) sweepAlive() {
	dirs, _ := filepath.Glob(filepath.Join(filepath.Dir(s.path), alivePrefix+"*"))
	for _, d := range dirs {
		removeIfUnlocked(d)
	}
}

// dropAlive removes the alive directory of the entry at key once the
// entry is gone, if no process holds it.
func (s *crashStore) dropAlive(key uint64) {
	removeIfUnlocked(aliveDir(filepath.Dir(s.path), key))
}

// ownerGone reports whether the process that made v is proven gone: its
// alive directory is gone or no longer locked (the lock goes with the
// process, in any PID namespace), or it is in this PID namespace and its
// PID is free or names a process started at another time. A directory
// found unlocked is removed.
func (s *crashStore) ownerGone(key uint64, v *mapguardCrash) (bool, string) {
	path := aliveDir(filepath.Dir(s.path), key)
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	switch {
	case errors.Is(err, unix.ENOENT):
		// Made before the entry, removed after it: gone.
		return true, "no alive directory"
	case err == nil:
		lerr := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB)
		if lerr == nil {
			os.Remove(path)
		}
		unix.Close(fd)
		if lerr == nil {
			return true, "its alive directory is not locked"
		}
		if errors.Is(lerr, unix.EWOULDBLOCK) {
			return false, ""
		}
	}
	if v.Pidns != s.self.pidns {
		return false, ""
	}
	start, err := procStartTime(strconv.FormatUint(uint64(v.Pid), 10))
	switch {
	case errors.Is(err, os.ErrNotExist):
		return true, "no such PID"
	case err == nil && start != v.ProcStart:
		return true, "the PID names a later process"
	}
	return false, ""
}

// claim removes a pending record from the map; only the process whose
// removal succeeds delivers it, so a report goes out once even if two
// processes start at once.
func (s *crashStore) claim(r crashRecord) (bool, error) {
	err := s.m.Delete(r.key)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return false, nil
	}
	if err == nil {
		s.dropAlive(r.key)
	}
	return err == nil, err
}

// release drops one Guard's use of the store; the last one removes the
// entry (the process did not crash) and unpins the map if no entry is left.
func releaseCrashStore(s *crashStore, log logr.Logger) {
	crashStores.Lock()
	defer crashStores.Unlock()
	if s.users--; s.users > 0 {
		return
	}
	crashStores.s = nil
	unlock, err := lockDir(filepath.Dir(s.path))
	if err != nil {
		// Without the lock, leave the pin: another process may be adding
		// its entry.
		log.Info("crash records: cannot lock; the entry stays until a reader removes it", "error", err.Error())
		s.close()
		return
	}
	defer unlock()
	if err := s.m.Delete(s.key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		log.Info("remove crash entry", "error", err.Error())
	}
	unpinIfEmpty(s.m, log)
	s.close()
}

// unpinIfEmpty unpins m once no entry is left. Call it under the directory
// lock: another process may be about to add its entry otherwise.
func unpinIfEmpty(m *ebpf.Map, log logr.Logger) {
	var key uint64
	if err := m.NextKey(nil, &key); errors.Is(err, ebpf.ErrKeyNotExist) {
		if err := m.Unpin(); err != nil {
			log.V(1).Info("unpin crash records", "error", err.Error())
		}
	}
}

func (s *crashStore) close() {
	s.m.Close()
	os.Remove(aliveDir(filepath.Dir(s.path), s.key))
	unix.Close(s.alive)
}

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

// raw returns the record's event in the decoder's wire layout.
func (r crashRecord) raw() []byte {
	raw := make([]byte, wire.RecordSize)
	copy(raw, unsafe.Slice((*byte)(unsafe.Pointer(&r.val.Ev)), wire.RecordSize))
	return raw
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

func newOwnBinary(bin *symbols.Binary, o *rt.Offsets, clock wire.Clock) (*ownBinary, error) {
	id, err := buildID(selfExe)
	if err != nil {
		return nil, err
	}
	cfg := decoderConfig(o, clock)
	cfg.StackDepth = decode.MaxFrames
	cfg.Scope, cfg.MissScope = nil, nil
	return &ownBinary{bias: bin.LoadBias(), exeID: id, dec: wire.NewDecoder(cfg)}, nil
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
	return newOwnBinary(bin, o, clock)
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
	raw := r.raw()
	var dec *wire.Decoder
	if o != nil && r.val.ExeId == o.exeID {
		wire.Rebase(raw, int64(o.bias-r.val.Bias))
		dec = o.dec
	} else {
		wire.Strip(raw)
		dec = wire.NewDecoder(wire.Config{})
	}
	wire.SetKind(raw, decode.PreviousCrash)
	if err := dec.Decode(raw, ev); err != nil && !errors.Is(err, wire.ErrRuntimeOwned) {
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
