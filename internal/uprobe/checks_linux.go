//go:build linux && amd64

package uprobe

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"golang.org/x/sys/unix"

	"github.com/mapguard/mapguard/probe"
)

// checkCapabilities fails fast without the capabilities BPF and uprobes
// need, before anything is created.
func checkCapabilities() error {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return fmt.Errorf("start probe: read capabilities: %w", err)
	}
	has := func(c uint) bool { return data[c/32].Effective&(1<<(c%32)) != 0 }
	if has(unix.CAP_SYS_ADMIN) || (has(unix.CAP_BPF) && has(unix.CAP_PERFMON)) {
		return nil
	}
	return fmt.Errorf("start probe: need CAP_SYS_ADMIN (or CAP_BPF and CAP_PERFMON): %w", probe.ErrPermission)
}

// checkKernel requires ring buffers (5.8) and uprobe attach cookies (5.15).
func checkKernel() error {
	for what, err := range map[string]error{
		"BPF ring buffer":    features.HaveMapType(ebpf.RingBuf),
		"uprobe BPF cookies": features.HaveProgramHelper(ebpf.Kprobe, asm.FnGetAttachCookie),
	} {
		switch {
		case err == nil:
		case errors.Is(err, ebpf.ErrNotSupported):
			return fmt.Errorf("start probe: kernel lacks %s: %w", what, probe.ErrNotSupported)
		case errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES):
			return fmt.Errorf("start probe: probe for %s: %w: %w", what, probe.ErrPermission, err)
		default:
			return fmt.Errorf("start probe: probe for %s: %w", what, err)
		}
	}
	return nil
}

// classify makes every error Start returns wrap one sentinel. Errors that
// already do pass through; the rest are told apart by their errno, and what
// is left means this environment cannot be watched (ErrNotSupported), with
// the cause kept.
func classify(err error) error {
	switch {
	case err == nil,
		errors.Is(err, probe.ErrNotSupported), errors.Is(err, probe.ErrPermission),
		errors.Is(err, probe.ErrResourceLimit), errors.Is(err, probe.ErrLayoutMismatch),
		errors.Is(err, probe.ErrStarted), errors.Is(err, probe.ErrClosed), errors.Is(err, probe.ErrBusy),
		errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return err
	case errors.Is(err, unix.EMFILE), errors.Is(err, unix.ENFILE):
		return fmt.Errorf("%w: out of file descriptors (raise RLIMIT_NOFILE): %w", probe.ErrResourceLimit, err)
	case errors.Is(err, unix.ENOMEM):
		return fmt.Errorf("%w: out of memory for BPF objects (raise RLIMIT_MEMLOCK on kernels before 5.11): %w", probe.ErrResourceLimit, err)
	case errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES):
		return fmt.Errorf("%w: %w", probe.ErrPermission, err)
	default:
		return fmt.Errorf("%w: %w", probe.ErrNotSupported, err)
	}
}

// checkFiles fails with ErrResourceLimit when fewer than need file
// descriptors are left under RLIMIT_NOFILE. Without the check a low limit
// surfaces as a misleading error from the kernel feature probes (a BPF map
// that cannot be created reads as a kernel that lacks the map type).
func checkFiles(need int) error {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		return nil // nothing to say; the loads will tell
	}
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return fmt.Errorf("start probe: count open files: %w (is /proc mounted?): %w", probe.ErrNotSupported, err)
	}
	if free := int64(lim.Cur) - int64(len(entries)); free < int64(need) {
		return fmt.Errorf("start probe: %w: %d file descriptors open of RLIMIT_NOFILE %d, and the probes need about %d more: raise the limit",
			probe.ErrResourceLimit, len(entries), lim.Cur, need)
	}
	return nil
}
