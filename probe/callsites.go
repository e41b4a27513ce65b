package probe

import (
	"sort"
	"sync"
	"time"

	"github.com/mapguard/mapguard/decode"
)

// CallSiteStats counts the occurrences of one kind at one call site: how
// idioms (a read of a missing key where the zero value means absent, a read
// of a nil map) are reported by default, as statistics rather than events.
type CallSiteStats struct {
	Kind decode.Kind
	// Site is the user's frame that did the map operation; MapType the
	// map's type as the first occurrence read it.
	Site    decode.Frame
	MapType string
	// CommaOK: the reads are comma-ok reads (v, ok := m[k]), which say
	// themselves whether the key was there.
	CommaOK bool
	// Count is the occurrences since Start. Estimated: some were counted
	// while the site was sampled (see SiteStats.Sampled), and scaled.
	Count     uint64
	Estimated bool
	// First and Last are when the first occurrence happened and when the
	// count last grew (to the aggregation interval, about a second).
	First, Last time.Time
}

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
	m        map[callSiteKey]*CallSiteStats
	overflow uint64
}

// add books count occurrences of ev's kind at ev's call site (pc).
func (c *callSites) add(pc uintptr, commaOK bool, ev *decode.Event, count uint64, estimated bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = make(map[callSiteKey]*CallSiteStats)
	}
	k := callSiteKey{ev.Kind, commaOK, pc}
	s, ok := c.m[k]
	if !ok {
		if len(c.m) >= maxCallSites {
			c.overflow += count
			return
		}
		s = &CallSiteStats{Kind: ev.Kind, Site: ev.Site, MapType: ev.MapType, CommaOK: commaOK, First: ev.Time}
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
func (c *callSites) snapshot() ([]CallSiteStats, uint64) {
	c.mu.Lock()
	out := make([]CallSiteStats, 0, len(c.m))
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
