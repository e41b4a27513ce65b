//go:build linux && amd64

package uprobe

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"

	"github.com/mapguard/mapguard/decode"
	"github.com/mapguard/mapguard/internal/rt"
	"github.com/mapguard/mapguard/internal/wire"
	"github.com/mapguard/mapguard/probe"
)

// decoderConfig is the decoding shared by the live reader and crash
// records: type names, the program's scope, the map type at a call site,
// and the bytes a map holds.
func decoderConfig(o *rt.Offsets, clock wire.Clock) wire.Config {
	scope := wire.ProgramScope()
	miss := wire.ModuleScope()
	return wire.Config{
		Clock:        clock,
		TypeName:     rt.TypeString,
		Scope:        &scope,
		MissScope:    &miss,
		CallSiteType: func(pc uintptr) uintptr { return callSiteType(o, pc) },
		MapBytes: func(typ uintptr, capacity uint64) uint64 {
			return rt.MapBytes(typ, capacity, o)
		},
	}
}

// loading is the BPF collection being loaded, on a goroutine of its own:
// the kernel's verifier takes most of what loading costs, and it needs
// neither the symbols nor the sites, which Start reads and chooses
// meanwhile.
type loading struct {
	done chan struct{}
	coll *ebpf.Collection
	err  error
	// stats is where the per-site counters lie in their section's map
	// (see readCounters); counts, the trap sampler's, in the same one (nil:
	// the sampler is not loaded, for the reason in noSampler).
	stats, counts *ebpf.VariableSpec
	noSampler     error
}

// startLoadLocked starts preparing the collection (the crash store,
// every variable, the sizes) and loading it. Until wait or discard has
// returned, the loading goroutine owns the crash fields of u (crash,
// crashPath, pending, crashDamaged, crashErr, own) and Start must not
// touch them; it reads only the configuration and what Start set before.
func (u *uprobes) startLoadLocked(o *rt.Offsets) *loading {
	l := &loading{done: make(chan struct{})}
	go func() {
		defer close(l.done)
		spec, opts, err := u.prepareLoadLocked(o)
		if err != nil {
			l.err = err
			return
		}
		l.stats = spec.Variables[mapguardVarStats]
		if c := spec.Variables[mapguardVarSampleCounts]; c != nil && c.SectionName == l.stats.SectionName {
			l.counts = c
		}
		l.coll, l.err = loadCollection(spec, opts)
		if l.err != nil && spec.Programs[mapguardProgMapguardSample] != nil {
			// The trap sampler is optional: a kernel that refuses its
			// program (a perf_event program reading the task's user registers
			// through BTF helpers) runs without it.
			l.noSampler = l.err
			delete(spec.Programs, mapguardProgMapguardSample)
			l.counts = nil
			l.coll, l.err = loadCollection(spec, opts)
		} else if l.counts == nil {
			l.noSampler = errors.New("sample counts not beside the site counters")
		}
	}()
	return l
}

// wait returns the loaded collection, which the caller then owns; l.stats
// is then set too.
func (l *loading) wait() (*ebpf.Collection, error) {
	<-l.done
	coll := l.coll
	l.coll = nil
	return coll, l.err
}

// discard waits for the load to end and closes the collection unless wait
// took it, so that a Start that fails leaves nothing behind.
func (l *loading) discard() {
	if l == nil {
		return
	}
	<-l.done
	if l.coll != nil {
		l.coll.Close()
		l.coll = nil
	}
}

// prepareLoadLocked is long because it sets every variable the BPF program
// reads, in one place, next to the checks of each.
func (u *uprobes) prepareLoadLocked(o *rt.Offsets) (*ebpf.CollectionSpec, ebpf.CollectionOptions, error) {
	var opts ebpf.CollectionOptions
	spec, err := loadMapguard()
	if err != nil {
		return nil, opts, fmt.Errorf("start probe: %w", err)
	}
	if u.own != nil {
		take, err := acquireCrashStore(spec.Maps[mapguardMapCrashes], u.own, u.log)
		if err != nil {
			// The crash is still seen live if the reader is quick enough;
			// only the record that outlives it is missing.
			u.crashUnavailableLocked(err)
		} else {
			u.crash, u.crashPath, u.pending, u.crashDamaged = take.store, take.store.path, take.pending, take.damaged
		}
	}
	frames := uint32(min(decode.MaxFrames, 6+u.cfg.StackDepth))
	for name, v := range map[string]any{
		mapguardVarGoidOffset:            o.GoID,
		mapguardVarMapUsedOffset:         o.MapUsed,
		mapguardVarMapSeedOffset:         o.MapSeed,
		mapguardVarTypeKindOffset:        o.TypeKind,
		mapguardVarMaxFrames:             frames,
		mapguardVarGrowthThreshold:       u.cfg.growthThreshold(),
		mapguardVarMapDirPtrOffset:       o.MapDirPtr,
		mapguardVarMapDirLenOffset:       o.MapDirLen,
		mapguardVarMapGlobalDepthOffset:  o.MapGlobalDepth,
		mapguardVarTableCapacityOffset:   o.TableCapacity,
		mapguardVarTableLocalDepthOffset: o.TableLocalDepth,
		mapguardVarCrashKey:              u.crashKey(),
		mapguardVarKeySalt:               randomSalt(),
		mapguardVarCaptureKeys:           uint32(boolInt(u.cfg.CaptureKeys != nil)),
		mapguardVarSharedWindowNs:        uint64(u.cfg.sharedWindow()),
		mapguardVarMapTypeKeyOffset:      o.MapTypeKey,
		mapguardVarTypeSizeOffset:        o.TypeSize,
	} {
		if err := spec.Variables[name].Set(v); err != nil {
			return nil, opts, fmt.Errorf("start probe: set %s: %w", name, err)
		}
	}
	spec.Maps[mapguardMapEvents].MaxEntries = ringSize(u.cfg.bufferSize())
	if u.deep {
		spec.Maps[mapguardMapDeepEvents].MaxEntries = ringSize(u.cfg.bufferSize())
	}
	if !u.deep {
		delete(spec.Programs, mapguardProgMapguardDeep)
		// Only the deep program writes these (the site program looks up
		// a crash's peer in two of them, which then stay empty): one
		// entry each rather than the kernel preallocating thousands,
		// about 3 ms of a Start.
		for _, name := range []string{mapguardMapDeletes, mapguardMapMapWriters, mapguardMapGoidMap} {
			spec.Maps[name].MaxEntries = 1
		}
	}
	if u.multi {
		for _, p := range spec.Programs {
			if p.Name != mapguardProgMapguardSample {
				p.AttachType = ebpf.AttachTraceUprobeMulti
			}
		}
	}
	if u.crash != nil {
		opts.MapReplacements = map[string]*ebpf.Map{mapguardMapCrashes: u.crash.m}
	}
	return spec, opts, nil
}

// loadCollection creates the maps and loads the programs; the kernel
// verifies each program.
func loadCollection(spec *ebpf.CollectionSpec, opts ebpf.CollectionOptions) (*ebpf.Collection, error) {
	coll, err := ebpf.NewCollectionWithOptions(spec, opts)
	if err != nil {
		var verr *ebpf.VerifierError
		if !errors.As(err, &verr) && (errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES)) {
			return nil, fmt.Errorf("start probe: load BPF: %w: %w", probe.ErrPermission, err)
		}
		if errors.As(err, &verr) {
			// The kernel's verifier rejected the program: this kernel cannot
			// run it (not a privilege, though the errno says EACCES).
			return nil, fmt.Errorf("start probe: load BPF: the kernel's verifier rejected the program: %w: %w", probe.ErrNotSupported, err)
		}
		return nil, fmt.Errorf("start probe: load BPF: %w", err)
	}
	return coll, nil
}

// finishLoadLocked takes the loaded collection and configures the sites
// chosen meanwhile.
func (u *uprobes) finishLoadLocked(coll *ebpf.Collection, stats *ebpf.VariableSpec) error {
	u.coll = coll
	if v := u.log.V(4); v.Enabled() {
		for name, p := range coll.Programs {
			if info, err := p.Info(); err == nil {
				insns, _ := info.VerifiedInstructions()
				v.Info("BPF program loaded", "program", name, "verifiedInstructions", insns)
			}
		}
	}
	u.stats = coll.Variables[mapguardVarStats]
	u.statsMem, u.statsOff = nil, 0
	if m := coll.Maps[stats.SectionName]; m != nil && stats.Size() == uint32(unsafe.Sizeof(u.counters)) {
		if mem, err := m.Memory(); err == nil {
			u.statsMem, u.statsOff = mem, int64(stats.Offset)
		}
	}
	u.costVar = coll.Variables[mapguardVarSiteCost]
	u.spentVar = coll.Variables[mapguardVarSpentNs]
	u.limitVar = coll.Variables[mapguardVarSpendLimit]
	u.genVar = coll.Variables[mapguardVarSiteGen]
	u.ignore = coll.Maps[mapguardMapIgnoredGoids]
	u.ignoredVar = coll.Variables[mapguardVarIgnored]
	u.ignoredMore = coll.Variables[mapguardVarIgnoredMore]
	u.aggs = coll.Maps[mapguardMapAggs]

	sitesMap := coll.Maps[mapguardMapSites]
	for _, s := range u.sites {
		conf := mapguardSiteConf{Kind: uint8(s.kind), Flags: s.flags, MapReg: s.mapReg, TypReg: s.typReg, KeyMode: s.keyMode, WrapRet: s.wrapRet}
		if err := sitesMap.Put(s.index, conf); err != nil {
			return fmt.Errorf("start probe: configure site: %w", err)
		}
	}

	var err error
	u.ex, err = link.OpenExecutable(selfExe)
	if err != nil {
		return fmt.Errorf("start probe: %w", err)
	}
	u.reader, err = ringbuf.NewReader(coll.Maps[mapguardMapEvents])
	if err != nil {
		return fmt.Errorf("start probe: %w", err)
	}
	if u.deep {
		if u.deepReader, err = ringbuf.NewReader(coll.Maps[mapguardMapDeepEvents]); err != nil {
			return fmt.Errorf("start probe: %w", err)
		}
	}
	return nil
}

// checkCanaryLocked provokes one nil-map write on a goroutine of its own and
// checks that it comes back whole: the goroutine id read in BPF, the map type
// and the call site.
func (u *uprobes) checkCanaryLocked(ctx context.Context) error {
	if !u.hasSite(canaryKind, canaryFunc) {
		return fmt.Errorf("start probe: canary function %s not probed: %w", canaryFunc, probe.ErrNotSupported)
	}
	goid := make(chan uint64, 1)
	wake := u.readerWake
	go func() {
		goid <- rt.GoID()
		canaryWrite()
		// The record is in the ring now: wake the reader rather than wait
		// for its next poll (records are submitted without a wake-up).
		select {
		case wake <- struct{}{}:
		default:
		}
	}()
	want := <-goid

	// The reader takes u.mu in its governor tick; let it run while we wait.
	u.mu.Unlock()
	defer u.mu.Lock()
	timer := time.NewTimer(canaryTimeout)
	defer timer.Stop()
	select {
	case ev := <-u.canary:
		switch {
		case ev.Kind != canaryKind:
			return fmt.Errorf("start probe: canary came back as %s, want %s: %w", ev.Kind, canaryKind, probe.ErrLayoutMismatch)
		case ev.Goroutine != want:
			return fmt.Errorf("start probe: canary goroutine read as %d, want %d: %w", ev.Goroutine, want, probe.ErrLayoutMismatch)
		case !strings.HasSuffix(ev.Site.Function, "probe.canaryWrite"):
			return fmt.Errorf("start probe: canary site resolved to %q: %w", ev.Site.Function, probe.ErrLayoutMismatch)
		case ev.MapType != "map[uprobe.canaryKey]uint8":
			return fmt.Errorf("start probe: canary map type resolved to %q: %w", ev.MapType, probe.ErrLayoutMismatch)
		}
		return nil
	case <-timer.C:
		// Submitted by the kernel but not read: the Guard's reader did
		// not get to run (a process busy with many runnable goroutines),
		// which says nothing about the layout.
		var c [maxSites]mapguardSiteStats
		if u.stats.Get(&c) == nil {
			for _, s := range u.sites {
				if s.kind == canaryKind && s.fn.Name == canaryFunc && c[s.index].Events > 0 {
					return fmt.Errorf("start probe: the canary event was recorded but not read within %v: the process is too busy for the Guard's reader to run: %w",
						canaryTimeout, probe.ErrBusy)
				}
			}
		}
		return fmt.Errorf("start probe: canary event did not arrive within %v: %w", canaryTimeout, probe.ErrLayoutMismatch)
	case <-ctx.Done():
		return fmt.Errorf("start probe: %w", ctx.Err())
	}
}

func newClock() (wire.Clock, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return wire.Clock{}, fmt.Errorf("read monotonic clock: %w", err)
	}
	return wire.Clock{Wall: time.Now(), Mono: ts.Nano()}, nil
}
