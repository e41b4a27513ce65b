// Package mapguard lets a Go service watch its own map operations with eBPF
// and act on misuse before it becomes an outage.
//
// Go's map misuse is silent or fatal: a read of a missing key quietly
// returns a zero value, and so does a read from a nil map (which is what
// m[a][b] is when m[a] is missing); a write to a nil map panics, which
// net/http recovers per request so that nobody sees it; concurrent writes
// kill the process with a report that names one side; maps never shrink.
// A Guard attaches uprobes to the process's own runtime map functions (and,
// for m[a][b], to the inner read's call in the program's own code) and
// turns these into typed events carrying the user's call site (file:line),
// the goroutine, and the map's type, delivered on a channel and to
// callbacks, so that a service can count them, alert, and flip a downgrade
// switch (see Breaker).
//
// The default kinds: NilMapWrite, NestedMapMiss, MapGrowth, MapBloat,
// UnhashableKey and ConcurrentMisuse as events; NilMapRead and
// MissingKeyRead (single-value reads only, in the main module's packages)
// as per-call-site statistics (Stats().CallSites), since a read of a
// missing key or of a nil map is as often an idiom as a bug (list them in
// Options.Detect for events: one per new call site, then counts). A
// comma-ok read is never an event. ConcurrentMisuse
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
// the binary built by Go 1.25, 1.26 or 1.27 (a newer release is accepted
// when its layouts derive and verify), and
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
// the unhashable-key panic and the runtime's fatal error; and, for
// NestedMapMiss, the CALL of each inner read of m[a][b] that Start finds in
// the program's own code (up to 32; emulated, and taken only where such an
// expression runs: Start reads the executable's text once to find them,
// about 2-20 ms of CPU). A healthy
// operation that finds its key pays nothing. A hit costs a trap: about 1 us
// at an instruction the kernel emulates and 6 to 23 us at one it
// single-steps, measured on the project's VMs (bare metal is several times
// cheaper). The miss blocks start with single-stepped instructions, and
// misses are common on healthy paths (a set lookup, if seen[k]), so a watched
// miss costs one single-stepped trap.
//
// # The budget
//
// Every probe, default or deep, lives under one CPU budget (Options.Budget,
// default 1% of one CPU). Start measures what a trap costs on this machine
// at both kinds of instruction, the kernel measures what the BPF program
// adds at each site, and a governor books every hit at its site's cost.
// Under budget every occurrence is counted exactly. When the budget is
// spent, the costliest sites are sampled: attached for a short window every
// second (less often only if even that would break the budget, or, for the
// sites that only count statistics, while their second has no room, and
// for a site whose last 256 hits gave nothing, all filtered out: 4 s),
// their counts scaled by the time attached and their events marked
// Sampled. The budget is kept per second, not only on average: what
// may be spent is a second's budget less what the last second spent.
// Stats().Budget and Stats().Sites show the measured costs, the rates and
// what is sampled; Stats().Budget.WorstSecond is the most spent in any
// one second since Start. The first second after Start under load is the
// dearest: the hot sites trap until the governor first runs.
//
// # Deep watching
//
// MissingKeyDelete, NilMapDelete and SharedWriters (list them in
// Options.Detect, which adds them to the defaults) and Options.OpStats
// (operations per call site, read with Guard.OpStats) probe every operation of a kind, after the stack check of
// each runtime map entry point, where the kernel emulates the instruction
// (about 1 us a hit on the project's VMs), under the same budget.
// Delete events carry a salted hash of the key and its length; key bytes
// leave the kernel only with Options.CaptureKeys, through that redaction
// function.
//
// # Lifecycle
//
// New validates options and attaches nothing. Start finds the runtime's map
// functions in the running binary, decodes each function from its first
// byte to choose probe sites on instruction boundaries, verifies the
// runtime layouts it will read against maps it builds itself, loads the
// BPF program, attaches it (filtered to this process), and provokes one
// canary event that must come back with the right goroutine, call site
// and map type before Start returns nil. Events then flow until ctx is
// done or Close is called. The program's own nested reads (m[a][b]) are
// searched for beside Start, which waits at most 10 ms more for it: a
// small program's are watched at their own sites when Start returns; on a
// large program what is left is paced to half the budget, and its sites
// are attached when found (seconds after Start); until then the runtime's
// sites see them, when the governor has them attached. The Guard's own goroutines are excluded in the
// kernel, so its work never produces events.
//
// # Errors
//
// Every error Start returns wraps one of ErrNotSupported (platform, kernel
// or Go version, or a kind this build cannot watch), ErrPermission (capabilities), ErrResourceLimit (a limit
// such as RLIMIT_NOFILE, named in the message), ErrLayoutMismatch (the
// runtime did not look as expected, so nothing was attached), ErrBusy (the
// process was too busy for the Guard's goroutines to run), ErrStarted,
// ErrClosed, or the error of Start's context. In every case nothing is
// left running and the process behaves as if mapguard were not there;
// Close and Events are safe, and after a refusal Start may be called
// again. Events are never waited for: what does not fit in a buffer is
// counted in Stats. Close waits at most a second for a callback that does
// not return.
//
// A started Guard runs goroutines of its own; GoroutineFunctions names
// them for leak checkers such as goleak.
//
// # Testing
//
// Options.Probe takes a Fake, whose Emit delivers an event as the
// kernel would, so that code reacting to events can be unit tested without
// privileges.
package mapguard
