//go:build linux && amd64

package uprobe

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/go-logr/logr"
	"golang.org/x/sys/unix"

	"github.com/mapguard/mapguard/decode"
	"github.com/mapguard/mapguard/internal/rt"
	"github.com/mapguard/mapguard/internal/wire"
	"github.com/mapguard/mapguard/probe"
	"github.com/mapguard/mapguard/symbols"
)

// startCalibHold is how long after Start its calibration's links stay
// (see linkLane.holdLow): Start's storm is over by then, and its closes
// (a P each, until sysmon retakes it) do not add to the storm's.
const startCalibHold = time.Second

// selfExe is the running binary. Uprobes live on the inode, and the magic
// link keeps naming the inode this process runs even if the file on disk
// is replaced.
const selfExe = "/proc/self/exe"

type uprobes struct {
	cfg Config
	log logr.Logger

	// lane orders the governor's link system calls, made off mu
	// (lane.go); calibLane the calibration's, one at a time, apart (they
	// take 35-56 ms each, and a detach of a hot site behind them waited
	// as long: see linkLane). Each has its own lock.
	lane, calibLane *linkLane

	mu       sync.Mutex // guards everything below once Start has begun
	started  bool
	closed   bool
	coll     *ebpf.Collection
	ex       *link.Executable
	reader   *ringbuf.Reader
	multi    bool
	sites    []*site
	inactive []probe.Inactive
	canaryT  uintptr           // type of the canary's map, set before the reader starts; its events never reach the sink
	canary   chan decode.Event // receives the canary event during Start
	sink     probe.Sink
	done     chan struct{} // closed when the reader goroutine exits
	// readerWake makes the reader drain its ring now (the canary);
	// closing readerStop makes it drain what is left and return.
	readerWake, readerStop chan struct{}
	// takeAsk makes the reader attach the nested reads the search found,
	// then close the channel it sent (takeNestedAtStartLocked).
	takeAsk chan chan struct{}
	ignore  *ebpf.Map
	// The first ignored goroutines, compared in BPF without a map lookup.
	ignoredVar  *ebpf.Variable
	ignoredMore *ebpf.Variable
	ignored     [8]uint64 // MG_IGNORED
	nIgnored    int
	// The cost governor (govern_linux.go): per-site costs and the spend
	// limit in the kernel, the trap costs as calibrated, what attaching
	// and detaching cost, and the detaches in flight.
	gov        *governor
	govStart   time.Time
	costVar    *ebpf.Variable
	spentVar   *ebpf.Variable
	limitVar   *ebpf.Variable
	costs      [maxSites]uint64
	genVar     *ebpf.Variable // site_gen: the link generation each site counts on
	calib      calibration
	stepCost   time.Duration
	emuCost    time.Duration
	linkCost   time.Duration // CPU time to attach and detach one link
	linkThread time.Duration // the part of linkCost on the attaching thread (least calibrated)
	linkOthers time.Duration // the part of linkCost not on the attaching thread
	// othersMeasured: linkOthers was measured (by a recalibration), not
	// derived from linkThread (Start's calibration does not measure it).
	othersMeasured bool
	linkMeasured   bool // linkThread was measured, not assumed
	lastCalib      time.Time
	calibrations   int
	calibrating    bool          // a calibration is under way (calibrateDue)
	calibStop      atomic.Bool   // set by teardown: a calibration attaches nothing more
	extra          time.Duration // CPU time spent attaching and detaching since the last tick
	ownCPU         atomic.Int64  // ns of CPU the Guard's goroutines used since the last tick (cpuMeter)
	detaching      int
	detaches       sync.WaitGroup
	sampled        []atomic.Bool // per site, as of the last tick; read by the reader
	stats          *ebpf.Variable
	counters       [maxSites]mapguardSiteStats // scratch for stats reads
	// statsMem and statsOff: the memory stats lies in, at statsOff, so
	// that readCounters reads only the sites' part of it (nil: not
	// memory-mapped, stats.Get reads it all).
	statsMem  *ebpf.Memory
	statsOff  int64
	aggRead   aggReader // the reader's (flushAggsLocked)
	hits      []uint64  // scratch for bookLocked
	decoder   *wire.Decoder
	watched   [256]bool // kinds asked for
	statsOnly [256]bool // kinds counted per call site, without events
	calls     callSites
	commaOKs  map[uintptr]bool // call site -> a comma-ok read; the reader's
	// notNested are the nested-miss aggregates whose first occurrence was
	// found not to be one (the outer map's elements are not maps of the
	// inner type): their counts are the nil-map reads they are.
	notNested map[mapguardAggKey]bool
	// nestedAt caches, per call site, the outer read's return address
	// when the caller's code shows the call is the inner read of m[a][b]
	// (0 if it is not); nestedSeen are the call sites whose first nested
	// miss went out as an event, and nestedLate the occurrences that came
	// as another first event after it (their kernel aggregate, paired or
	// not, is another key), added to the next counts. The reader's.
	nestedAt map[uintptr]uintptr
	// callers are the inner reads of m[a][b] probed in the program's code
	// (siteCaller), sorted by call site: their nested misses are counted
	// there only. (The code in memory holds the probes' breakpoints, so it
	// is not decoded again.) The reader's: it adds them (takeNestedLocked).
	callers []callerRead
	// The search for the program's nested reads runs after Start
	// (nested_linux.go): it hands what it found to the reader through
	// nestedFound; teardown closes scanStop and waits for scanDone.
	nestedFound chan nestedReads
	scanStop    chan struct{}
	scanDone    chan struct{}
	scanGoid    uint64      // its goroutine, ignored once the BPF objects are loaded
	scanPaced   atomic.Bool // Start has returned: the search is paced and booked
	// published is u.sites as the readers see it without u.mu (sites
	// are added after Start); written under u.mu.
	published atomic.Pointer[[]*site]
	// fresh are the sites just added: the flush that follows marks their
	// counts so far as seen (takeNestedLocked).
	fresh []uint32
	clock wire.Clock // the records' clock (set by startReadersLocked)
	// startShared are the sites Start attached with one link
	// (armDefaultLocked), for the governor.
	startShared []int
	// limit is the spend limit last set in the kernel (see overLimit).
	limit      atomic.Uint64
	nestedSeen map[uintptr]bool
	nestedLate map[mapguardAggKey]uint64
	// notOwned counts, per site, events the runtime caused on its own
	// maps and nil-map reads in the standard library; written by the
	// reader, read by Stats.
	notOwned   []atomic.Uint64
	outOfScope []atomic.Uint64
	// useful flags, per site, that it delivered an event or a call site's
	// count since the governor last booked (see governor.useful); set by
	// the readers.
	useful      []atomic.Bool
	aggsFlushed bool      // flushAggsLocked ran since the governor last booked
	lastPlan    time.Time // the governor's last plan (planLocked)
	// Aggregates (MissingKeyRead): the count already reported per key, and
	// when they were last reported.
	aggs    *ebpf.Map
	aggSeen map[mapguardAggKey]uint64
	lastAgg time.Time
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
	deepStop    chan struct{} // closed: the deep reader drains and returns
	wakeFile    *os.File      // the wakeups ring's fd, in the netpoller (poll_linux.go)
	deepDecoder *wire.Decoder // the deep reader's own
	statsDec    *wire.Decoder // OpStats' own decoder, under mu
	lastDropped uint64
	stopping    bool // teardown has begun
	running     bool // Start succeeded
	// view is what Stats reports while u.mu is held (stats_linux.go),
	// published by Stats, by the reader's tick once Stats has been called
	// (statsUsed), at the end of Start and at Close.
	view      atomic.Pointer[statsView]
	statsUsed atomic.Bool
	// samp measures the traps' cost in place (nil: unavailable here).
	samp *sampler
}

type site struct {
	index   uint32
	kind    decode.Kind
	fn      symbols.Func
	deep    bool
	op      probe.Op
	keyMode uint8
	found
	link      link.Link         // nil while detached
	closing   link.Link         // while a detach is in flight: the link being closed
	attaching bool              // an attach is in flight (see attachGroupLocked)
	gen       uint8             // link generation of link (see cookie)
	final     mapguardSiteStats // counters at Close
}

// cookie is what s's link passes its program: the site's index, and the
// generation of that link in the upper 32 bits. The program counts a hit
// only if that is the site's generation in site_gen (see moveGroupLocked).
func (s *site) cookie() uint64 { return uint64(s.index) | uint64(s.gen)<<32 }

// newUprobes is New on linux/amd64.
func newUprobes(cfg Config) probe.Probe {
	return &uprobes{cfg: cfg, log: cfg.Logger, lane: new(linkLane), calibLane: &linkLane{size: 1}}
}

// Start is one sequence of steps, each of which may refuse and must
// leave nothing behind (the deferred teardown); it reads top to bottom in
// the order the steps must run, which is why it is not split further.
func (u *uprobes) Start(ctx context.Context, sink probe.Sink) (err error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.closed {
		return probe.ErrClosed
	}
	if u.started {
		return fmt.Errorf("start probe: %w", probe.ErrStarted)
	}
	u.started = true
	u.sink = sink
	begin := time.Now()
	// Wall time per step, for the V(4) log.
	var steps []any
	last := begin
	step := func(name string) {
		now := time.Now()
		steps = append(steps, name, now.Sub(last))
		last = now
	}

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
		return fmt.Errorf("start probe: %w: %w", probe.ErrNotSupported, err)
	case err != nil:
		return fmt.Errorf("start probe: %w: %w", probe.ErrLayoutMismatch, err)
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
	u.deep = u.cfg.deep()
	// What a trap and a link cost here is measured on a goroutine of its
	// own while the rest of Start runs (calibrate_linux.go).
	// Its links are closed after Start's first second (see holdLow), or
	// at once if Start fails (teardownLocked opens the lane).
	u.calibLane.holdLow(time.Time{})
	cal := u.startCalibration()
	calJoined := false
	defer func() {
		if !calJoined {
			u.calibLane.open()
			cal.abandon()
		}
	}()
	step("checks")

	clock, err := newClock()
	if err != nil {
		return fmt.Errorf("start probe: %w", err)
	}
	var bias uint64 // the crash store's, before the symbols are read
	haveBias := false
	if slices.Contains(u.cfg.kinds(), decode.ConcurrentMisuse) && !u.cfg.NoCrashRecord {
		bias, err = selfLoadBias()
		if err == nil {
			haveBias = true
			u.own, err = newOwnBinary(bias, offsets, clock)
		}
		if err != nil {
			u.crashUnavailableLocked(err)
		}
	}
	// The BPF collection is prepared and loaded (the kernel verifies the
	// programs) on another core while the symbols are read and the sites
	// chosen. Its deferred discard runs before the teardown, which reads
	// what it set.
	loading := u.startLoadLocked(offsets)
	defer loading.discard() // a collection not taken below
	step("begin load")

	bin, err := symbols.OpenSelf()
	if err != nil {
		return fmt.Errorf("start probe: read own symbols: %w: %w", probe.ErrNotSupported, err)
	}
	closeBin := func() { bin.Close() } // shared with the search for nested reads
	defer func() { closeBin() }()
	if haveBias && bias != bin.LoadBias() {
		return fmt.Errorf("start probe: load bias %#x from the auxiliary vector, %#x from the symbols: %w",
			bias, bin.LoadBias(), probe.ErrLayoutMismatch)
	}
	step("symbols")
	if slices.Contains(u.cfg.kinds(), decode.NestedMapMiss) {
		// The program's nested reads are searched for beside the rest of
		// Start (a read of the whole text), which does not wait for it:
		// it goes on after Start, paced, and the reader attaches what it
		// finds (nested_linux.go).
		closeBin = u.startNestedScanLocked(bin)
	}
	if err := u.chooseSites(bin); err != nil {
		return err
	}
	step("sites")
	if err := u.checkKinds(); err != nil {
		u.log.Error(err, "kind not watchable")
		return err
	}
	perSite := 1 // a uprobe_multi link
	if !u.multi {
		perSite = 2 // a perf event and its link
	}
	pending := 0 // the nested reads' sites, added after Start
	if slices.Contains(u.cfg.kinds(), decode.NestedMapMiss) {
		pending = maxNestedSites
	}
	if err := checkFiles(32 + perSite*(len(u.sites)+pending)); err != nil {
		return err
	}
	if err := ctxErr(ctx); err != nil {
		return err
	}
	coll, err := loading.wait()
	if err != nil {
		return err
	}
	if err := u.finishLoadLocked(coll, loading.stats); err != nil {
		return err
	}
	if u.scanGoid != 0 {
		// Before any probe is attached: the search's goroutine is the
		// Guard's own.
		if err := u.ignoreLocked(u.scanGoid); err != nil {
			return fmt.Errorf("start probe: ignore the search for nested reads: %w", err)
		}
	}
	step("load")
	if err := ctxErr(ctx); err != nil {
		return err
	}

	if err := u.startReadersLocked(offsets, clock); err != nil {
		return err
	}
	step("readers")

	if err := ctxErr(ctx); err != nil {
		return err
	}
	if err := u.armDefaultLocked(); err != nil {
		return err
	}
	step("arm")

	if err := u.checkCanaryLocked(ctx); err != nil {
		return err
	}
	step("selfcheck")
	if err := ctxErr(ctx); err != nil {
		return err
	}
	u.lastPlan = time.Now()
	u.readCounters()
	calib, costs, err := cal.waitTraps()
	calJoined = true
	step("calibration")
	if err == nil {
		err = verifyCalibration(calib, bin)
	}
	// The calibration's detaches go on after Start; teardown waits for them.
	u.detaches.Add(1)
	go u.finishCalibration(cal, err == nil)
	if err == nil {
		u.calib = calib
		u.keepCalibrationLocked(costs)
	} else {
		// The assumed costs stand until the waker's first tick calibrates
		// (calibrateDue), at the sites the symbols give.
		u.log.V(1).Info("calibrate trap costs; assumed costs used", "error", err.Error())
		if u.calib, err = calibrationFromSymbols(bin); err != nil {
			return fmt.Errorf("start probe: cost calibration: %w: %w", probe.ErrNotSupported, err)
		}
	}
	if err := u.startGovernorLocked(time.Now()); err != nil {
		return fmt.Errorf("start probe: cost governor: %w", err)
	}
	if loading.counts == nil {
		u.log.V(1).Info("trap sampler unavailable; calibrated costs stand", "error", loading.noSampler.Error())
	} else if err := u.startSamplerLocked(int64(loading.counts.Offset)); err != nil {
		u.log.V(1).Info("trap sampler unavailable; calibrated costs stand", "error", err.Error())
	}
	u.wakeFile.SetReadDeadline(past)
	step("governor")
	u.takeNestedAtStartLocked(ctx)
	step("nested")
	u.running = true
	u.calibLane.holdLow(time.Now().Add(startCalibHold))
	u.readCounters()
	u.publishStatsLocked(time.Now())
	if len(u.pending) > 0 {
		select { // the reader delivers the crash records now (deliverPending)
		case u.readerWake <- struct{}{}:
		default:
		}
	}
	u.scanPaced.Store(true) // from now on its CPU is the budget's
	u.log.V(4).Info("probe started", append([]any{"sites", len(u.sites), "inactive", len(u.inactive),
		"uprobeMulti", u.multi, "took", time.Since(begin)}, steps...)...)
	return nil
}

func (u *uprobes) Ignore(goid uint64) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.ignore == nil {
		return probe.ErrClosed
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
	u.calibStop.Store(true)
	u.lane.open() // every link call waiting goes now
	u.calibLane.open()
	u.stopNestedScanLocked()
	if u.samp != nil {
		u.samp.close() // its tracepoint link: the program stops running
	}
	// Every link closes in parallel, with the detaches the governor
	// started (sites attached together share a link: closed once). A
	// slice, not a map: a missing-key read here would hit the Guard's own
	// probes while they are still attached.
	var wg sync.WaitGroup
	var closing []link.Link
	for _, s := range u.sites {
		if s.link == nil || slices.Contains(closing, s.link) {
			s.link = nil
			continue
		}
		closing = append(closing, s.link)
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
		if u.wakeFile != nil {
			u.wakeFile.Close() // the waker's wait ends: it returns
		}
		if u.wakeDone != nil {
			u.mu.Unlock()
			<-u.wakeDone // it may be waiting for u.mu
			u.mu.Lock()
		}
		u.wakeReader.Close() // once the waker no longer reads it
		u.wakeReader, u.wakeDone, u.wakeFile = nil, nil, nil
	}
	if u.deepReader != nil {
		if u.deepDone != nil {
			close(u.deepStop)
			u.mu.Unlock()
			<-u.deepDone
			u.mu.Lock()
		}
		u.deepReader.Close()
		u.deepReader, u.deepDone = nil, nil
	}
	if u.reader != nil {
		if u.done != nil {
			close(u.readerStop) // the reader drains the ring, then returns
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
	u.coll = nil
	u.publishStatsLocked(time.Now()) // the final counters, from s.final
	if u.crash != nil {
		releaseCrashStore(u.crash, u.log)
	}
	for _, s := range u.sites {
		if s.flags&siteCaller != 0 {
			removeProbed(uintptr(s.wrapRet[0] - 5)) // its link is closed
		}
	}
	u.coll, u.reader, u.ignore, u.stats, u.done, u.aggs, u.crash = nil, nil, nil, nil, nil, nil, nil
}

// ctxErr is ctx's error as Start returns it, checked between its steps.
func ctxErr(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("start probe: %w", err)
	}
	return nil
}

// armDefaultLocked attaches the always-on sites; the deep ones are armed
// by the governor after the canary.
func (u *uprobes) armDefaultLocked() error {
	fail := func(s *site, err error) error {
		if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
			return fmt.Errorf("start probe: attach %s+%#x: %w: %w", s.fn.Name, s.at.Offset, probe.ErrPermission, err)
		}
		return fmt.Errorf("start probe: attach %s+%#x: %w", s.fn.Name, s.at.Offset, err)
	}
	// The statistics' sites share one link (uprobe_multi): in a storm the
	// governor samples them together, with one detach instead of one
	// each (a link costs the process about a millisecond of CPU).
	var shared []*site
	for _, s := range u.sites {
		if s.deep {
			continue // armed after the canary
		}
		if u.multi && u.statisticSite(s) {
			shared = append(shared, s)
			continue
		}
		if err := u.armLocked(s); err != nil {
			return fail(s, err)
		}
	}
	if len(shared) > 0 {
		slices.SortStableFunc(shared, startOrder)
		l, err := u.attachMulti(shared, u.coll.Programs[mapguardProgMapguardSite])
		if err != nil {
			return fail(shared[0], err)
		}
		for _, s := range shared {
			s.link = l
			u.startShared = append(u.startShared, int(s.index))
		}
	}
	return nil
}

// startOrder orders Start's shared link, the sites likeliest to be hot
// first: when the governor detaches the link in Start's storm, the kernel
// removes its breakpoints in that order, the first at once and the others
// a grace period or so apart (see hottestFirst), and the storm's traps go
// on until the hot sites' are gone. No rate is measured yet, so the order
// is a prior: single-stepped sites first (a hit costs 10-30 times an
// emulated one); then the string-keyed fast paths (net/http's header
// lookups miss in mapaccess1_faststr thousands of times a second), then
// the 32- and 64-bit ones (the runtime's own nil-map reads on reflect's
// type lookups); sites at one instruction side by side (one breakpoint,
// gone when both are). On the seeded service, in index order, the hot
// faststr miss site came 20th of 20: Start's storm once took 6.7 ms of
// traps, 3.4 ms of them after the link's detach began.
func startOrder(a, b *site) int {
	rank := func(s *site) int {
		r := 0
		if s.at.Emulated {
			r = 3
		}
		switch {
		case strings.HasSuffix(s.fn.Name, "_faststr"):
		case strings.HasSuffix(s.fn.Name, "_fast32"), strings.HasSuffix(s.fn.Name, "_fast64"):
			r++
		default:
			r += 2
		}
		return r
	}
	return cmp.Or(cmp.Compare(rank(a), rank(b)), cmp.Compare(a.fn.FileOffset+a.at.Offset, b.fn.FileOffset+b.at.Offset))
}

// statisticSite reports whether s serves only statistics (reads of
// missing keys and of nil maps, by default), or a kind nobody asked for
// (the canary's, the nested misses' helpers): the governor never pins or
// prioritizes such a site, and samples it first.
func (u *uprobes) statisticSite(s *site) bool {
	if s.deep || s.flags&(siteCaller|siteGrowth) != 0 {
		return false
	}
	return u.statsOnly[s.kind] || !u.watched[s.kind]
}
