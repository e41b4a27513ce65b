//go:build go1.27

package rt

// No offsets are known for this Go release: mapguard refuses to attach
// rather than guess. Supporting a new release means checking its runtime
// layouts and adding it to offsets_supported.go.
var known *Offsets
