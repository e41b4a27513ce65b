// Package debughttp serves a Guard's figures and events over HTTP, in the
// style of net/http/pprof: an http.Handler a service mounts on its debug
// mux.
//
//	mux.Handle("/debug/mapguard/", debughttp.New(g, debughttp.Options{}))
//
// Under the mount point it serves
//
//	/            an index page
//	stats        the Guard's counters as JSON (Stats)
//	sites        call sites with events, probe sites and operation counts as JSON (Sites)
//	events       events as server-sent events (?kind=nil-map-write&kind=... filters, ?since=5m replays recent ones)
//	crashes      crash reports (PreviousCrash and ConcurrentMisuse) as JSON (Crashes)
//
// It is read-only: it answers GET and HEAD and changes nothing in the
// Guard. Events carry what the Guard delivers and no more: never key
// bytes, only the output of Options.CaptureKeys when the service set one.
//
// Exposing it: like pprof, the handler tells whoever reaches it where the
// service's code misuses maps (file names, lines, function names and map
// types). Serve it on a loopback or cluster-internal debug port, never on
// a public listener, or put it behind the service's own authentication.
// kubectl-mapguard reaches it through a port-forward.
//
// Event streams: one OnEvent callback fans each event out to every
// watcher's bounded buffer (Options.WatcherBuffer). A watcher whose buffer
// is full is dropped (its stream ends with a "dropped" message), so a slow
// client never delays the Guard or the other watchers.
package debughttp
