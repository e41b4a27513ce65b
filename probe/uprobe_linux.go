//go:build linux && amd64

package probe

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/go-logr/logr"
	"golang.org/x/sys/unix"

	"github.com/mapguard/mapguard/bpf"
	"github.com/mapguard/mapguard/decode"
	"github.com/mapguard/mapguard/internal/rt"
	"github.com/mapguard/mapguard/symbols"
)

// selfExe is the running binary. Uprobes live on the inode, and the magic
// link keeps naming the inode this process runs even if the file on disk
// is replaced.
const selfExe = "/proc/self/exe"

type uprobes struct {
	cfg UprobeConfig
	log logr.Logger

	mu       sync.Mutex // guards everything below once Start has begun
	started  bool
	closed   bool
	coll     *ebpf.Collection
	ex       *link.Executable
	reader   *ringbuf.Reader
	multi    bool
	sites    []*site
	inactive []Inactive
	canaryT  uintptr           // type of the canary's map, set before the reader starts; its events never reach the sink
	canary   chan decode.Event // receives the canary event during Start
	sink     Sink
	done     chan struct{} // closed when the reader goroutine exits
	// readerQuit tells the reader that a flush of the ring buffer is
	// teardown's, not a wake-up.
	readerQuit atomic.Bool
	ignore     *ebpf.Map
	// The first ignored goroutines, compared in BPF without a map lookup.
	ignoredVar  *ebpf.Variable
	ignoredMore *ebpf.Variable
	ignored     [8]uint64 // MG_IGNORED
	nIgnored    int
	// The cost governor (govern_linux.go): per-site costs and the spend
	// limit in the kernel, the trap costs as calibrated, what attaching
	// and detaching cost, and the detaches in flight.
	gov          *governor
	govStart     time.Time
	costVar      *ebpf.Variable
	spentVar     *ebpf.Variable
	limitVar     *ebpf.Variable
	costs        [maxSites]uint64
	calib        calibration
	stepCost     time.Duration
	emuCost      time.Duration
	linkCost     time.Duration // CPU time to attach and detach one link
	linkOthers   time.Duration // the part of linkCost not on the attaching thread
	lastCalib    time.Time
	calibrations int
	extra        time.Duration // CPU time spent attaching and detaching since the last tick
	ownCPU       atomic.Int64  // ns of CPU the Guard's goroutines used since the last tick (cpuMeter)
	detaching    int
	detaches     sync.WaitGroup
	sampled      []atomic.Bool // per site, as of the last tick; read by the reader
	stats        *ebpf.Variable
	counters     [maxSites]bpf.MapguardSiteStats // scratch for stats reads
	decoder      *decode.Decoder
	watched      [256]bool // kinds asked for
	statsOnly    [256]bool // kinds counted per call site, without events
	calls        callSites
	commaOKs     map[uintptr]bool // call site -> a comma-ok read; the reader's
	// notNested are the nested-miss aggregates whose first occurrence was
	// found not to be one (the outer map's elements are not maps of the
	// inner type): their counts are the nil-map reads they are.
	notNested map[bpf.MapguardAggKey]bool
	// notOwned counts, per site, events the runtime caused on its own
	// maps and nil-map reads in the standard library; written by the
	// reader, read by Stats.
	notOwned   []atomic.Uint64
	outOfScope []atomic.Uint64
	lastTick   time.Time
	// Aggregates (MissingKeyRead): the count already reported per key, and
	// when they were last reported.
	aggs    *ebpf.Map
	aggSeen map[bpf.MapguardAggKey]uint64
	lastAgg time.Time
	aggRaw  []byte
	// Crash records: this process's entry in the pinned map (shared by
	// its Guards), records of earlier processes waiting to be delivered by
	// the reader, and damaged records removed at Start.
	crash        *crashStore
	crashPath    string
	crashErr     string
	crashDamaged int
	pending      []crashRecord
	own          *ownBinary

	offsets     *rt.Offsets
	deep        bool // deep sites were chosen
	wakeReader  *ringbuf.Reader
	wakeDone    chan struct{}
	wakeAt      time.Time // the waker's deadline
	deepReader  *ringbuf.Reader
	deepDone    chan struct{}
	deepDecoder *decode.Decoder // the deep reader's own
	statsDec    *decode.Decoder // OpStats' own decoder, under mu
	lastDropped uint64
	stopping    bool // teardown has begun
	running     bool // Start succeeded
}

type site struct {
	index   uint32
	kind    decode.Kind
	fn      symbols.Func
	deep    bool
	op      Op
	keyMode uint8
	found
	link      link.Link             // nil while detached
	detaching bool                  // a detach is in flight
	final     bpf.MapguardSiteStats // counters at Close
}

// newUprobes is NewUprobes on linux/amd64.
func newUprobes(cfg UprobeConfig) Probe {
	return &uprobes{cfg: cfg, log: cfg.Logger}
}

func (u *uprobes) Start(ctx context.Context, sink Sink) (err error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.closed {
		return ErrClosed
	}
	if u.started {
		return fmt.Errorf("start probe: %w", ErrStarted)
	}
	u.started = true
	u.sink = sink
	begin := time.Now()

	defer func() {
		if err != nil {
			err = classify(err)
			u.teardownLocked()
			u.log.V(4).Info("probe start failed", "error", err.Error())
		}
	}()

	offsets, err := rt.Load()
	u.offsets = offsets
	switch {
	case errors.Is(err, rt.ErrUnknownRuntime):
		return fmt.Errorf("start probe: %w: %w", ErrNotSupported, err)
	case err != nil:
		return fmt.Errorf("start probe: %w: %w", ErrLayoutMismatch, err)
	}
	if rt.NewerThanChecked() {
		u.log.V(1).Info("Go release newer than mapguard was checked against: layouts derived and verified, sites found by shape", "go", runtime.Version())
	}
	if err := checkCapabilities(); err != nil {
		return err
	}
	// The BPF objects and readers hold about 32 descriptors; the sites
	// are counted once chosen.
	if err := checkFiles(32); err != nil {
		return err
	}
	if err := checkKernel(); err != nil {
		return err
	}
	u.multi = haveUprobeMulti() && !forceSingleLinks

	bin, err := symbols.OpenSelf()
	if err != nil {
		return fmt.Errorf("start probe: read own symbols: %w: %w", ErrNotSupported, err)
	}
	defer bin.Close()
	if err := u.chooseSites(bin); err != nil {
		return err
	}
	if err := u.checkKinds(); err != nil {
		u.log.Error(err, "kind not watchable")
		return err
	}
	perSite := 1 // a uprobe_multi link
	if !u.multi {
		perSite = 2 // a perf event and its link
	}
	if err := checkFiles(32 + perSite*len(u.sites)); err != nil {
		return err
	}
	if err := ctxErr(ctx); err != nil {
		return err
	}
	clock, err := newClock()
	if err != nil {
		return fmt.Errorf("start probe: %w", err)
	}
	if u.watched[decode.ConcurrentMisuse] && !u.cfg.NoCrashRecord {
		if u.own, err = newOwnBinary(bin, offsets, clock); err != nil {
			u.crashUnavailableLocked(err)
		}
	}
	if err := u.load(offsets); err != nil {
		return err
	}
	if err := ctxErr(ctx); err != nil {
		return err
	}

	u.notOwned = make([]atomic.Uint64, len(u.sites))
	u.sampled = make([]atomic.Bool, len(u.sites)) // before the readers start
	u.outOfScope = make([]atomic.Uint64, len(u.sites))
	u.aggSeen = make(map[bpf.MapguardAggKey]uint64)
	u.notNested = make(map[bpf.MapguardAggKey]bool)
	probes := make([]string, len(u.sites))
	for i, s := range u.sites {
		probes[i] = s.fn.Name
	}
	dcfg := decoderConfig(offsets, clock)
	dcfg.StackDepth = u.cfg.StackDepth
	dcfg.Probes = probes
	dcfg.Redact = u.cfg.CaptureKeys
	if len(u.cfg.MissingKeyScope) > 0 {
		miss := decode.NewScope(u.cfg.MissingKeyScope...)
		dcfg.MissScope = &miss
	}
	u.decoder = decode.NewDecoder(dcfg)
	u.deepDecoder = decode.NewDecoder(dcfg)
	// The reader ignores itself before any probe is armed.
	u.canaryT = uintptr(rt.TypeOf(map[canaryKey]uint8(nil)))
	u.canary = make(chan decode.Event, 1)
	u.done = make(chan struct{})
	ready := make(chan error, 1)
	go u.run(ready)
	if err := <-ready; err != nil {
		return fmt.Errorf("start probe: ignore reader goroutine: %w", err)
	}
	if u.deepReader != nil {
		u.deepDone = make(chan struct{})
		ready := make(chan error, 1)
		go u.runDeep(ready)
		if err := <-ready; err != nil {
			return fmt.Errorf("start probe: ignore deep reader goroutine: %w", err)
		}
	}
	if err := u.startWakerLocked(); err != nil {
		return fmt.Errorf("start probe: waker: %w", err)
	}

	if err := ctxErr(ctx); err != nil {
		return err
	}
	for _, s := range u.sites {
		if s.deep {
			continue // armed after the canary and the calibration
		}
		if err := u.armLocked(s); err != nil {
			if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
				return fmt.Errorf("start probe: attach %s+%#x: %w: %w", s.fn.Name, s.at.Offset, ErrPermission, err)
			}
			return fmt.Errorf("start probe: attach %s+%#x: %w", s.fn.Name, s.at.Offset, err)
		}
	}

	if err := u.checkCanaryLocked(ctx); err != nil {
		return err
	}
	if err := ctxErr(ctx); err != nil {
		return err
	}
	u.lastTick = time.Now()
	u.readCounters()
	if err := u.setupCalibrationLocked(bin); err != nil {
		return fmt.Errorf("start probe: cost calibration: %w: %w", ErrNotSupported, err)
	}
	// After the canary: the first uprobe on a binary costs extra.
	if err := u.startGovernorLocked(time.Now()); err != nil {
		return fmt.Errorf("start probe: cost governor: %w", err)
	}
	u.running = true
	u.log.V(4).Info("probe started", "sites", len(u.sites), "inactive", len(u.inactive),
		"uprobeMulti", u.multi, "took", time.Since(begin))
	return nil
}

// chooseSites decodes every target function present in the binary. The
// canary's site is always chosen; if its kind is not watched, only the
// canary's own events come from it.
func (u *uprobes) chooseSites(bin *symbols.Binary) error {
	callee := func(addr uint64) string {
		if f, ok := bin.FuncAt(addr); ok && f.Entry == addr {
			return f.Name
		}
		return ""
	}
	type want struct {
		kind decode.Kind
		t    target
	}
	var wants []want
	for _, kind := range u.cfg.Statistics {
		u.statsOnly[kind] = true
	}
	for _, kind := range u.cfg.kinds() {
		if kind == decode.NestedMapMiss {
			// No site of its own: the miss and nil-read sites see it.
			u.watched[kind] = true
			continue
		}
		if decode.IsDeep(kind) {
			u.watched[kind] = true
			u.deep = true
			continue
		}
		ts, ok := targets[kind]
		if !ok {
			return fmt.Errorf("start probe: kind %s: %w", kind, ErrNotSupported)
		}
		u.watched[kind] = true
		for _, t := range ts {
			wants = append(wants, want{kind, t})
		}
	}
	if u.watched[decode.NestedMapMiss] {
		for _, kind := range []decode.Kind{decode.MissingKeyRead, decode.NilMapRead} {
			if !u.watched[kind] { // probed for the nested misses only
				for _, t := range targets[kind] {
					wants = append(wants, want{kind, t})
				}
			}
		}
	}
	if !u.watched[canaryKind] {
		t := targets[canaryKind][0]
		t.funcs = []string{canaryFunc}
		wants = append(wants, want{canaryKind, t})
	}
	wraps := findWrappers(bin, callee)
	for _, w := range wants {
		for _, name := range w.t.funcs {
			var flags uint32
			var wrapRet [2]uint64
			if wr, ok := wraps.wrapper[name]; ok {
				// Go 1.27: a plain read's misses and nil maps are seen in
				// the function it wraps, through its return address.
				if w.kind != decode.MissingKeyRead {
					continue // a nil map is seen in the target (NilMapRead probes it)
				}
				name, flags, wrapRet = wr, siteUnwrap|siteWrapped, wraps.rets[wr]
			} else if rets, ok := wraps.rets[name]; ok {
				flags, wrapRet = siteUnwrap, rets
			}
			fn, ok := bin.Func(name)
			if !ok {
				u.inactive = append(u.inactive, Inactive{w.kind, name, "not in binary"})
				continue
			}
			code, err := bin.Code(fn)
			if err != nil {
				return fmt.Errorf("start probe: read %s: %w", name, err)
			}
			fs, err := w.t.find(code, fn.Entry, callee)
			if err != nil {
				u.inactive = append(u.inactive, Inactive{w.kind, name, err.Error()})
				u.log.V(1).Info("function not probed", "function", name, "reason", err.Error())
				continue
			}
			for _, f := range fs {
				if len(u.sites) == maxSites {
					return fmt.Errorf("start probe: more than %d sites", maxSites)
				}
				if f.at.Framed {
					f.flags |= siteFramed
				}
				f.flags |= flags
				f.wrapRet = wrapRet
				u.sites = append(u.sites, &site{index: uint32(len(u.sites)), kind: w.kind, fn: fn, found: f})
			}
		}
	}
	if u.cfg.OpStats {
		u.deep = true
	}
	if u.deep {
		return u.chooseDeepSites(bin, callee, wraps)
	}
	return nil
}

// checkKinds refuses a kind asked for whose runtime functions are in the
// binary but none of them has a usable probe site: it would be silently off.
// A kind none of whose functions are in the binary cannot happen, and one
// with some sites is watched there (Stats.Inactive lists the rest).
func (u *uprobes) checkKinds() error {
	var covered [256]bool
	for _, s := range u.sites {
		covered[s.kind] = true
		covered[decode.NilMapDelete] = covered[decode.NilMapDelete] || s.flags&siteDelNil != 0
		covered[decode.MissingKeyDelete] = covered[decode.MissingKeyDelete] || s.flags&siteDelIn != 0
		covered[decode.SharedWriters] = covered[decode.SharedWriters] || s.flags&siteWriter != 0
	}
	var msgs []string
	seen := map[decode.Kind]bool{}
	for _, in := range u.inactive {
		if !u.watched[in.Kind] || covered[in.Kind] || seen[in.Kind] || in.Reason == "not in binary" {
			continue
		}
		seen[in.Kind] = true
		msgs = append(msgs, fmt.Sprintf("%s (%s: %s)", in.Kind, in.Function, in.Reason))
	}
	if len(msgs) == 0 {
		return nil
	}
	return fmt.Errorf("start probe: no usable probe site in this build (%s) for %s; leave these kinds out of the kinds to watch: %w",
		buildDesc(), strings.Join(msgs, ", "), ErrNotSupported)
}

// buildDesc names the Go release and the build settings that change the
// runtime's code.
func buildDesc() string {
	desc := runtime.Version()
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return desc
	}
	for _, st := range info.Settings {
		switch st.Key {
		case "-gcflags", "-buildmode", "-race", "-asan", "-msan", "GOAMD64", "GOEXPERIMENT":
			if st.Value != "" && !(st.Key == "-buildmode" && st.Value == "exe") && !(st.Key == "GOAMD64" && st.Value == "v1") {
				desc += " " + st.Key + "=" + st.Value
			}
		}
	}
	return desc
}

// wrappers are the map read functions that only call another (Go 1.27's
// runtime.mapaccess1* call mapaccess2*), found by decoding them.
type wrappers struct {
	wrapper map[string]string    // wrapper -> the function it calls
	rets    map[string][2]uint64 // that function -> the runtime return addresses of its calls by wrappers
}

// readPairs are the plain and comma-ok forms of each map read.
var readPairs = [][2]string{
	{"runtime.mapaccess1", "runtime.mapaccess2"},
	{"runtime.mapaccess1_fast32", "runtime.mapaccess2_fast32"},
	{"runtime.mapaccess1_fast64", "runtime.mapaccess2_fast64"},
	{"runtime.mapaccess1_faststr", "runtime.mapaccess2_faststr"},
}

// fatRead is the plain read of large elements; where mapaccess1 wraps
// mapaccess2, it calls mapaccess2 too, and is a plain read as well.
const fatRead = "runtime.mapaccess1_fat"

// findWrappers finds which plain reads wrap their comma-ok form. A plain
// read that is no wrapper (Go 1.25, 1.26) has its own sites; one that wraps
// something else is left to its own site finder, which refuses it.
func findWrappers(bin *symbols.Binary, callee func(uint64) string) wrappers {
	ws := wrappers{wrapper: map[string]string{}, rets: map[string][2]uint64{}}
	for _, p := range readPairs {
		fn, ok := bin.Func(p[0])
		if !ok {
			continue
		}
		code, err := bin.Code(fn)
		if err != nil {
			continue
		}
		target, ret, err := symbols.WrapperCall(code, fn.Entry, callee)
		if err != nil || target != p[1] {
			continue
		}
		ws.wrapper[p[0]] = p[1]
		ws.rets[p[1]] = [2]uint64{fn.Entry + ret + bin.LoadBias()}
	}
	if _, ok := ws.wrapper[readPairs[0][0]]; ok {
		if fn, ok := bin.Func(fatRead); ok {
			code, err := bin.Code(fn)
			if err == nil {
				calls, err := symbols.CallSites(code, fn.Entry, callee, readPairs[0][1])
				if err == nil && len(calls) == 1 {
					r := ws.rets[readPairs[0][1]]
					r[1] = fn.Entry + calls[0].Offset + callLen + bin.LoadBias()
					ws.rets[readPairs[0][1]] = r
				}
			}
		}
	}
	return ws
}

// callLen is the length of CALL rel32, the only direct call CallSites
// returns.
const callLen = 5

// chooseDeepSites adds one site per map entry point after its stack check,
// flagged for what deep watching was asked for, and the site where a
// delete's outcome is known.
func (u *uprobes) chooseDeepSites(bin *symbols.Binary, callee func(uint64) string, wraps wrappers) error {
	add := func(kind decode.Kind, fn symbols.Func, f found, op Op, key uint8) error {
		if len(u.sites) == calibIndex {
			return fmt.Errorf("start probe: more than %d sites", calibIndex)
		}
		if f.at.Framed {
			f.flags |= siteFramed
		}
		u.sites = append(u.sites, &site{index: uint32(len(u.sites)), kind: kind, fn: fn, found: f, deep: true, op: op, keyMode: key})
		return nil
	}
	for _, d := range deepFuncs {
		var flags uint32
		kind := decode.Kind(0)
		if u.cfg.OpStats {
			flags |= siteCount
		}
		switch d.op {
		case OpWrite:
			if u.watched[decode.SharedWriters] {
				flags |= siteWriter
				kind = decode.SharedWriters
			}
		case OpDelete:
			if u.watched[decode.NilMapDelete] {
				flags |= siteDelNil
				kind = decode.NilMapDelete
			}
			if u.watched[decode.MissingKeyDelete] {
				flags |= siteDelIn
				kind = decode.MissingKeyDelete
			}
		}
		if flags == 0 {
			continue
		}
		// A wrapper's reads are counted in the function it calls, at its
		// caller's PC.
		if _, ok := wraps.wrapper[d.name]; ok {
			continue
		}
		var wrapRet [2]uint64
		if rets, ok := wraps.rets[d.name]; ok {
			flags |= siteUnwrap
			wrapRet = rets
		}
		fn, ok := bin.Func(d.name)
		if !ok {
			u.inactive = append(u.inactive, Inactive{kind, d.name, "not in binary"})
			continue
		}
		code, err := bin.Code(fn)
		if err != nil {
			return fmt.Errorf("start probe: read %s: %w", d.name, err)
		}
		at, err := symbols.EntrySite(code)
		if err != nil {
			u.inactive = append(u.inactive, Inactive{kind, d.name, err.Error()})
			continue
		}
		if err := add(kind, fn, found{at: at, flags: flags, mapReg: regBX, typReg: regAX, wrapRet: wrapRet}, d.op, d.key); err != nil {
			return err
		}
	}
	if !u.watched[decode.MissingKeyDelete] {
		return nil
	}
	fn, ok := bin.Func(deleteDoneFunc)
	if !ok {
		u.inactive = append(u.inactive, Inactive{decode.MissingKeyDelete, deleteDoneFunc, "not in binary"})
		return nil
	}
	code, err := bin.Code(fn)
	if err != nil {
		return fmt.Errorf("start probe: read %s: %w", deleteDoneFunc, err)
	}
	at, reg, err := deleteDoneSite(code, fn.Entry, callee)
	if err != nil {
		u.inactive = append(u.inactive, Inactive{decode.MissingKeyDelete, deleteDoneFunc, err.Error()})
		return nil
	}
	return add(decode.MissingKeyDelete, fn, found{at: at, flags: siteDelDone, mapReg: reg, typReg: regNone}, OpDelete, keyNone)
}

// deleteDoneSite finds the branch in (*Map).Delete after the entry was
// removed, if it was there: if m.used == 0 { m.seed = rand() }.
func deleteDoneSite(code []byte, entry uint64, callee func(uint64) string) (symbols.Site, uint8, error) {
	calls, err := symbols.CallSites(code, entry, callee, deleteDoneCall)
	if err != nil {
		return symbols.Site{}, 0, err
	}
	if len(calls) != 1 {
		return symbols.Site{}, 0, fmt.Errorf("%d calls of %s, want 1", len(calls), deleteDoneCall)
	}
	at, reg, err := symbols.GuardedCallSite(code, calls[0])
	if err != nil {
		return symbols.Site{}, 0, err
	}
	regs := map[string]uint8{"AX": regAX, "BX": regBX, "CX": regCX, "DX": regDX, "SI": regSI, "DI": regDI}
	r, ok := regs[reg]
	if !ok {
		return symbols.Site{}, 0, fmt.Errorf("map in %s", reg)
	}
	return at, r, nil
}

// decoderConfig is the decoding shared by the live reader and crash
// records: type names, the program's scope, the map type at a call site,
// and the bytes a map holds.
func decoderConfig(o *rt.Offsets, clock decode.Clock) decode.Config {
	scope := decode.ProgramScope()
	miss := decode.ModuleScope()
	return decode.Config{
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

func (u *uprobes) load(o *rt.Offsets) error {
	spec, err := bpf.LoadMapguard()
	if err != nil {
		return fmt.Errorf("start probe: %w", err)
	}
	if u.own != nil {
		take, err := acquireCrashStore(spec.Maps[bpf.MapguardMapCrashes], u.own, u.log)
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
		bpf.MapguardVarGoidOffset:            o.GoID,
		bpf.MapguardVarMapUsedOffset:         o.MapUsed,
		bpf.MapguardVarMapSeedOffset:         o.MapSeed,
		bpf.MapguardVarTypeKindOffset:        o.TypeKind,
		bpf.MapguardVarMaxFrames:             frames,
		bpf.MapguardVarGrowthThreshold:       u.cfg.growthThreshold(),
		bpf.MapguardVarMapDirPtrOffset:       o.MapDirPtr,
		bpf.MapguardVarMapDirLenOffset:       o.MapDirLen,
		bpf.MapguardVarMapGlobalDepthOffset:  o.MapGlobalDepth,
		bpf.MapguardVarTableCapacityOffset:   o.TableCapacity,
		bpf.MapguardVarTableLocalDepthOffset: o.TableLocalDepth,
		bpf.MapguardVarCrashKey:              u.crashKey(),
		bpf.MapguardVarKeySalt:               randomSalt(),
		bpf.MapguardVarCaptureKeys:           uint32(boolInt(u.cfg.CaptureKeys != nil)),
		bpf.MapguardVarSharedWindowNs:        uint64(u.cfg.sharedWindow()),
		bpf.MapguardVarMapTypeKeyOffset:      o.MapTypeKey,
		bpf.MapguardVarTypeSizeOffset:        o.TypeSize,
	} {
		if err := spec.Variables[name].Set(v); err != nil {
			return fmt.Errorf("start probe: set %s: %w", name, err)
		}
	}
	spec.Maps[bpf.MapguardMapEvents].MaxEntries = ringSize(u.cfg.bufferSize())
	if u.deep {
		spec.Maps[bpf.MapguardMapDeepEvents].MaxEntries = ringSize(u.cfg.bufferSize())
	}
	if !u.deep {
		delete(spec.Programs, bpf.MapguardProgMapguardDeep)
	}
	if u.multi {
		for _, p := range spec.Programs {
			p.AttachType = ebpf.AttachTraceUprobeMulti
		}
	}

	var opts ebpf.CollectionOptions
	if u.crash != nil {
		opts.MapReplacements = map[string]*ebpf.Map{bpf.MapguardMapCrashes: u.crash.m}
	}

	coll, err := ebpf.NewCollectionWithOptions(spec, opts)
	if err != nil {
		var verr *ebpf.VerifierError
		if !errors.As(err, &verr) && (errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES)) {
			return fmt.Errorf("start probe: load BPF: %w: %w", ErrPermission, err)
		}
		if errors.As(err, &verr) {
			// The kernel's verifier rejected the program: this kernel cannot
			// run it (not a privilege, though the errno says EACCES).
			return fmt.Errorf("start probe: load BPF: the kernel's verifier rejected the program: %w: %w", ErrNotSupported, err)
		}
		return fmt.Errorf("start probe: load BPF: %w", err)
	}
	u.coll = coll
	u.stats = coll.Variables[bpf.MapguardVarStats]
	u.costVar = coll.Variables[bpf.MapguardVarSiteCost]
	u.spentVar = coll.Variables[bpf.MapguardVarSpentNs]
	u.limitVar = coll.Variables[bpf.MapguardVarSpendLimit]
	u.ignore = coll.Maps[bpf.MapguardMapIgnoredGoids]
	u.ignoredVar = coll.Variables[bpf.MapguardVarIgnored]
	u.ignoredMore = coll.Variables[bpf.MapguardVarIgnoredMore]
	u.aggs = coll.Maps[bpf.MapguardMapAggs]

	sitesMap := coll.Maps[bpf.MapguardMapSites]
	for _, s := range u.sites {
		conf := bpf.MapguardSiteConf{Kind: uint8(s.kind), Flags: s.flags, MapReg: s.mapReg, TypReg: s.typReg, KeyMode: s.keyMode, WrapRet: s.wrapRet}
		if err := sitesMap.Put(s.index, conf); err != nil {
			return fmt.Errorf("start probe: configure site: %w", err)
		}
	}

	u.ex, err = link.OpenExecutable(selfExe)
	if err != nil {
		return fmt.Errorf("start probe: %w", err)
	}
	u.reader, err = ringbuf.NewReader(coll.Maps[bpf.MapguardMapEvents])
	if err != nil {
		return fmt.Errorf("start probe: %w", err)
	}
	if u.deep {
		if u.deepReader, err = ringbuf.NewReader(coll.Maps[bpf.MapguardMapDeepEvents]); err != nil {
			return fmt.Errorf("start probe: %w", err)
		}
	}
	return nil
}

// armLocked attaches one site, filtered to this process.
func (u *uprobes) armLocked(s *site) error {
	if s.link != nil {
		return nil
	}
	prog := u.coll.Programs[bpf.MapguardProgMapguardSite]
	if s.deep {
		prog = u.coll.Programs[bpf.MapguardProgMapguardDeep]
	}
	l, err := u.attach(s, prog)
	if err != nil {
		return err
	}
	s.link = l
	return nil
}

// attach attaches prog at s, filtered to this process, with s's index as
// the cookie.
func (u *uprobes) attach(s *site, prog *ebpf.Program) (link.Link, error) {
	off := s.fn.FileOffset + s.at.Offset
	var (
		l   link.Link
		err error
	)
	if u.multi {
		l, err = u.ex.UprobeMulti(nil, prog, &link.UprobeMultiOptions{
			Addresses: []uint64{off},
			Cookies:   []uint64{uint64(s.index)},
			PID:       uint32(os.Getpid()),
		})
	} else {
		l, err = u.ex.Uprobe("", prog, &link.UprobeOptions{
			Address: off,
			Cookie:  uint64(s.index),
			PID:     os.Getpid(),
		})
	}
	return l, err
}

// checkCanaryLocked provokes one nil-map write on a goroutine of its own and
// checks that it comes back whole: the goroutine id read in BPF, the map type
// and the call site.
func (u *uprobes) checkCanaryLocked(ctx context.Context) error {
	if !u.hasSite(canaryKind, canaryFunc) {
		return fmt.Errorf("start probe: canary function %s not probed: %w", canaryFunc, ErrNotSupported)
	}
	goid := make(chan uint64, 1)
	reader := u.reader
	go func() {
		goid <- rt.GoID()
		canaryWrite()
		// The record is in the ring now: wake the reader rather than wait
		// for its next poll (records are submitted without a wake-up).
		reader.Flush()
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
			return fmt.Errorf("start probe: canary came back as %s, want %s: %w", ev.Kind, canaryKind, ErrLayoutMismatch)
		case ev.Goroutine != want:
			return fmt.Errorf("start probe: canary goroutine read as %d, want %d: %w", ev.Goroutine, want, ErrLayoutMismatch)
		case !strings.HasSuffix(ev.Site.Function, "probe.canaryWrite"):
			return fmt.Errorf("start probe: canary site resolved to %q: %w", ev.Site.Function, ErrLayoutMismatch)
		case ev.MapType != "map[probe.canaryKey]uint8":
			return fmt.Errorf("start probe: canary map type resolved to %q: %w", ev.MapType, ErrLayoutMismatch)
		}
		return nil
	case <-timer.C:
		// Submitted by the kernel but not read: the Guard's reader did
		// not get to run (a process busy with many runnable goroutines),
		// which says nothing about the layout.
		var c [maxSites]bpf.MapguardSiteStats
		if u.stats.Get(&c) == nil {
			for _, s := range u.sites {
				if s.kind == canaryKind && s.fn.Name == canaryFunc && c[s.index].Events > 0 {
					return fmt.Errorf("start probe: the canary event was recorded but not read within %v: the process is too busy for the Guard's reader to run: %w",
						canaryTimeout, ErrBusy)
				}
			}
		}
		return fmt.Errorf("start probe: canary event did not arrive within %v: %w", canaryTimeout, ErrLayoutMismatch)
	case <-ctx.Done():
		return fmt.Errorf("start probe: %w", ctx.Err())
	}
}

func (u *uprobes) hasSite(kind decode.Kind, fn string) bool {
	for _, s := range u.sites {
		if s.kind == kind && s.fn.Name == fn {
			return true
		}
	}
	return false
}

// run is the reader goroutine: it drains the ring buffer every poll
// interval (records are submitted without a wake-up) or when Start flushes
// it for the canary, decodes and delivers, and runs the cost governor on
// each poll.
func (u *uprobes) run(ready chan<- error) {
	defer close(u.done)
	cpu := startCPUMeter(&u.ownCPU, true)
	// Start holds u.mu and set u.ignore before starting this goroutine.
	if err := u.ignoreLocked(rt.GoID()); err != nil {
		ready <- err
		return
	}
	close(ready)

	var (
		rec ringbuf.Record
		ev  decode.Event
	)
	u.reader.SetDeadline(time.Now().Add(pollInterval))
	for {
		err := u.reader.ReadInto(&rec)
		switch {
		case err == nil:
			u.handle(rec.RawSample, &ev)
		case errors.Is(err, os.ErrDeadlineExceeded):
			cpu.book()
			u.tick(time.Now())
			u.reader.SetDeadline(time.Now().Add(pollInterval))
		case errors.Is(err, ringbuf.ErrFlushed):
			// The ring is drained. A flush is a wake-up (the canary's)
			// unless teardown asked the reader to stop.
			if u.readerQuit.Load() {
				return
			}
		case errors.Is(err, ringbuf.ErrClosed), errors.Is(err, os.ErrClosed):
			return
		default:
			u.log.Error(err, "read ring buffer")
			return
		}
	}
}

// runDeep drains the deep sites' ring buffer, on a goroutine of its own
// (ignored like the reader), so that deep events never crowd out the
// default ones. Its name is in mapguard.GoroutineFunctions.
func (u *uprobes) runDeep(ready chan<- error) {
	defer close(u.deepDone)
	cpu := startCPUMeter(&u.ownCPU, false)
	ready <- u.ignoreLocked(rt.GoID()) // Start holds u.mu
	var (
		rec ringbuf.Record
		ev  decode.Event
	)
	for {
		u.deepReader.SetDeadline(time.Now().Add(pollInterval))
		err := u.deepReader.ReadInto(&rec)
		switch {
		case err == nil:
			u.handleWith(u.deepDecoder, rec.RawSample, &ev)
		case errors.Is(err, os.ErrDeadlineExceeded):
			cpu.book()
		default:
			return // flushed at Close, or closed
		}
	}
}

// handle decodes and delivers one record of the always-on sites, on the
// reader goroutine.
func (u *uprobes) handle(raw []byte, ev *decode.Event) { u.handleWith(u.decoder, raw, ev) }

// handleWith decodes with dec, which only the calling goroutine uses (the
// reader's, or the deep reader's own), and delivers.
func (u *uprobes) handleWith(dec *decode.Decoder, raw []byte, ev *decode.Event) {
	h, err := decode.Peek(raw)
	if err != nil {
		u.log.Error(err, "bad record")
		return
	}

	if err := dec.Decode(raw, ev); err != nil {
		owned := errors.Is(err, decode.ErrRuntimeOwned) || errors.Is(err, decode.ErrStdlib)
		if owned || errors.Is(err, decode.ErrOutOfScope) {
			if int(h.Site) >= len(u.sites) {
				return
			}
			if owned {
				u.notOwned[h.Site].Add(1)
			} else {
				u.outOfScope[h.Site].Add(1)
			}
			if u.sites[h.Site].flags&siteAgg != 0 {
				// Count this call site from now on, but never report it.
				key := bpf.MapguardAggKey{Site: h.Site, Pc: uint64(h.PC)}
				if h.Kind == decode.NestedMapMiss {
					key.Site |= aggNested
				}
				u.muteAgg(key)
			}
			return
		}
		u.log.Error(err, "bad record")
		return
	}
	if h.Typ != 0 && h.Typ == u.canaryT {
		select {
		case u.canary <- *ev:
		default: // a late or repeated canary
		}
		return
	}
	if ev.Kind == decode.NestedMapMiss && !u.nestedLocked(h, ev) {
		// Two reads close together, but the first did not return the
		// map the second read: a plain nil-map read, and so are its later
		// occurrences that the kernel counts as nested.
		ev.Kind, ev.Peer = decode.NilMapRead, nil
		u.notNested[bpf.MapguardAggKey{Site: h.Site | aggNested, Pc: uint64(h.PC)}] = true
	}
	if !u.watched[ev.Kind] {
		return // the canary's site, its kind not watched
	}
	if int(h.Site) < len(u.sampled) {
		ev.Sampled = u.sampled[h.Site].Load()
	}
	if decode.IsStatistic(ev.Kind) && int(h.Site) < len(u.sites) {
		commaOK := u.commaOK(h.PC)
		u.calls.add(h.PC, commaOK, ev, ev.Count, ev.Sampled)
		if u.statsOnly[ev.Kind] || commaOK {
			return // an idiom as often as a bug: counted, not an event
		}
	}
	if decode.IsDeep(ev.Kind) {
		if ev.Kind == decode.SharedWriters && u.excluded(ev) {
			u.outOfScope[h.Site].Add(1)
			return
		}
	}
	if v := u.log.V(8); v.Enabled() {
		v.Info("event", "kind", ev.Kind.String(), "site", ev.Site.String())
	}
	u.sink(ev)
}

// tick runs the cost governor and the periodic work of the reader.
func (u *uprobes) tick(now time.Time) { u.tickFrom(now, true) }

// tickFrom is tick; only the reader (reader true) calls the sink, which
// must be called from one goroutine at a time. The waker runs the rest.
func (u *uprobes) tickFrom(now time.Time, reader bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.stopping || u.coll == nil {
		return
	}
	u.lastTick = now
	if reader && len(u.pending) > 0 && u.running {
		u.deliverCrashesLocked()
	}
	u.readCounters()
	// Counts go out only once the ring buffer is drained, so that the
	// first occurrence at a call site, an event of its own, comes first.
	if reader && now.Sub(u.lastAgg) >= aggInterval && u.reader.AvailableBytes() == 0 {
		u.lastAgg = now
		u.flushAggsLocked()
	}
	u.governLocked(now)
	var dropped uint64
	for _, s := range u.sites {
		dropped += u.counters[s.index].Dropped
	}
	if dropped > u.lastDropped {
		u.log.V(1).Info("events dropped: the ring buffer was full; raise Options.BufferSize",
			"dropped", dropped-u.lastDropped, "total", dropped)
		u.lastDropped = dropped
	}
}

// flushAggsLocked reports, per call site, the occurrences counted in BPF
// since the last report.
func (u *uprobes) flushAggsLocked() {
	var (
		key bpf.MapguardAggKey
		val bpf.MapguardAggVal
		ev  decode.Event
	)
	clock, err := newClock()
	if err != nil {
		return
	}
	now := time.Now()
	it := u.aggs.Iterate()
	for it.Next(&key, &val) {
		seen, _ := u.aggSeen[key] // comma-ok: a plain read that misses would hit our own probe
		index, kind := key.Site&^aggNested, decode.NestedMapMiss
		if val.Muted != 0 || val.Count <= seen || int(index) >= len(u.sites) || u.sites[index].flags&siteAgg == 0 {
			continue // operation counts (deep sites) are read by OpStats
		}
		u.aggSeen[key] = val.Count
		s := u.sites[index]
		if nn, _ := u.notNested[key]; key.Site&aggNested == 0 || nn {
			kind = s.kind // counted as nested in the kernel, but found not to be
		}
		if !u.watched[kind] {
			continue // a site probed for another kind (nested misses)
		}
		count, sampled := val.Count-seen, false
		if u.gov != nil {
			// A sampled site's counts are scaled by the time it was
			// attached: an estimate, and the event says so.
			var f float64
			f, sampled = u.gov.scale(now, int(index))
			count = uint64(float64(count)*f + 0.5)
		}
		u.aggRaw = decode.Record(u.aggRaw, kind, index, 0, uint64(clock.Mono), count, []uintptr{uintptr(key.Pc)}, "")
		if err := u.decoder.Decode(u.aggRaw, &ev); err != nil {
			continue
		}
		ev.Time = clock.Wall
		ev.Sampled = sampled
		if decode.IsStatistic(ev.Kind) {
			commaOK := u.commaOK(uintptr(key.Pc))
			u.calls.add(uintptr(key.Pc), commaOK, &ev, count, sampled)
			if u.statsOnly[ev.Kind] || commaOK {
				continue
			}
		}
		u.sink(&ev)
	}
	if err := it.Err(); err != nil {
		u.log.V(1).Info("read aggregates", "error", err.Error())
	}
	if u.gov != nil {
		u.gov.flush(now)
	}
}

// readCounters refreshes u.counters from the memory-mapped .bss: a copy,
// no system call. Counters only grow, and each is updated atomically.
func (u *uprobes) readCounters() {
	if err := u.stats.Get(&u.counters); err != nil {
		u.counters = [maxSites]bpf.MapguardSiteStats{}
	}
}

func (u *uprobes) Ignore(goid uint64) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.ignore == nil {
		return ErrClosed
	}
	return u.ignoreLocked(goid)
}

// ignoreLocked adds goid to the ignored goroutines: into the array the BPF
// program compares without a lookup while it has room, else the hash map.
func (u *uprobes) ignoreLocked(goid uint64) error {
	if u.nIgnored < len(u.ignored) {
		u.ignored[u.nIgnored] = goid
		u.nIgnored++
		return u.ignoredVar.Set(u.ignored)
	}
	if err := u.ignore.Put(goid, uint8(1)); err != nil {
		return err
	}
	return u.ignoredMore.Set(uint32(1))
}

func (u *uprobes) Stats() Stats {
	u.mu.Lock()
	defer u.mu.Unlock()
	now := time.Now()
	st := Stats{Inactive: append([]Inactive(nil), u.inactive...), CrashRecord: u.crashPath, CrashRecordError: u.crashErr,
		CrashRecordsDamaged: u.crashDamaged, Budget: u.budgetStatsLocked(now)}
	st.CallSites, st.CallSitesOverflow = u.calls.snapshot()
	if u.coll != nil {
		u.readCounters()
	}
	for _, s := range u.sites {
		ss := SiteStats{
			Kind:     s.kind,
			Deep:     s.deep,
			Function: s.fn.Name,
			Offset:   s.at.Offset,
			Inst:     s.at.Inst,
			Emulated: s.at.Emulated,
			Armed:    s.link != nil,
		}
		if u.gov != nil {
			g := &u.gov.sites[s.index]
			ss.Cost = time.Duration(g.cost)
			ss.Rate = g.rate
			ss.Watched = g.watched
			if g.armed && !g.armedAt.After(now) {
				ss.Watched += now.Sub(later(g.armedAt, u.gov.last))
			}
			if g.sampled {
				ss.Sampled, ss.Window, ss.Period = true, g.window, g.period
			}
		}
		if int(s.index) < len(u.notOwned) {
			ss.NotOwned = u.notOwned[s.index].Load()
			ss.OutOfScope = u.outOfScope[s.index].Load()
		}
		c := s.final
		if u.coll != nil {
			c = u.counters[s.index]
		}
		ss.Hits, ss.Events, ss.Dropped, ss.Filtered, ss.Ignored, ss.Aggregated = c.Hits, c.Events, c.Dropped, c.Filtered, c.Ignored, c.Agg
		if s.deep {
			// Deep hits that end in the kernel are not counted there, to
			// save an atomic add on a hot path: they are the rest.
			if done := c.Events + c.Dropped + c.Ignored; c.Hits >= done {
				ss.Aggregated = c.Hits - done
			}
		}
		st.Dropped += ss.Dropped
		st.Sites = append(st.Sites, ss)
	}
	return st
}

func (u *uprobes) Close() error {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.closed {
		return nil
	}
	u.closed = true
	u.teardownLocked()
	return nil
}

// teardownLocked detaches every site in parallel (each detach waits for
// the kernel), then lets the reader deliver what is left in the ring buffer
// and stop, then frees the BPF objects. Nothing that hit a probe before
// Close is lost.
func (u *uprobes) teardownLocked() {
	u.stopping = true // tick must not re-arm anything from here on
	// Every link closes in parallel, with the detaches the governor
	// started (sites attached together share a link: closed once).
	var wg sync.WaitGroup
	closing := map[link.Link]bool{}
	for _, s := range u.sites {
		if s.link == nil || closing[s.link] {
			s.link = nil
			continue
		}
		closing[s.link] = true
		wg.Add(1)
		go func(l link.Link) {
			defer wg.Done()
			l.Close()
		}(s.link)
		s.link = nil
	}
	u.mu.Unlock()
	wg.Wait()
	u.detaches.Wait()
	u.mu.Lock()
	if u.wakeReader != nil {
		u.wakeReader.Close() // the governor goroutine returns
		if u.wakeDone != nil {
			u.mu.Unlock()
			<-u.wakeDone // it may be waiting for u.mu
			u.mu.Lock()
		}
		u.wakeReader, u.wakeDone = nil, nil
	}
	if u.deepReader != nil {
		if u.deepDone != nil {
			u.deepReader.Flush()
			u.mu.Unlock()
			<-u.deepDone
			u.mu.Lock()
		}
		u.deepReader.Close()
		u.deepReader, u.deepDone = nil, nil
	}
	if u.reader != nil {
		if u.done != nil {
			u.readerQuit.Store(true)
			u.reader.Flush() // the reader drains the ring, then returns on ErrFlushed
			u.mu.Unlock()
			<-u.done // the reader may be waiting for u.mu in tick
			u.mu.Lock()
		}
		u.reader.Close()
	}
	if u.running {
		// Counts since the last report, and crash records not yet delivered.
		u.flushAggsLocked()
		if len(u.pending) > 0 {
			u.deliverCrashesLocked()
		}
	}
	if u.coll != nil {
		// Keep the final counters for Stats after Close.
		u.readCounters()
		for _, s := range u.sites {
			s.final = u.counters[s.index]
		}
		u.coll.Close()
	}
	if u.crash != nil {
		releaseCrashStore(u.crash, u.log)
	}
	u.coll, u.reader, u.ignore, u.stats, u.done, u.aggs, u.crash = nil, nil, nil, nil, nil, nil, nil
}

// checkCapabilities fails fast without the capabilities BPF and uprobes
// need, before anything is created.
func checkCapabilities() error {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return fmt.Errorf("start probe: read capabilities: %w", err)
	}
	has := func(c uint) bool { return data[c/32].Effective&(1<<(c%32)) != 0 }
	if has(unix.CAP_SYS_ADMIN) || (has(unix.CAP_BPF) && has(unix.CAP_PERFMON)) {
		return nil
	}
	return fmt.Errorf("start probe: need CAP_SYS_ADMIN (or CAP_BPF and CAP_PERFMON): %w", ErrPermission)
}

// checkKernel requires ring buffers (5.8) and uprobe attach cookies (5.15).
func checkKernel() error {
	for what, err := range map[string]error{
		"BPF ring buffer":    features.HaveMapType(ebpf.RingBuf),
		"uprobe BPF cookies": features.HaveProgramHelper(ebpf.Kprobe, asm.FnGetAttachCookie),
	} {
		switch {
		case err == nil:
		case errors.Is(err, ebpf.ErrNotSupported):
			return fmt.Errorf("start probe: kernel lacks %s: %w", what, ErrNotSupported)
		case errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES):
			return fmt.Errorf("start probe: probe for %s: %w: %w", what, ErrPermission, err)
		default:
			return fmt.Errorf("start probe: probe for %s: %w", what, err)
		}
	}
	return nil
}

// forceSingleLinks makes Start use perf-event uprobes even where
// uprobe_multi works, so that tests cover the older kernels' path.
var forceSingleLinks = false

// haveUprobeMulti reports whether uprobe_multi links can be used: the link
// type exists (6.6) and its PID filter is per process (fixed in 6.10 and
// 6.6.35; before that, hits from other threads were dropped).
func haveUprobeMulti() bool {
	if features.HaveBPFLinkUprobeMulti() != nil {
		return false
	}
	var uts unix.Utsname
	if unix.Uname(&uts) != nil {
		return false
	}
	var major, minor, patch int
	fmt.Sscanf(unix.ByteSliceToString(uts.Release[:]), "%d.%d.%d", &major, &minor, &patch)
	return major > 6 || (major == 6 && minor >= 10) || (major == 6 && minor == 6 && patch >= 35)
}

// ctxErr is ctx's error as Start returns it, checked between its steps.
func ctxErr(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("start probe: %w", err)
	}
	return nil
}

func newClock() (decode.Clock, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return decode.Clock{}, fmt.Errorf("read monotonic clock: %w", err)
	}
	return decode.Clock{Wall: time.Now(), Mono: ts.Nano()}, nil
}

// muteAgg makes the kernel count a call site's aggregate from now on
// without it ever being reported.
func (u *uprobes) muteAgg(key bpf.MapguardAggKey) {
	if err := u.aggs.Update(key, bpf.MapguardAggVal{Muted: 1}, ebpf.UpdateExist); err != nil {
		u.log.V(1).Info("mute call site", "error", err.Error())
	}
	u.aggSeen[key] = 0
}

// nestedLocked reports whether a nested-map miss is one: the outer read
// (ev.Peer's site, whose map type the call site passes as a constant) is of
// a map whose elements are maps of the inner read's type. Without the
// outer type it trusts the kernel's pairing (a miss, then a nil-map read
// of the same goroutine a few instructions later).
func (u *uprobes) nestedLocked(h decode.Header, ev *decode.Event) bool {
	if ev.Peer == nil || h.Typ == 0 {
		return false
	}
	outer := callSiteType(u.offsets, ev.Peer.Site.PC)
	if outer == 0 {
		return true
	}
	return rt.MapElem(outer) == h.Typ
}

// commaOK reports whether the map call returning to pc is a comma-ok read
// (v, ok := m[k]): the CALL before pc targets runtime.mapaccess2*. (On Go
// 1.27 the probe sits in mapaccess2* for both forms, and a plain read's
// pc is already its user's, past the mapaccess1* wrapper.)
func (u *uprobes) commaOK(pc uintptr) bool {
	if ok, seen := u.commaOKs[pc]; seen {
		return ok
	}
	ok := strings.HasPrefix(callTarget(pc), "runtime.mapaccess2")
	if u.commaOKs == nil || len(u.commaOKs) >= 4096 {
		u.commaOKs = make(map[uintptr]bool)
	}
	u.commaOKs[pc] = ok
	return ok
}
