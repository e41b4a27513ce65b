//go:build !(linux && amd64)

package probe

import (
	"context"
	"fmt"
	"runtime"

	"github.com/mapguard/mapguard/decode"
)

type unsupported struct{}

func newUprobes(UprobeConfig) Probe { return unsupported{} }

func (unsupported) Start(context.Context, Sink) error {
	return fmt.Errorf("start probe: %s/%s: %w", runtime.GOOS, runtime.GOARCH, ErrNotSupported)
}
func (unsupported) Ignore(uint64) error { return ErrClosed }
func (unsupported) Stats() Stats        { return Stats{} }
func (unsupported) Close() error        { return nil }

// ReadCrashes needs Linux on amd64.
func ReadCrashes(string) ([]decode.Event, error) {
	return nil, fmt.Errorf("read crash records: %s/%s: %w", runtime.GOOS, runtime.GOARCH, ErrNotSupported)
}
