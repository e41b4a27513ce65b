package rt

import "unsafe"

// getg returns the current goroutine's runtime.g (R14 in ABIInternal; the
// assembly reads it from TLS, which holds the same pointer).
func getg() unsafe.Pointer
