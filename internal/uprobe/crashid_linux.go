//go:build linux && amd64

package uprobe

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

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

// selfLoadBias is the difference between this process's runtime and
// link-time addresses, AT_ENTRY less the ELF entry point, as
// symbols.OpenSelf finds it (Start checks that the two agree): the crash
// store needs it before the symbols are read.
func selfLoadBias() (uint64, error) {
	const atEntry = 9
	f, err := elf.Open(selfExe)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	auxv, err := unix.Auxv()
	if err != nil {
		return 0, fmt.Errorf("read auxiliary vector: %w", err)
	}
	for _, kv := range auxv {
		if kv[0] == atEntry {
			return uint64(kv[1]) - f.Entry, nil
		}
	}
	return 0, errors.New("read auxiliary vector: no AT_ENTRY")
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
