package debughttp

import (
	"time"

	"github.com/mapguard/mapguard"
)

// The JSON documents the handler serves. They are the wire format that
// kubectl-mapguard reads; fields are only ever added.

// Frame is a stack frame.
type Frame struct {
	Function string `json:"function"`
	File     string `json:"file,omitempty"`
	Line     int    `json:"line,omitempty"`
}

// Peer is the other goroutine of a SharedWriters or ConcurrentMisuse event.
type Peer struct {
	Goroutine uint64 `json:"goroutine"`
	Site      Frame  `json:"site"`
}

// Event is a mapguard.Event. Key is only what Options.CaptureKeys
// returned; key bytes never leave the process.
type Event struct {
	Kind      string    `json:"kind"`
	Time      time.Time `json:"time"`
	Goroutine uint64    `json:"goroutine,omitempty"`
	Site      Frame     `json:"site"`
	Stack     []Frame   `json:"stack,omitempty"`
	MapType   string    `json:"mapType,omitempty"`
	Len       int       `json:"len"`
	Count     uint64    `json:"count"`
	Probe     string    `json:"probe,omitempty"`
	Detail    string    `json:"detail,omitempty"`
	Capacity  uint64    `json:"capacity,omitempty"`
	Bytes     uint64    `json:"bytes,omitempty"`
	PID       int       `json:"pid,omitempty"`
	Peer      *Peer     `json:"peer,omitempty"`
	KeyHash   uint64    `json:"keyHash,omitempty"`
	KeyLen    int       `json:"keyLen,omitempty"`
	Key       string    `json:"key,omitempty"`
	Sampled   bool      `json:"sampled,omitempty"`
	// Text is the event's one-line description (mapguard.Event.String).
	Text string `json:"text"`
}

// Stats is the stats document: a mapguard.Stats.
type Stats struct {
	Events  map[string]uint64 `json:"events"` // per kind name, every kind
	Dropped map[string]uint64 `json:"dropped"`
	// DroppedByKind counts the same drops per kind name.
	DroppedByKind  map[string]uint64 `json:"droppedByKind"`
	CallbackPanics uint64            `json:"callbackPanics"`
	// ProbeSites counts the probe sites per state: armed, disarmed,
	// sampled (attached in short windows, over the budget), inactive.
	ProbeSites       map[string]int `json:"probeSites"`
	CrashRecord      string         `json:"crashRecord,omitempty"`
	CrashRecordError string         `json:"crashRecordError,omitempty"`
	Budget           *Budget        `json:"budget,omitempty"`
	// Watchers is how many event streams are open; WatchersDropped how many
	// were dropped for being too slow.
	Watchers        int    `json:"watchers"`
	WatchersDropped uint64 `json:"watchersDropped"`
}

// Budget is mapguard.BudgetStats: the cost governor.
type Budget struct {
	Budget       float64       `json:"budget"`
	StepCost     time.Duration `json:"stepCostNs"`
	EmulatedCost time.Duration `json:"emulatedCostNs"`
	TrapScale    float64       `json:"trapScale"`
	Spent        time.Duration `json:"spentNs"`
	Traps        time.Duration `json:"trapsNs"`
	Overhead     float64       `json:"overhead"`
	WorstSecond  time.Duration `json:"worstSecondNs"`
	Sampled      int           `json:"sampled"`
}

// Sites is the sites document.
type Sites struct {
	// Calls are the user call sites with events since the handler was
	// created, and the Guard's statistics of idioms (missing-key and
	// nil-map reads, counted per call site since Start; Statistic set),
	// per kind, most first; at most Options.MaxSites, the rest summed in
	// one entry whose Site.Function is "other".
	Calls []CallSite `json:"calls"`
	// Probes are the probe sites in the runtime's map functions.
	Probes []ProbeSite `json:"probes"`
	// Operations are the map operations per call site (Options.OpStats of
	// the Guard), most first, bounded like Calls.
	Operations []Operation `json:"operations,omitempty"`
}

// CallSite counts one kind's occurrences at one call site: the sum of
// Event.Count, so an aggregated missing-key-read event adds all the reads
// it stands for.
type CallSite struct {
	Kind    string    `json:"kind"`
	Site    Frame     `json:"site"`
	MapType string    `json:"mapType,omitempty"`
	Count   uint64    `json:"count"`
	Last    time.Time `json:"last,omitzero"`
	// Statistic: an idiom counted by the Guard (Stats.CallSites), not
	// events; CommaOK: comma-ok reads; Estimated: scaled while sampled.
	Statistic bool `json:"statistic,omitempty"`
	CommaOK   bool `json:"commaOK,omitempty"`
	Estimated bool `json:"estimated,omitempty"`
}

// ProbeSite is a mapguard.SiteStats.
type ProbeSite struct {
	Function string `json:"function"`
	Offset   uint64 `json:"offset"`
	Kind     string `json:"kind"`
	Deep     bool   `json:"deep,omitempty"`
	Inst     string `json:"inst"`
	Emulated bool   `json:"emulated"`
	Armed    bool   `json:"armed"`
	Hits     uint64 `json:"hits"`
	Events   uint64 `json:"events"`
	Dropped  uint64 `json:"dropped"`
	// Cost is what one hit costs here, as measured, its trap booked at
	// TrapScale times the calibration; Sampled: over the budget, attached
	// for Window every Period.
	Cost      time.Duration `json:"costNs"`
	TrapScale float64       `json:"trapScale"`
	Sampled   bool          `json:"sampled,omitempty"`
	Window    time.Duration `json:"windowNs,omitempty"`
	Period    time.Duration `json:"periodNs,omitempty"`
}

// Operation is a mapguard.OpStat.
type Operation struct {
	Op      string `json:"op"`
	Site    Frame  `json:"site"`
	MapType string `json:"mapType,omitempty"`
	Count   uint64 `json:"count"`
}

// Crashes is the crashes document.
type Crashes struct {
	// Reports are the PreviousCrash and ConcurrentMisuse events the handler
	// saw, and the reports still pinned for this program.
	Reports []Event `json:"reports"`
	// Error says why the pinned reports could not be read ("" if they
	// were).
	Error string `json:"error,omitempty"`
}

func frameJSON(f mapguard.Frame) Frame {
	return Frame{Function: f.Function, File: f.File, Line: f.Line}
}

// eventJSON converts ev to its JSON document.
func eventJSON(ev mapguard.Event) Event {
	e := Event{
		Kind: ev.Kind.String(), Time: ev.Time, Goroutine: ev.Goroutine, Site: frameJSON(ev.Site),
		MapType: ev.MapType, Len: ev.Len, Count: ev.Count, Probe: ev.Probe, Detail: ev.Detail,
		Capacity: ev.Capacity, Bytes: ev.Bytes, PID: ev.PID, KeyHash: ev.KeyHash, KeyLen: ev.KeyLen,
		Key: ev.Key, Sampled: ev.Sampled, Text: ev.String(),
	}
	for _, f := range ev.Stack {
		e.Stack = append(e.Stack, frameJSON(f))
	}
	if ev.Peer != nil {
		e.Peer = &Peer{Goroutine: ev.Peer.Goroutine, Site: frameJSON(ev.Peer.Site)}
	}
	return e
}
