package main

import (
	"context"
	"net/url"
	"slices"
	"time"

	"github.com/mapguard/mapguard/debughttp"
)

func cmdStats(ctx context.Context, cl *client, out *printer, c *config) error {
	var st debughttp.Stats
	if err := cl.getJSON(ctx, "stats", &st); err != nil {
		return err
	}
	if len(c.kinds) > 0 {
		for k := range st.Events {
			if !slices.Contains(c.kinds, k) {
				delete(st.Events, k)
			}
		}
	}
	return out.stats(st)
}

func cmdSites(ctx context.Context, cl *client, out *printer, c *config) error {
	var s debughttp.Sites
	if err := cl.getJSON(ctx, "sites", &s); err != nil {
		return err
	}
	cutoff := time.Time{}
	if c.since > 0 {
		cutoff = time.Now().Add(-c.since)
	}
	s.Calls = slices.DeleteFunc(s.Calls, func(cs debughttp.CallSite) bool {
		return (len(c.kinds) > 0 && !slices.Contains(c.kinds, cs.Kind)) || cs.Last.Before(cutoff)
	})
	if len(c.kinds) > 0 {
		s.Probes = slices.DeleteFunc(s.Probes, func(p debughttp.ProbeSite) bool { return !slices.Contains(c.kinds, p.Kind) })
	}
	return out.sites(s)
}

func cmdCrashes(ctx context.Context, cl *client, out *printer, c *config) error {
	var cr debughttp.Crashes
	if err := cl.getJSON(ctx, "crashes", &cr); err != nil {
		return err
	}
	if c.since > 0 {
		cutoff := time.Now().Add(-c.since)
		cr.Reports = slices.DeleteFunc(cr.Reports, func(ev debughttp.Event) bool { return ev.Time.Before(cutoff) })
	}
	if len(c.kinds) > 0 {
		cr.Reports = slices.DeleteFunc(cr.Reports, func(ev debughttp.Event) bool { return !slices.Contains(c.kinds, ev.Kind) })
	}
	return out.crashes(cr)
}

func cmdWatch(ctx context.Context, cl *client, out *printer, c *config) error {
	q := url.Values{}
	for _, k := range c.kinds {
		q.Add("kind", k)
	}
	if c.since > 0 {
		q.Set("since", c.since.String())
	}
	n := 0
	var werr error
	err := cl.watch(ctx, q, func(ev debughttp.Event) bool {
		if werr = out.event(ev); werr != nil {
			return false
		}
		n++
		return c.count == 0 || n < c.count
	})
	if werr != nil {
		return werr
	}
	return err
}
