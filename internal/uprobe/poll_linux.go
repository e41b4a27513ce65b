//go:build linux && amd64

package uprobe

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"
)

// How the Guard's goroutines wait. Not in a blocking system call: a
// goroutine blocked in epoll_wait holds a thread in a system call, and the
// Go runtime's sysmon, which retakes such threads' Ps, then cannot back
// off to its long sleep. Three such goroutines (the readers and the waker)
// cost the process 1.2-4% of a CPU in sysmon alone (bench/sysmon shows it
// without mapguard). So the readers drain their rings without blocking on
// a timer (records are submitted without a wake-up, and read every poll
// interval anyway), and the waker, which the kernel must be able to wake,
// waits in Go's netpoller on the ring's file descriptor.

// past is a deadline that has passed: a ReadInto with it never blocks.
var past = time.Unix(1, 0)

// drain reads every record in r without blocking, handing each to fn. It
// returns false once r is closed. An empty ring is told from its shared
// memory, without a system call (each wakes sysmon, see threadCPU); r is
// closed only once its goroutine has returned (teardown).
func drain(r *ringbuf.Reader, rec *ringbuf.Record, fn func(raw []byte)) bool {
	if r.AvailableBytes() == 0 {
		return true
	}
	r.SetDeadline(past)
	for {
		err := r.ReadInto(rec)
		switch {
		case err == nil:
			fn(rec.RawSample)
		case errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, ringbuf.ErrFlushed):
			return true
		default: // closed
			return false
		}
	}
}

// pollFile returns the BPF map fd as an os.File in Go's netpoller (a
// duplicate, non-blocking), so that a goroutine can wait for the kernel's
// wake-up on it without holding a thread.
func pollFile(fd int, name string) (*os.File, error) {
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("dup %s: %w", name, err)
	}
	if err := unix.SetNonblock(dup, true); err != nil {
		unix.Close(dup)
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return os.NewFile(uintptr(dup), name), nil
}
