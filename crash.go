package mapguard

import "github.com/mapguard/mapguard/probe"

// ReadCrashReports returns the reports of processes of the program at
// path ("" for this program) that died of a concurrent map misuse while a
// Guard watched them, as PreviousCrash events, without a Guard and without
// removing them (the next Guard to start delivers and removes them).
//
// A report holds the runtime's message (Detail), the goroutine that hit it,
// the time, the PID and, for a report written by this very binary, the
// call site, stack and map type. It needs the privileges to open pinned
// BPF maps (root). No reports is a nil slice and a nil error.
func ReadCrashReports(path string) ([]Event, error) {
	return probe.ReadCrashes(path)
}
