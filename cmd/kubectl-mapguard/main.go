// Command kubectl-mapguard is a kubectl plugin (install it on PATH, or with
// krew) that reads a service's mapguard debug handler (package debughttp):
//
//	kubectl mapguard watch   pod/NAME|deploy/NAME [-n NS] [--kind K,...] [--since 5m] [-o text|json]
//	kubectl mapguard stats   pod/NAME|deploy/NAME [-n NS] [--kind K,...] [-o text|json]
//	kubectl mapguard sites   pod/NAME|deploy/NAME [-n NS] [--kind K,...] [--since 5m] [-o text|json]
//	kubectl mapguard crashes pod/NAME|deploy/NAME [-n NS] [--since 24h] [-o text|json]
//
// It reaches the pod through a port-forward to --port (the port the
// service serves its debug mux on, default 6060), as kubectl port-forward
// does, or a service directly with --address host:port instead of a pod.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

// fail prints err and returns the exit status for it.
func fail(stderr interface{ Write([]byte) (int, error) }, err error) int {
	fmt.Fprintln(stderr, "kubectl-mapguard:", err)
	return 1
}
