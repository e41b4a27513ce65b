package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"
)

const usage = `kubectl mapguard: read a service's mapguard debug handler.

Usage:
  kubectl mapguard COMMAND TARGET [flags]
  kubectl mapguard COMMAND --address HOST:PORT [flags]

Commands:
  watch     stream events as they happen (Ctrl-C ends)
  stats     the Guard's counters
  sites     call sites with events, probe sites, operations per call site
  crashes   reports of concurrent map misuse that killed a process of the program

TARGET is pod/NAME or deploy/NAME (a bare NAME is a pod), reached through a
port-forward to --port, as kubectl port-forward does.

Flags:
`

// config is what the command line asks for.
type config struct {
	command    string
	target     string
	namespace  string
	kubeconfig string
	context    string
	address    string
	port       int
	path       string
	kinds      []string
	output     string
	since      time.Duration
	count      int
	color      string
}

// parseArgs parses args; flags may come before or after the command and
// the target, as with kubectl.
func parseArgs(args []string, stderr io.Writer) (*config, error) {
	c := &config{}
	fs := flag.NewFlagSet("kubectl-mapguard", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, usage)
		fs.PrintDefaults()
	}
	var kinds string
	fs.StringVar(&c.namespace, "n", "", "namespace (short for --namespace)")
	fs.StringVar(&c.namespace, "namespace", "", "namespace of the target (default: the kubeconfig context's)")
	fs.StringVar(&c.kubeconfig, "kubeconfig", "", "path of the kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
	fs.StringVar(&c.context, "context", "", "kubeconfig context to use")
	fs.StringVar(&c.address, "address", "", "reach the handler at HOST:PORT directly instead of through a port-forward")
	fs.IntVar(&c.port, "port", 6060, "the pod's port that serves the debug handler")
	fs.StringVar(&c.path, "path", "/debug/mapguard/", "where the service mounts the debug handler")
	fs.StringVar(&kinds, "kind", "", "only these kinds, comma-separated (e.g. nil-map-write,missing-key-read)")
	fs.StringVar(&c.output, "o", "text", "output format: text or json (short for --output)")
	fs.StringVar(&c.output, "output", "text", "output format: text or json")
	fs.DurationVar(&c.since, "since", 0, "watch: first replay the events of this age the service kept (e.g. 5m); sites, crashes: only those seen within it")
	fs.IntVar(&c.count, "count", 0, "watch: exit after this many events (0: until interrupted)")
	fs.StringVar(&c.color, "color", "auto", "colour the text output: auto (when a terminal and NO_COLOR is unset), always or never")

	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		if fs.NArg() == 0 {
			break
		}
		positional = append(positional, fs.Arg(0))
		args = fs.Args()[1:]
	}
	if len(positional) == 0 {
		fs.Usage()
		return nil, errors.New("no command")
	}
	c.command = positional[0]
	switch c.command {
	case "watch", "stats", "sites", "crashes":
	default:
		return nil, fmt.Errorf("unknown command %q: want watch, stats, sites or crashes", c.command)
	}
	switch len(positional) {
	case 1:
		if c.address == "" {
			return nil, fmt.Errorf("%s: name a target (pod/NAME or deploy/NAME) or --address HOST:PORT", c.command)
		}
	case 2:
		if c.address != "" {
			return nil, fmt.Errorf("%s: a target and --address both given; use one", c.command)
		}
		c.target = positional[1]
	default:
		return nil, fmt.Errorf("%s: too many arguments: %q", c.command, positional[2:])
	}
	if kinds != "" {
		for _, k := range strings.Split(kinds, ",") {
			if k = strings.TrimSpace(k); k != "" {
				c.kinds = append(c.kinds, k)
			}
		}
	}
	if c.output != "text" && c.output != "json" {
		return nil, fmt.Errorf("-o %q: want text or json", c.output)
	}
	if c.since < 0 {
		return nil, fmt.Errorf("--since %v: negative", c.since)
	}
	if c.color != "auto" && c.color != "always" && c.color != "never" {
		return nil, fmt.Errorf("--color %q: want auto, always or never", c.color)
	}
	if !strings.HasPrefix(c.path, "/") {
		c.path = "/" + c.path
	}
	if !strings.HasSuffix(c.path, "/") {
		c.path += "/"
	}
	return c, nil
}

// run is the whole command; main only adds the process around it.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	c, err := parseArgs(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		return fail(stderr, err)
	}
	address := c.address
	if address == "" {
		fw, err := portForward(ctx, c, stderr)
		if err != nil {
			return fail(stderr, err)
		}
		defer fw.Close()
		address = fw.Address()
	}
	cl := &client{base: "http://" + address + c.path}
	out := newPrinter(stdout, c.output, useColor(c.color, stdout))
	switch c.command {
	case "stats":
		err = cmdStats(ctx, cl, out, c)
	case "sites":
		err = cmdSites(ctx, cl, out, c)
	case "crashes":
		err = cmdCrashes(ctx, cl, out, c)
	case "watch":
		err = cmdWatch(ctx, cl, out, c)
	}
	if err != nil && ctx.Err() == nil {
		return fail(stderr, err)
	}
	return 0
}

func useColor(mode string, w io.Writer) bool {
	switch mode {
	case "always":
		return true
	case "never":
		return false
	}
	if os.Getenv("NO_COLOR") != "" {
		return false
	}
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}
