//go:build !linux

package symbols

import (
	"errors"
	"fmt"
)

// OpenSelf reads the function table of the running executable. It needs
// /proc, so on this system it returns an error wrapping
// errors.ErrUnsupported.
func OpenSelf() (*Binary, error) {
	return nil, fmt.Errorf("open self: %w", errors.ErrUnsupported)
}
