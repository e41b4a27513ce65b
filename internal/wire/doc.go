// Package wire turns the BPF program's raw records into decode.Events.
//
// The record layout is struct event in bpf/src/mapguard.h; internal/uprobe's
// TestWireMatchesBPF compares this package's offsets with the declaration
// bpf2go generates. The Decoder parses a record, converts the BPF clock to
// wall time, resolves return PCs to the user's call site in-process with
// runtime.CallersFrames (blaming the frame that did the map operation, not
// reflect or the runtime), and names the map type from the runtime type
// pointer. Results are cached per PC, per stack and per type, so decoding
// allocates nothing once a program's call sites have been seen.
//
// A Decoder is used by one goroutine at a time. Any byte slice is safe input:
// a record of the wrong size or with out-of-range fields is an error, never a
// panic. What does not come from a ring buffer is never encoded to be
// decoded again: aggregated counts and operation statistics are built as a
// Rec and decoded with DecodeRec, and another process's crash record is
// parsed, then adjusted as a Rec (Rebase, Strip).
package wire
