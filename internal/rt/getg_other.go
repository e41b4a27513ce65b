//go:build !amd64

package rt

import "unsafe"

// getg is only known on amd64, the one architecture mapguard probes.
func getg() unsafe.Pointer { return nil }
