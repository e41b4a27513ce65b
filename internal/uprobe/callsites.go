package uprobe

import (
	"sort"
	"sync"

	"github.com/mapguard/mapguard/decode"
	"github.com/mapguard/mapguard/probe"
)

// maxCallSites bounds the call-site table; occurrences at call sites
// beyond it are counted in callSites.overflow.
const maxCallSites = 4096

type callSiteKey struct {
	kind    decode.Kind
	commaOK bool
	pc      uintptr // the return PC of the probed function: the call site
}

// callSites is the table of per-call-site statistics. The reader writes
// it; Stats reads a copy.
type callSites struct {
	mu       sync.Mutex
	m        map[callSiteKey]*probe.CallSiteStats
	overflow uint64
}

// add books count occurrences of ev's kind at ev's call site (pc).
func (c *callSites) add(pc uintptr, commaOK bool, ev *decode.Event, count uint64, estimated bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = make(map[callSiteKey]*probe.CallSiteStats)
	}
	k := callSiteKey{ev.Kind, commaOK, pc}
	s, ok := c.m[k]
	if !ok {
		if len(c.m) >= maxCallSites {
			c.overflow += count
			return
		}
		s = &probe.CallSiteStats{Kind: ev.Kind, Site: ev.Site, MapType: ev.MapType, CommaOK: commaOK, First: ev.Time}
		c.m[k] = s
	}
	if s.MapType == "" {
		s.MapType = ev.MapType
	}
	s.Count += count
	s.Estimated = s.Estimated || estimated
	s.Last = ev.Time
}

// snapshot returns the table, most counted first.
func (c *callSites) snapshot() ([]probe.CallSiteStats, uint64) {
	c.mu.Lock()
	out := make([]probe.CallSiteStats, 0, len(c.m))
	for _, s := range c.m {
		out = append(out, *s)
	}
	overflow := c.overflow
	c.mu.Unlock()
	sort.Slice(out, func(i, j int) bool {
		if out[i].Count != out[j].Count {
			return out[i].Count > out[j].Count
		}
		return out[i].Site.PC < out[j].Site.PC
	})
	return out, overflow
}
