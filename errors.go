package mapguard

import "github.com/mapguard/mapguard/probe"

// Errors returned by Start. Test for them with errors.Is.
var (
	// ErrNotSupported: the OS, architecture, kernel or Go version cannot be
	// watched (mapguard needs Linux on amd64, kernel 5.15 or later, and Go
	// 1.25 or 1.26).
	ErrNotSupported = probe.ErrNotSupported
	// ErrPermission: the process lacks CAP_SYS_ADMIN (or CAP_BPF with
	// CAP_PERFMON, on kernels that accept them for uprobes).
	ErrPermission = probe.ErrPermission
	// ErrLayoutMismatch: the runtime layouts mapguard reads did not verify
	// in this process, so it refused to attach.
	ErrLayoutMismatch = probe.ErrLayoutMismatch
	// ErrResourceLimit: a resource limit of the process stopped the probes
	// from loading, most often RLIMIT_NOFILE (each probe site, BPF map and
	// program holds a file descriptor) or RLIMIT_MEMLOCK on kernels before
	// 5.11. The message names the limit; raise it and call Start again.
	ErrResourceLimit = probe.ErrResourceLimit
	// ErrBusy: the process was too busy (many runnable goroutines) for the
	// Guard's own goroutines to run within seconds, so its canary event
	// was recorded but not read; the layout is fine. Start may be retried.
	ErrBusy = probe.ErrBusy
	// ErrStarted: Start was called while the Guard was starting or running.
	ErrStarted = probe.ErrStarted
	// ErrClosed: the Guard was closed.
	ErrClosed = probe.ErrClosed
)
