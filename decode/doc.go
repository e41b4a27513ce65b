// Package decode defines the event model that probes deliver: Event, Kind,
// Frame and Peer.
//
// It is what a custom probe.Probe (or a test driving mapguard.Fake) builds and
// hands to its Sink; package mapguard copies each event into its own Event,
// which is what users of a Guard see. Turning the BPF program's raw records
// into events (the wire codec, symbolization, the map type's name) is
// internal (internal/wire).
package decode
