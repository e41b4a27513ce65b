// Package mapguard lets a Go service watch its own map operations with eBPF
// and act on misuse before it becomes an outage.
//
// Go's map misuse is silent or fatal: a read of a missing key quietly
// returns a zero value, and so does a read from a nil map (which is what
// m[a][b] is when m[a] is missing); a write to a nil map panics, which
// net/http recovers per request so that nobody sees it; concurrent writes
// kill the process with a report that names one side; maps never shrink.
// A Guard attaches uprobes to the process's own runtime map functions and
// turns these into typed events carrying the user's call site (file:line),
// the goroutine, and the map's type, delivered on a channel and to
// callbacks, so that a service can count them, alert, and flip a downgrade
// switch (see Breaker).
//
// The default kinds: NilMapWrite, NilMapRead, MissingKeyRead (single-value
// reads only, in the main module's packages, aggregated per call site),
// MapGrowth, MapBloat, UnhashableKey and ConcurrentMisuse. The last one
// kills the process right after it is detected; the BPF program writes it
// into a crash record pinned under /sys/fs/bpf/mapguard, which the next
// Start of the same program delivers as a PreviousCrash event and
// ReadCrashReports reads without a Guard.
//
//	g, err := mapguard.New(mapguard.Options{})
//	if err != nil { ... }
//	if err := g.Start(ctx); err != nil {
//		log.Printf("map watching off: %v", err) // the service runs on regardless
//	}
//	defer g.Close()
//	g.OnEvent(func(ev mapguard.Event) { log.Print(ev) })
//
// # Requirements
//
// Linux on amd64, kernel 5.15 or later (6.10 or later uses one uprobe_multi
// link per site; older kernels use perf-event uprobes, which are slower to
// detach: 0.5-0.7 s for nine of them, closed in parallel, on Debian's 6.1),
// the binary built by Go 1.25 or 1.26, and
// CAP_SYS_ADMIN (perf-event uprobes require it on current kernels; with
// uprobe_multi links, CAP_BPF and CAP_PERFMON were enough on 6.18). Stripped
// (-ldflags=-s -w) and PIE binaries work: functions are found through
// .gopclntab, which every Go binary has. On any other platform the package
// compiles and Start returns ErrNotSupported.
//
// # Cost
//
// The default kinds probe only blocks that run when something is wrong, or
// rarely: the branch a map assignment takes when the map is nil, the blocks
// a read takes when it returns the zero value, the growth of a large map's
// tables (O(log n) times per map), a delete that empties a map, clear(m),
// the unhashable-key panic and the runtime's fatal error. A healthy
// operation that finds its key pays nothing. A hit costs a trap: about 1 us
// at an instruction the kernel emulates and 6 to 23 us at one it
// single-steps, measured on the project's VMs (bare metal is several times
// cheaper). The miss blocks start with single-stepped instructions, and
// misses are common on healthy paths (a set lookup, if seen[k]), so a watched
// miss costs one single-stepped trap; a probe site that fires more often
// than Options.SiteRateLimit per second is detached and re-armed after a
// back-off (Stats shows it), which bounds the cost and makes the counts of
// a busy site a lower bound.
//
// # Deep watching
//
// MissingKeyDelete, NilMapDelete and SharedWriters (list them in
// Options.Detect) and Options.OpStats (operations per call site, read with
// Guard.OpStats) probe every operation of a kind, after the stack check of
// each runtime map entry point, where the kernel emulates the instruction
// (about 1 us a hit on the project's VMs). They are kept within
// Options.Budget (default 1% of one CPU): Start measures the cost of one hit,
// and a governor detaches the deep probes when their share of CPU time is
// spent and attaches them again when it has been earned back. Stats().Deep
// reports the measured cost, the duty cycle and the estimated overhead.
// Delete events carry a salted hash of the key and its length; key bytes
// leave the kernel only with Options.CaptureKeys, through that redaction
// function.
//
// # Lifecycle
//
// New validates options and attaches nothing. Start finds the runtime's map
// functions in the running binary, decodes each one from its first byte to
// choose probe sites on instruction boundaries, verifies the runtime
// layouts it will read against maps it builds itself, loads the BPF
// program, attaches it (filtered to this process), and provokes one canary
// event that must come back with the right goroutine, call site and map
// type before Start returns nil. Events then flow until ctx is done or Close
// is called. The Guard's own goroutines are excluded in the kernel, so its
// work never produces events.
//
// # Errors
//
// Start returns errors that wrap ErrNotSupported (platform, kernel, Go
// version, or a kind this build cannot watch), ErrPermission (capabilities), ErrLayoutMismatch (the runtime did
// not look as expected, so nothing was attached) or ErrClosed. In every
// case nothing is left running and the process behaves as if mapguard were
// not there. Events are never waited for: what does not fit in a buffer is
// counted in Stats.
//
// # Testing
//
// Options.Probe takes a probe.Fake, whose Emit delivers an event as the
// kernel would, so that code reacting to events can be unit tested without
// privileges.
package mapguard
