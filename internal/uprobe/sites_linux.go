//go:build linux && amd64

package uprobe

import (
	"errors"
	"fmt"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"

	"github.com/mapguard/mapguard/decode"
	"github.com/mapguard/mapguard/internal/wire"
	"github.com/mapguard/mapguard/internal/x86site"
	"github.com/mapguard/mapguard/probe"
	"github.com/mapguard/mapguard/symbols"
)

// chooseSites decodes every target function present in the binary. The
// canary's site is always chosen; if its kind is not watched, only the
// canary's own events come from it.
//
// chooseSites is one table-driven loop over the kinds; its length is
// the per-kind cases, kept together so that each kind's choice reads whole.
func (u *uprobes) chooseSites(bin *symbols.Binary) error {
	callee := symbolsCallee(bin)
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
			u.watched[kind] = true // u.deep is set (Config.deep)
			continue
		}
		ts, ok := targets[kind]
		if !ok {
			return fmt.Errorf("start probe: kind %s: %w", kind, probe.ErrNotSupported)
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
		if w.t.record && u.cfg.NoCrashRecord {
			continue
		}
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
				u.inactive = append(u.inactive, probe.Inactive{Kind: w.kind, Function: name, Reason: "not in binary"})
				continue
			}
			code, err := bin.Code(fn)
			if err != nil {
				return fmt.Errorf("start probe: read %s: %w", name, err)
			}
			fs, err := w.t.find(code, fn.Entry, callee)
			if err != nil {
				u.inactive = append(u.inactive, probe.Inactive{Kind: w.kind, Function: name, Reason: err.Error()})
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
	if u.deep {
		return u.chooseDeepSites(bin, callee, wraps)
	}
	return nil
}

// symbolsCallee names a direct call's target, for the site finders.
func symbolsCallee(bin *symbols.Binary) func(uint64) string {
	return func(addr uint64) string {
		if f, ok := bin.FuncAt(addr); ok && f.Entry == addr {
			return f.Name
		}
		return ""
	}
}

// maxNestedSites bounds the inner reads of m[a][b] probed in the
// program's own code.
const maxNestedSites = 32

// nestedSpan is how far apart (in code bytes) the two CALLs of a nested
// read may be for the scan to look at them (the race detector's
// instrumentation and a concatenated key put 40-90 bytes between them).
const nestedSpan = 256

// nestedReads are the inner reads of m[a][b] in the program's code that
// findNestedReads found, as sites, with what it could not probe.
type nestedReads struct {
	sites    []*site // index unset
	inactive []probe.Inactive
}

// findNestedReads finds a site at the CALL of every inner read of an
// expression m[a][b] in the program's own code (the decoder's scope: not
// the runtime's or the standard library's), up to maxNestedSites: an
// emulated trap, taken only where such an expression runs, that sees the
// inner map in RBX and reports a nested-map miss when it is nil. So the
// nested miss is counted without the runtime's miss and nil-map sites,
// which every lookup of the program traps at (net/http's header lookups
// among them) and which the governor samples under load.
//
// Candidates come from a scan of the text for two calls of
// runtime.mapaccess1* close together; the stretch between them is
// decoded first (x86site.NestedCandidate: most such pairs are two reads
// of their own), and a candidate is kept only if decoding its whole
// function from the entry shows the nested read (x86site.NestedReads)
// and the running code holds the same CALL. On the 91 MB program of
// BenchmarkStartup: 1,650 calls, 349 close pairs, 6 candidates, 5
// functions decoded. Nothing here fails Start: what cannot be read or
// decoded is skipped. It runs after Start (startNestedScanLocked) and
// touches nothing of u; pace is called after each MiB of the text and
// each function decoded, and an error from it ends the search (complete is
// then false).
//
// It reads no map: in the watched process, after the probes are
// attached, a map read that misses is a trap at one of them (the
// decoder and the symbols' lookups keep to slices too).
func findNestedReads(bin *symbols.Binary, callee func(uint64) string, pace func() error) (out nestedReads, complete bool) {
	var targets []uint64
	for _, name := range []string{"runtime.mapaccess1", "runtime.mapaccess1_fast32", "runtime.mapaccess1_fast64", "runtime.mapaccess1_faststr"} {
		if f, ok := bin.Func(name); ok {
			targets = append(targets, f.Entry)
		}
	}
	var prev uint64
	var cands [][2]uint64 // outer and inner CALLs, in address order
	err := bin.CallsTo(targets, func(call uint64, upto []byte) {
		// The stretch between two close calls first (a few dozen bytes):
		// decoding every close pair's whole function would cost Start
		// tens of ms on a large program.
		if prev != 0 && call-prev <= nestedSpan {
			n := int(call - prev + 5)
			var window []byte
			if n <= len(upto) {
				window = upto[len(upto)-n:]
			} else if w, err := bin.Code(symbols.Func{Name: "nested read candidate", Entry: prev, End: call + 5}); err == nil {
				window = w // across two reads of the file
			}
			if window != nil && x86site.NestedCandidate(window, prev, callee) {
				cands = append(cands, [2]uint64{prev, call})
			}
		}
		prev = call
	}, pace)
	if errors.Is(err, errScanStopped) {
		return out, false
	}
	if err != nil {
		out.inactive = append(out.inactive, probe.Inactive{Kind: decode.NestedMapMiss, Function: "(program code)", Reason: err.Error()})
		return out, true
	}
	scope := wire.ProgramScope()
	var done []uint64 // functions decoded (candidates are in address order)
	bias := bin.LoadBias()
	for _, c := range cands {
		fn, ok := bin.FuncAt(c[1])
		if !ok || slices.Contains(done, fn.Entry) || !scope.Own(fn.Name) {
			continue
		}
		done = append(done, fn.Entry)
		if err := pace(); err != nil {
			return out, false
		}
		code, err := bin.Code(fn)
		if err != nil {
			continue
		}
		nested, err := x86site.NestedReads(code, fn.Entry, callee)
		if err != nil {
			out.inactive = append(out.inactive, probe.Inactive{Kind: decode.NestedMapMiss, Function: fn.Name, Reason: err.Error()})
			continue
		}
		for _, n := range nested {
			if len(out.sites) == maxNestedSites {
				out.inactive = append(out.inactive, probe.Inactive{Kind: decode.NestedMapMiss, Function: fn.Name,
					Reason: fmt.Sprintf("more than %d nested reads in the program", maxNestedSites)})
				return out, true
			}
			if !sameCode(code[n.Call.Offset:n.Call.Offset+5], uintptr(fn.Entry+bias+n.Call.Offset)) {
				continue // the running code is not the file's
			}
			f := found{at: n.Call, flags: siteCaller | siteNilOnly | siteAgg, mapReg: regBX, typReg: regAX,
				wrapRet: [2]uint64{n.Ret + bias, n.Outer + bias}}
			out.sites = append(out.sites, &site{kind: decode.NestedMapMiss, fn: fn, found: f})
		}
	}
	return out, true
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
		buildDesc(), strings.Join(msgs, ", "), probe.ErrNotSupported)
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
		target, ret, err := x86site.WrapperCall(code, fn.Entry, callee)
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
				calls, err := x86site.CallSites(code, fn.Entry, callee, readPairs[0][1])
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
//
// chooseDeepSites is long for the same reason as chooseSites.
func (u *uprobes) chooseDeepSites(bin *symbols.Binary, callee func(uint64) string, wraps wrappers) error {
	add := func(kind decode.Kind, fn symbols.Func, f found, op probe.Op, key uint8) error {
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
		case probe.OpWrite:
			if u.watched[decode.SharedWriters] {
				flags |= siteWriter
				kind = decode.SharedWriters
			}
		case probe.OpDelete:
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
			u.inactive = append(u.inactive, probe.Inactive{Kind: kind, Function: d.name, Reason: "not in binary"})
			continue
		}
		code, err := bin.Code(fn)
		if err != nil {
			return fmt.Errorf("start probe: read %s: %w", d.name, err)
		}
		at, err := x86site.EntrySite(code)
		if err != nil {
			u.inactive = append(u.inactive, probe.Inactive{Kind: kind, Function: d.name, Reason: err.Error()})
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
		u.inactive = append(u.inactive, probe.Inactive{Kind: decode.MissingKeyDelete, Function: deleteDoneFunc, Reason: "not in binary"})
		return nil
	}
	code, err := bin.Code(fn)
	if err != nil {
		return fmt.Errorf("start probe: read %s: %w", deleteDoneFunc, err)
	}
	at, reg, err := deleteDoneSite(code, fn.Entry, callee)
	if err != nil {
		u.inactive = append(u.inactive, probe.Inactive{Kind: decode.MissingKeyDelete, Function: deleteDoneFunc, Reason: err.Error()})
		return nil
	}
	return add(decode.MissingKeyDelete, fn, found{at: at, flags: siteDelDone, mapReg: reg, typReg: regNone}, probe.OpDelete, keyNone)
}

// deleteDoneSite finds the branch in (*Map).Delete after the entry was
// removed, if it was there: if m.used == 0 { m.seed = rand() }.
func deleteDoneSite(code []byte, entry uint64, callee func(uint64) string) (x86site.Site, uint8, error) {
	calls, err := x86site.CallSites(code, entry, callee, deleteDoneCall)
	if err != nil {
		return x86site.Site{}, 0, err
	}
	if len(calls) != 1 {
		return x86site.Site{}, 0, fmt.Errorf("%d calls of %s, want 1", len(calls), deleteDoneCall)
	}
	at, reg, err := x86site.GuardedCallSite(code, calls[0])
	if err != nil {
		return x86site.Site{}, 0, err
	}
	regs := map[string]uint8{"AX": regAX, "BX": regBX, "CX": regCX, "DX": regDX, "SI": regSI, "DI": regDI}
	r, ok := regs[reg]
	if !ok {
		return x86site.Site{}, 0, fmt.Errorf("map in %s", reg)
	}
	return at, r, nil
}

func (u *uprobes) hasSite(kind decode.Kind, fn string) bool {
	for _, s := range u.sites {
		if s.kind == kind && s.fn.Name == fn {
			return true
		}
	}
	return false
}
