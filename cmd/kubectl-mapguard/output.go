package main

import (
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/mapguard/mapguard/debughttp"
)

// printer writes the documents as aligned text for a person at a terminal
// (coloured when it is one) or as JSON (one document, or one event per
// line for watch) for programs.
type printer struct {
	w     io.Writer
	json  bool
	color bool
}

func newPrinter(w io.Writer, format string, color bool) *printer {
	return &printer{w: w, json: format == "json", color: color}
}

const (
	red    = "\x1b[31m"
	yellow = "\x1b[33m"
	dim    = "\x1b[2m"
	bold   = "\x1b[1m"
	reset  = "\x1b[0m"
)

// paint colours s when colour is on. Escape codes are zero-width for a
// terminal but not for tabwriter, so painted cells come last on a line or
// are padded before painting.
func (p *printer) paint(code, s string) string {
	if !p.color {
		return s
	}
	return code + s + reset
}

// kindColor: bugs red, idioms and memory yellow.
func kindColor(kind string) string {
	switch kind {
	case "nil-map-write", "concurrent-misuse", "previous-crash", "unhashable-key", "shared-writers":
		return red
	}
	return yellow
}

func (p *printer) writeJSON(v any) error {
	enc := json.NewEncoder(p.w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func site(f debughttp.Frame) string {
	if f.File == "" {
		return f.Function
	}
	return shortFile(f.File) + ":" + strconv.Itoa(f.Line)
}

// shortFile keeps the last two elements of a path: enough to find the file.
func shortFile(file string) string {
	parts := strings.Split(file, "/")
	if len(parts) > 2 {
		return strings.Join(parts[len(parts)-2:], "/")
	}
	return file
}

func (p *printer) event(ev debughttp.Event) error {
	if p.json {
		b, err := json.Marshal(ev)
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(p.w, "%s\n", b)
		return err
	}
	extra := ev.MapType
	if ev.Count > 1 {
		extra += " count=" + strconv.FormatUint(ev.Count, 10)
	}
	if ev.Detail != "" {
		extra += " " + strconv.Quote(ev.Detail)
	}
	if ev.Sampled {
		extra += " (sampled)"
	}
	_, err := fmt.Fprintf(p.w, "%s  %s  %-28s %s  %s\n",
		p.paint(dim, ev.Time.Local().Format("15:04:05.000")),
		p.paint(kindColor(ev.Kind), fmt.Sprintf("%-18s", ev.Kind)),
		site(ev.Site), p.paint(dim, fmt.Sprintf("g%-6d", ev.Goroutine)), extra)
	return err
}

func (p *printer) stats(st debughttp.Stats) error {
	if p.json {
		return p.writeJSON(st)
	}
	tw := tabwriter.NewWriter(p.w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, p.paint(bold, "KIND")+"\tEVENTS")
	kinds := make([]string, 0, len(st.Events))
	for k := range st.Events {
		kinds = append(kinds, k)
	}
	slices.Sort(kinds)
	for _, k := range kinds {
		n := strconv.FormatUint(st.Events[k], 10)
		if st.Events[k] > 0 {
			n = p.paint(kindColor(k), n)
		}
		fmt.Fprintf(tw, "%s\t%s\n", k, n)
	}
	tw.Flush()
	fmt.Fprintf(p.w, "\ndropped: kernel %d, queue %d, channel %d; callback panics %d\n",
		st.Dropped["kernel"], st.Dropped["queue"], st.Dropped["channel"], st.CallbackPanics)
	fmt.Fprintf(p.w, "probe sites: %d armed, %d disarmed, %d sampled, %d inactive\n",
		st.ProbeSites["armed"], st.ProbeSites["disarmed"], st.ProbeSites["sampled"], st.ProbeSites["inactive"])
	switch {
	case st.CrashRecord != "":
		fmt.Fprintf(p.w, "crash record: %s\n", st.CrashRecord)
	case st.CrashRecordError != "":
		fmt.Fprintf(p.w, "crash record: none (%s)\n", st.CrashRecordError)
	default:
		fmt.Fprintln(p.w, "crash record: off")
	}
	if b := st.Budget; b != nil {
		fmt.Fprintf(p.w, "budget: %.2f%% of a CPU, spent %.3f%% (%v); a trap costs %v single-stepped, %v emulated; %d sites sampled\n",
			b.Budget*100, b.Overhead*100, b.Spent.Round(time.Microsecond), b.StepCost.Round(10*time.Nanosecond), b.EmulatedCost.Round(10*time.Nanosecond), b.Sampled)
	}
	_, err := fmt.Fprintf(p.w, "event watchers: %d open, %d dropped for being slow\n", st.Watchers, st.WatchersDropped)
	return err
}

func ago(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return time.Since(t).Round(time.Second).String() + " ago"
}

func (p *printer) sites(s debughttp.Sites) error {
	if p.json {
		return p.writeJSON(s)
	}
	tw := tabwriter.NewWriter(p.w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "KIND\tCOUNT\tLAST\tSITE\tFUNCTION\tMAP TYPE")
	for _, c := range s.Calls {
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\n", c.Kind, c.Count, ago(c.Last), site(c.Site), c.Site.Function, c.MapType)
	}
	if len(s.Calls) == 0 {
		fmt.Fprintln(tw, "(no events yet)")
	}
	tw.Flush()
	if len(s.Operations) > 0 {
		fmt.Fprintln(p.w)
		tw = tabwriter.NewWriter(p.w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "OP\tCOUNT\tSITE\tFUNCTION\tMAP TYPE")
		for _, o := range s.Operations {
			fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\n", o.Op, o.Count, site(o.Site), o.Site.Function, o.MapType)
		}
		tw.Flush()
	}
	fmt.Fprintln(p.w)
	tw = tabwriter.NewWriter(p.w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PROBE\tKIND\tINST\tARMED\tHITS\tEVENTS\tCOST\tSAMPLED")
	for _, pr := range s.Probes {
		armed := "yes"
		if !pr.Armed {
			armed = "no"
		}
		sampled := "-"
		if pr.Sampled {
			sampled = pr.Window.String() + " every " + pr.Period.Round(time.Millisecond).String()
		}
		fmt.Fprintf(tw, "%s+%#x\t%s\t%s\t%s\t%d\t%d\t%v\t%s\n", pr.Function, pr.Offset, pr.Kind, pr.Inst, armed, pr.Hits, pr.Events, pr.Cost.Round(10*time.Nanosecond), sampled)
	}
	return tw.Flush()
}

func (p *printer) crashes(cr debughttp.Crashes) error {
	if p.json {
		return p.writeJSON(cr)
	}
	if len(cr.Reports) == 0 {
		fmt.Fprintln(p.w, "no crash reports")
	}
	for _, r := range cr.Reports {
		fmt.Fprintf(p.w, "%s %s pid %d: %s\n", p.paint(red, r.Kind), r.Time.Local().Format(time.RFC3339), r.PID, strconv.Quote(r.Detail))
		fmt.Fprintf(p.w, "  at %s (%s), goroutine %d, %s\n", site(r.Site), r.Site.Function, r.Goroutine, r.MapType)
		if r.Peer != nil {
			fmt.Fprintf(p.w, "  the other writer: goroutine %d at %s (%s)\n", r.Peer.Goroutine, site(r.Peer.Site), r.Peer.Site.Function)
		}
		for _, f := range r.Stack {
			fmt.Fprintf(p.w, "    %s\n      %s:%d\n", f.Function, f.File, f.Line)
		}
	}
	if cr.Error != "" {
		fmt.Fprintf(p.w, "(pinned reports not read: %s)\n", cr.Error)
	}
	return nil
}
