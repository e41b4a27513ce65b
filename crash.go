package mapguard

import "github.com/mapguard/mapguard/internal/uprobe"

// ReadCrashReports returns the reports of processes of the program at
// path ("" for this program) that died of a concurrent map misuse while a
// Guard watched them, as PreviousCrash events, without a Guard and without
// removing them (the next Guard to start delivers and removes them).
//
// path is the path the program is started as: a symlink such as
// current/app names the program whatever release it points to; if nothing
// is recorded under path, the file it resolves to is tried.
//
// A report holds the runtime's message (Detail), the goroutine that hit it,
// the time, the PID (as its PID namespace saw it) and, for a report written
// by this very build, the call site, stack and map type. Records that fail
// a check (see the README) are left out. It needs the privileges to open
// pinned BPF maps (root). No reports is a nil slice and a nil error.
func ReadCrashReports(path string) ([]Event, error) {
	evs, err := uprobe.ReadCrashes(path)
	out := make([]Event, len(evs))
	for i := range evs {
		out[i] = eventOf(&evs[i])
	}
	return out, err
}
