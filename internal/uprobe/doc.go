// Package uprobe is mapguard's eBPF probe: it attaches uprobes to the
// running process's own runtime map functions (Linux, amd64, Go 1.25 to
// 1.27) and delivers what they see to a probe.Sink.
//
// Data flows one way: the binary's functions (package symbols) give the
// probe sites (internal/x86site decodes each function from its first byte
// and picks instructions on its boundaries; sites_linux.go says which instruction
// serves which kind), the sites are attached with the BPF program (load_linux.go,
// attach_linux.go), the kernel writes records to ring buffers, the reader
// (reader_linux.go) hands each record to internal/wire's decoder, and the event
// goes to the sink. Beside that path:
//
//   - the cost governor (governor.go and governor_window.go, pure
//     arithmetic; govern_linux.go, its execution: attaching and detaching
//     sites, the waker; calibrate_linux.go, what a trap and a link cost on
//     this machine; sample_linux.go, what the traps cost in this process,
//     from samples of its threads) keeps every site within one CPU budget;
//   - the Guard's goroutines never wait for records in a blocking system
//     call (poll_linux.go): the Go runtime's sysmon would spin for them;
//     attaches and detaches, which block in the kernel for a grace
//     period, run in goroutines of their own, off the probe's lock
//     (govern_linux.go), and take turns (lane.go): a thread blocked in
//     the kernel keeps its P until sysmon retakes it, and two at once
//     stopped a two-CPU program;
//   - the crash record (crash_linux.go, crashid_linux.go, crashread_linux.go) pins what a fatal concurrent map
//     misuse left in the kernel, for the next Start;
//   - checks_linux.go turns the kernel's refusals into the typed errors of
//     package probe.
//
// Probes never block the goroutine that hit them: the BPF program writes to
// a ring buffer without waking the reader, and a full buffer is counted per
// kind, not waited on.
//
// Two BPF programs serve the sites: mapguard_site the always-on ones (nil
// maps, misses aggregated per call site, growth, bloat, the unhashable-key
// panic, the fatal error and its crash record), mapguard_deep the deep ones
// (operation counts, writers, deletes). Each program holds only its half,
// which keeps the verifier's work small. A third, mapguard_sample, runs on
// the CPU's timer interrupt (a raw tracepoint) for the trap sampler, not on
// a probe. The program's source is in
// ../../bpf/src; mapguard_x86_bpfel.go and .o are generated from it by
// `go generate` in package bpf.
package uprobe
