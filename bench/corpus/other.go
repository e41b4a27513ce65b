//go:build !linux

// Command corpus runs mapguard's precision corpus; it needs Linux (see
// README.md).
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "corpus: mapguard's precision corpus runs on Linux only")
	os.Exit(2)
}
