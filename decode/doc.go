// Package decode turns the BPF program's raw records into typed events.
//
// It defines the event model that package mapguard re-exports (Event, Kind,
// Frame) and the Decoder, which parses a record, converts the BPF clock to
// wall time, resolves return PCs to the user's call site in-process with
// runtime.CallersFrames, and names the map type from the runtime type
// pointer. Results are cached per PC, per stack and per type, so decoding
// allocates nothing once a program's call sites have been seen.
//
// A Decoder is used by one goroutine at a time. Any byte slice is safe input:
// a record of the wrong size or with out-of-range fields is an error, never a
// panic.
package decode
