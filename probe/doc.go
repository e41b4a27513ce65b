// Package probe is where mapguard meets the kernel.
//
// A Probe watches the process's own Go map operations and hands each
// detected misuse to a Sink as a decode.Event. There are two
// implementations:
//
//   - NewUprobes attaches eBPF uprobes to the running process's own runtime
//     map functions (Linux, amd64, Go 1.25 and 1.26). It finds the functions
//     in .gopclntab, decodes each one from its first byte to choose probe
//     sites on instruction boundaries, verifies the runtime layouts it reads,
//     and proves the whole path with a canary event before Start returns.
//   - Fake is driven by tests: Emit hands an event to the sink exactly as a
//     real probe would, with no privileges and no kernel.
//
// Probes never block the goroutine that hit them: the BPF program writes to
// a ring buffer without waking the reader, and a full buffer is counted, not
// waited on. One cost governor (governor.go) keeps every site within one
// CPU budget, from what a hit costs on this machine (the trap, calibrated
// at Start and every minute, plus the program's run time, measured in the
// kernel): under budget every occurrence is counted; over it, the costliest
// sites are sampled in short windows, so that no site can eat the CPU and
// none goes silent.
//
// Two BPF programs serve the sites: mapguard_site the always-on ones (nil
// maps, misses aggregated per call site, growth, bloat, the unhashable-key
// panic, the fatal error and its crash record), mapguard_deep the deep ones
// (operation counts, writers, deletes). Each program holds only its half,
// which keeps the verifier's work small.
package probe
