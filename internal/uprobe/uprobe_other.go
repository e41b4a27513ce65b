//go:build !(linux && amd64)

package uprobe

import (
	"context"
	"fmt"
	"runtime"

	"github.com/mapguard/mapguard/decode"
	"github.com/mapguard/mapguard/probe"
)

type unsupported struct{}

func newUprobes(Config) probe.Probe { return unsupported{} }

func (unsupported) Start(context.Context, probe.Sink) error {
	return fmt.Errorf("start probe: %s/%s: %w", runtime.GOOS, runtime.GOARCH, probe.ErrNotSupported)
}
func (unsupported) Ignore(uint64) error { return probe.ErrClosed }
func (unsupported) Stats() probe.Stats  { return probe.Stats{} }
func (unsupported) Close() error        { return nil }

// ReadCrashes needs Linux on amd64.
func ReadCrashes(string) ([]decode.Event, error) {
	return nil, fmt.Errorf("read crash records: %s/%s: %w", runtime.GOOS, runtime.GOARCH, probe.ErrNotSupported)
}
