module github.com/mapguard/mapguard

go 1.25.0

require (
	github.com/cilium/ebpf v0.22.0
	github.com/go-logr/logr v1.4.3
	golang.org/x/arch v0.30.0
	golang.org/x/sys v0.43.0
)

tool github.com/cilium/ebpf/cmd/bpf2go
