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
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/go-logr/logr"
	"golang.org/x/sys/unix"
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
	it := s.m.Iterate()
	for it.Next(&key, &val) {
		if key == s.key {
			continue
		}
		// The clock after the read: a crash written just before the read
		// is no later than now.
		now, _ := kernelMono()
		if val.Crashed == 0 && checkEntry(key, &val, now) == "" {
			gone, why := s.ownerGone(key, &val)
			if !gone {
				continue
			}
			// The owner may have crashed between the read and the proof
			// (its last act is the BPF program's write of the record):
			// read the entry again, final now that its owner is gone.
			collectReread(key)
			if err := s.m.Lookup(key, &val); err != nil {
				continue
			}
			now, _ = kernelMono()
			if val.Crashed == 0 {
				log.V(1).Info("removing the crash entry of a process that is gone", "pid", val.Pid, "proof", why)
				del = append(del, key)
				continue
			}
		}
		if why := checkEntry(key, &val, now); why != "" {
			log.Info("crash record damaged: removed, not reported", "path", s.path, "pid", val.Pid, "reason", why)
			damaged++
			del = append(del, key)
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

// collectReread runs before collect reads again the entry of a process it
// has just proven gone; a test sets it to crash that process in between.
var collectReread = func(key uint64) {}

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
