package debughttp

import (
	"cmp"
	"encoding/json"
	"fmt"
	"html/template"
	"net/http"
	"path"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/mapguard/mapguard"
)

// Options configures New. The zero value is valid.
type Options struct {
	// WatcherBuffer is how many events may wait for one event stream's
	// client; a watcher that falls further behind is dropped. Default 256.
	WatcherBuffer int
	// Recent is how many recent events are kept for ?since= replays.
	// Default 256.
	Recent int
	// MaxSites bounds the call sites and operations the sites document
	// lists one by one; the rest are summed into one "other" entry.
	// Default 20.
	MaxSites int
	// ReadCrashReports reads the crash reports still pinned for this
	// program; default mapguard.ReadCrashReports(""). Tests replace it.
	ReadCrashReports func() ([]mapguard.Event, error)
}

// maxCallSites bounds the call sites the handler counts; events at further
// sites are counted in the "other" entry of their kind.
const maxCallSites = 4096

// maxCrashes bounds the crash events kept.
const maxCrashes = 16

// Handler serves a Guard's figures and events. Create it with New; it is
// safe for concurrent use.
type Handler struct {
	g    *mapguard.Guard
	opts Options

	mu         sync.Mutex
	watchers   map[*watcher]struct{}
	dropped    uint64 // watchers dropped for being slow
	recent     []mapguard.Event
	next       int // ring index into recent once full
	crashes    []mapguard.Event
	calls      map[callKey]*CallSite
	closedCh   chan struct{}
	closedOnce sync.Once
}

type callKey struct {
	kind           mapguard.Kind
	function, file string
	line           int
}

type watcher struct {
	kinds map[mapguard.Kind]bool // nil: all
	ch    chan mapguard.Event
	gone  chan struct{} // closed when dropped for being slow
}

// New returns a Handler over g and registers its one OnEvent callback,
// which stays for the Guard's life. Create it before g.Start to see the
// PreviousCrash events Start delivers.
func New(g *mapguard.Guard, opts Options) *Handler {
	if opts.WatcherBuffer <= 0 {
		opts.WatcherBuffer = 256
	}
	if opts.Recent <= 0 {
		opts.Recent = 256
	}
	if opts.MaxSites <= 0 {
		opts.MaxSites = 20
	}
	if opts.ReadCrashReports == nil {
		opts.ReadCrashReports = func() ([]mapguard.Event, error) { return mapguard.ReadCrashReports("") }
	}
	h := &Handler{g: g, opts: opts, watchers: map[*watcher]struct{}{},
		calls: map[callKey]*CallSite{}, closedCh: make(chan struct{})}
	g.OnEvent(h.observe)
	return h
}

// observe runs on the Guard's dispatch goroutine: it must not block.
func (h *Handler) observe(ev mapguard.Event) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.recent) < h.opts.Recent {
		h.recent = append(h.recent, ev)
	} else {
		h.recent[h.next] = ev
		h.next = (h.next + 1) % len(h.recent)
	}
	if ev.Kind == mapguard.PreviousCrash || ev.Kind == mapguard.ConcurrentMisuse {
		if len(h.crashes) == maxCrashes {
			h.crashes = h.crashes[1:]
		}
		h.crashes = append(h.crashes, ev)
	}
	h.count(ev)
	for w := range h.watchers {
		if w.kinds != nil && !w.kinds[ev.Kind] {
			continue
		}
		select {
		case w.ch <- ev:
		default: // too slow: drop the watcher, never wait
			delete(h.watchers, w)
			close(w.gone)
			h.dropped++
		}
	}
}

func (h *Handler) count(ev mapguard.Event) {
	k := callKey{ev.Kind, ev.Site.Function, ev.Site.File, ev.Site.Line}
	c := h.calls[k]
	if c == nil {
		if len(h.calls) >= maxCallSites {
			k = callKey{kind: ev.Kind, function: other}
			c = h.calls[k]
		}
		if c == nil {
			c = &CallSite{Kind: ev.Kind.String(), Site: Frame{Function: k.function, File: k.file, Line: k.line}}
			if k.function != other {
				c.MapType = ev.MapType
			}
			h.calls[k] = c
		}
	}
	n := ev.Count
	if n == 0 {
		n = 1
	}
	c.Count += n
	c.Last = ev.Time
}

const other = "other"

// Close ends every open event stream; call it before the server's
// Shutdown, which does not end running handlers (or register it with
// http.Server.RegisterOnShutdown). Later streams end at once. The other
// documents are still served.
func (h *Handler) Close() {
	h.closedOnce.Do(func() { close(h.closedCh) })
}

// ServeHTTP implements http.Handler. It serves the document named by the
// last element of the request's path, wherever the handler is mounted.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "read-only: GET or HEAD", http.StatusMethodNotAllowed)
		return
	}
	name := ""
	if !strings.HasSuffix(r.URL.Path, "/") {
		name = path.Base(r.URL.Path)
	}
	switch name {
	case "":
		h.index(w, r)
	case "stats":
		writeJSON(w, h.stats())
	case "sites":
		writeJSON(w, h.sites())
	case "crashes":
		writeJSON(w, h.crashReports())
	case "events":
		h.events(w, r)
	default:
		http.NotFound(w, r)
	}
}

var indexPage = template.Must(template.New("index").Parse(`<!DOCTYPE html>
<html><head><title>mapguard</title></head><body>
<h1>mapguard</h1>
<p>Map misuse events: {{.Total}} (dropped {{.Dropped}}). Probe sites: {{.Armed}} armed, {{.Disarmed}} disarmed, {{.Inactive}} inactive.</p>
<table>
<tr><td><a href="stats">stats</a></td><td>the Guard's counters (JSON)</td></tr>
<tr><td><a href="sites">sites</a></td><td>call sites with events, probe sites, operations per call site (JSON)</td></tr>
<tr><td><a href="events">events</a></td><td>events as server-sent events; ?kind=nil-map-write filters, ?since=5m replays recent ones</td></tr>
<tr><td><a href="crashes">crashes</a></td><td>reports of concurrent map misuse that killed a process of this program (JSON)</td></tr>
</table>
</body></html>
`))

func (h *Handler) index(w http.ResponseWriter, r *http.Request) {
	st := h.stats()
	var total uint64
	for _, n := range st.Events {
		total += n
	}
	var dropped uint64
	for _, n := range st.Dropped {
		dropped += n
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	indexPage.Execute(w, map[string]any{"Total": total, "Dropped": dropped,
		"Armed": st.ProbeSites["armed"], "Disarmed": st.ProbeSites["disarmed"], "Inactive": st.ProbeSites["inactive"]})
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// stats maps the Guard's Stats to the stats document.
func (h *Handler) stats() Stats {
	s := h.g.Stats()
	st := Stats{
		Events:           map[string]uint64{},
		Dropped:          map[string]uint64{"kernel": s.DroppedKernel, "queue": s.DroppedQueue, "channel": s.DroppedChannel},
		CallbackPanics:   s.CallbackPanics,
		ProbeSites:       map[string]int{"armed": 0, "disarmed": 0, "inactive": len(s.Inactive)},
		CrashRecord:      s.CrashRecord,
		CrashRecordError: s.CrashRecordError,
	}
	for _, k := range kinds() {
		st.Events[k.String()] = s.Events[k]
	}
	for _, p := range s.Sites {
		if p.Armed {
			st.ProbeSites["armed"]++
		} else {
			st.ProbeSites["disarmed"]++
		}
		if p.Sampled {
			st.ProbeSites["sampled"]++
		}
	}
	if b := s.Budget; b != nil {
		st.Budget = &Budget{Budget: b.Budget, StepCost: b.StepCost, EmulatedCost: b.EmulatedCost, TrapScale: b.TrapScale,
			Spent: b.Spent, Traps: b.Traps, Overhead: b.Overhead, WorstSecond: b.WorstSecond, Sampled: b.Sampled}
	}
	st.DroppedByKind = make(map[string]uint64)
	for k, n := range s.DroppedByKind {
		st.DroppedByKind[k.String()] = n
	}
	h.mu.Lock()
	st.Watchers, st.WatchersDropped = len(h.watchers), h.dropped
	h.mu.Unlock()
	return st
}

func kinds() []mapguard.Kind {
	var ks []mapguard.Kind
	for k := mapguard.Kind(1); k.Valid(); k++ {
		ks = append(ks, k)
	}
	return ks
}

func (h *Handler) sites() Sites {
	var out Sites
	h.mu.Lock()
	calls := make([]CallSite, 0, len(h.calls))
	for _, c := range h.calls {
		calls = append(calls, *c)
	}
	h.mu.Unlock()
	gs := h.g.Stats()
	for _, c := range gs.CallSites {
		calls = append(calls, CallSite{Kind: c.Kind.String(), Site: frameJSON(c.Site), MapType: c.MapType, Count: c.Count,
			Last: c.Last, Statistic: true, CommaOK: c.CommaOK, Estimated: c.Estimated})
	}
	slices.SortFunc(calls, func(a, b CallSite) int {
		if c := cmp.Compare(b.Count, a.Count); c != 0 {
			return c
		}
		return cmp.Or(cmp.Compare(a.Kind, b.Kind), cmp.Compare(a.Site.File, b.Site.File), cmp.Compare(a.Site.Line, b.Site.Line))
	})
	if len(calls) > h.opts.MaxSites {
		rest := CallSite{Kind: other, Site: Frame{Function: other}}
		for _, c := range calls[h.opts.MaxSites:] {
			rest.Count += c.Count
			if c.Last.After(rest.Last) {
				rest.Last = c.Last
			}
		}
		calls = append(calls[:h.opts.MaxSites], rest)
	}
	out.Calls = calls

	for _, p := range gs.Sites {
		kind := "operations"
		if p.Kind != 0 {
			kind = p.Kind.String()
		}
		out.Probes = append(out.Probes, ProbeSite{Function: p.Function, Offset: p.Offset, Kind: kind, Deep: p.Deep,
			Inst: p.Inst, Emulated: p.Emulated, Armed: p.Armed, Hits: p.Hits, Events: p.Events, Dropped: p.Dropped,
			Cost: p.Cost, TrapScale: p.TrapScale, Sampled: p.Sampled, Window: p.Window, Period: p.Period})
	}

	ops := h.g.OpStats()
	slices.SortFunc(ops, func(a, b mapguard.OpStat) int { return cmp.Compare(b.Count, a.Count) })
	for i, o := range ops {
		if i == h.opts.MaxSites {
			rest := Operation{Op: other, Site: Frame{Function: other}}
			for _, o := range ops[i:] {
				rest.Count += o.Count
			}
			out.Operations = append(out.Operations, rest)
			break
		}
		out.Operations = append(out.Operations, Operation{Op: o.Op.String(), Site: frameJSON(o.Site), MapType: o.MapType, Count: o.Count})
	}
	return out
}

func (h *Handler) crashReports() Crashes {
	var c Crashes
	h.mu.Lock()
	for _, ev := range h.crashes {
		c.Reports = append(c.Reports, eventJSON(ev))
	}
	h.mu.Unlock()
	pinned, err := h.opts.ReadCrashReports()
	if err != nil {
		c.Error = err.Error()
	}
	for _, ev := range pinned {
		c.Reports = append(c.Reports, eventJSON(ev))
	}
	if c.Reports == nil {
		c.Reports = []Event{}
	}
	return c
}

// events streams events as server-sent events: "event: <kind>" and one
// Event document as data per event. ?kind= (repeatable, or comma-separated)
// filters by kind; ?since=<duration> first replays the kept events of that
// age or younger. A stream dropped for being slow ends with an event named
// "dropped".
//
// events is one server-sent-events stream: setup, replay, then the live loop; split, the stream's state would be scattered.
func (h *Handler) events(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	var filter map[mapguard.Kind]bool
	for _, v := range q["kind"] {
		for _, name := range strings.Split(v, ",") {
			k, ok := kindByName(strings.TrimSpace(name))
			if !ok {
				http.Error(w, fmt.Sprintf("unknown kind %q", name), http.StatusBadRequest)
				return
			}
			if filter == nil {
				filter = map[mapguard.Kind]bool{}
			}
			filter[k] = true
		}
	}
	var since time.Duration
	if v := q.Get("since"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 {
			http.Error(w, fmt.Sprintf("bad since %q: want a duration such as 5m", v), http.StatusBadRequest)
			return
		}
		since = d
	}
	flusher, ok := w.(http.Flusher)
	if !ok {
		http.Error(w, "streaming unsupported", http.StatusInternalServerError)
		return
	}

	wt := &watcher{kinds: filter, ch: make(chan mapguard.Event, h.opts.WatcherBuffer), gone: make(chan struct{})}
	h.mu.Lock()
	var replay []mapguard.Event
	if since > 0 {
		cutoff := time.Now().Add(-since)
		for i := range h.recent {
			ev := h.recent[(h.next+i)%len(h.recent)]
			if !ev.Time.Before(cutoff) && (filter == nil || filter[ev.Kind]) {
				replay = append(replay, ev)
			}
		}
	}
	h.watchers[wt] = struct{}{}
	h.mu.Unlock()
	defer func() {
		h.mu.Lock()
		delete(h.watchers, wt)
		h.mu.Unlock()
	}()

	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	fmt.Fprint(w, ": mapguard events\n\n")
	for _, ev := range replay {
		if writeEvent(w, ev) != nil {
			return
		}
	}
	flusher.Flush()
	ping := time.NewTicker(15 * time.Second)
	defer ping.Stop()
	for {
		select {
		case ev := <-wt.ch:
			if writeEvent(w, ev) != nil {
				return
			}
			flusher.Flush()
		case <-wt.gone:
			fmt.Fprintf(w, "event: dropped\ndata: {\"reason\":\"the client read too slowly; %d events were waiting\"}\n\n", h.opts.WatcherBuffer)
			flusher.Flush()
			return
		case <-ping.C: // finds clients that went away
			if _, err := fmt.Fprint(w, ": ping\n\n"); err != nil {
				return
			}
			flusher.Flush()
		case <-r.Context().Done():
			return
		case <-h.closedCh:
			return
		}
	}
}

func writeEvent(w http.ResponseWriter, ev mapguard.Event) error {
	b, err := json.Marshal(eventJSON(ev))
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "event: %s\ndata: %s\n\n", ev.Kind, b)
	return err
}

func kindByName(name string) (mapguard.Kind, bool) {
	for _, k := range kinds() {
		if k.String() == name {
			return k, true
		}
	}
	return 0, false
}
