package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	"github.com/mapguard/mapguard/debughttp"
)

// client reads the documents of a debughttp handler at base.
type client struct {
	base string
}

func (c *client) get(ctx context.Context, doc string, q url.Values) (*http.Response, error) {
	u := c.base + doc
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", doc, err)
	}
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		resp.Body.Close()
		return nil, fmt.Errorf("read %s: %s: %s (is the mapguard handler mounted at %s?)", u, resp.Status, strings.TrimSpace(string(b)), c.base)
	}
	return resp, nil
}

func (c *client) getJSON(ctx context.Context, doc string, v any) error {
	resp, err := c.get(ctx, doc, nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		return fmt.Errorf("decode %s: %w", doc, err)
	}
	return nil
}

// watch calls fn for each event of the stream until ctx ends, the stream
// ends, or fn returns false. A stream the service dropped (the client was
// too slow) is an error.
func (c *client) watch(ctx context.Context, q url.Values, fn func(debughttp.Event) bool) error {
	resp, err := c.get(ctx, "events", q)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	name := ""
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "event: "):
			name = strings.TrimPrefix(line, "event: ")
		case strings.HasPrefix(line, "data: "):
			data := strings.TrimPrefix(line, "data: ")
			if name == "dropped" {
				return fmt.Errorf("the service dropped this watcher: %s", data)
			}
			var ev debughttp.Event
			if err := json.Unmarshal([]byte(data), &ev); err != nil {
				return fmt.Errorf("decode event: %w", err)
			}
			if !fn(ev) {
				return nil
			}
		case line == "":
			name = ""
		}
	}
	if err := sc.Err(); err != nil && ctx.Err() == nil {
		return fmt.Errorf("read events: %w", err)
	}
	if ctx.Err() == nil {
		return fmt.Errorf("the service ended the event stream")
	}
	return nil
}
