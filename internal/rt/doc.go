// Package rt knows the few Go runtime layouts mapguard reads from BPF, for
// the Go versions it supports, and checks them in the live process.
//
// The offsets are chosen at compile time by build tag: mapguard is compiled
// into the host with the host's own toolchain, so the tag names exactly the
// runtime the process runs. Verify then checks them against a map this
// package builds itself and against the goroutine id the runtime reports,
// and the loader refuses to attach if anything does not match.
package rt
