// Package rt knows the few Go runtime layouts mapguard reads from BPF and
// checks them in the live process.
//
// What the process can show is derived at Load: the goroutine id's offset
// in runtime.g from the current goroutine, and the map type's GroupSize from
// map types this package names. The rest (the swiss map header, its tables,
// internal/abi.Type) is a table that has held from Go 1.24 to 1.27. Verify
// then checks every offset against maps this package builds itself and
// against the goroutine id the runtime reports, and the loader refuses to
// attach if anything does not match.
package rt
