//go:build linux && amd64

package uprobe

import (
	"fmt"
	"os"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// armLocked attaches one site, filtered to this process.
func (u *uprobes) armLocked(s *site) error {
	if s.link != nil {
		return nil
	}
	l, err := u.attach(s, u.program(s.deep))
	if err != nil {
		return err
	}
	s.link = l
	return nil
}

// program is the BPF program of the always-on sites, or of the deep ones.
func (u *uprobes) program(deep bool) *ebpf.Program {
	if deep {
		return u.coll.Programs[mapguardProgMapguardDeep]
	}
	return u.coll.Programs[mapguardProgMapguardSite]
}

// attach attaches prog at s, filtered to this process, with s's cookie.
func (u *uprobes) attach(s *site, prog *ebpf.Program) (link.Link, error) {
	return attachSite(u.ex, u.multi, s, prog)
}

// attachSite attaches prog at s in ex, for this process only, with a
// uprobe_multi link where multi, else a perf-event uprobe.
func attachSite(ex *link.Executable, multi bool, s *site, prog *ebpf.Program) (link.Link, error) {
	off := s.fn.FileOffset + s.at.Offset
	if multi {
		return ex.UprobeMulti(nil, prog, &link.UprobeMultiOptions{
			Addresses: []uint64{off},
			Cookies:   []uint64{s.cookie()},
			PID:       uint32(os.Getpid()),
		})
	}
	return ex.Uprobe("", prog, &link.UprobeOptions{
		Address: off,
		Cookie:  s.cookie(),
		PID:     os.Getpid(),
	})
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

// attachMulti attaches prog at every site in sites with one uprobe_multi
// link, for this process only, each site's cookie its cookie.
func (u *uprobes) attachMulti(sites []*site, prog *ebpf.Program) (link.Link, error) {
	return attachMultiSites(u.ex, sites, prog)
}

// attachMultiSites is attachMulti in ex, for callers off u.mu (the sites'
// offsets never change, and their cookies only when a move gives an
// attached site a new link).
func attachMultiSites(ex *link.Executable, sites []*site, prog *ebpf.Program) (link.Link, error) {
	opts := &link.UprobeMultiOptions{PID: uint32(os.Getpid())}
	for _, s := range sites {
		opts.Addresses = append(opts.Addresses, s.fn.FileOffset+s.at.Offset)
		opts.Cookies = append(opts.Cookies, s.cookie())
	}
	return ex.UprobeMulti(nil, prog, opts)
}
