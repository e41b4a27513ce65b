package main

import (
	"io"
	"reflect"
	"regexp"
	"testing"
	"time"
)

func TestParseArgs(t *testing.T) {
	for _, c := range []struct {
		args []string
		want config
	}{
		{[]string{"watch", "deploy/web", "-n", "shop", "--kind", "nil-map-write,missing-key-read", "--since", "5m", "-o", "json"},
			config{command: "watch", target: "deploy/web", namespace: "shop", kinds: []string{"nil-map-write", "missing-key-read"}, since: 5 * time.Minute, output: "json"}},
		{[]string{"-n", "shop", "stats", "pod/web-0", "--port", "7070"},
			config{command: "stats", target: "pod/web-0", namespace: "shop", port: 7070, output: "text"}},
		{[]string{"crashes", "--address", "127.0.0.1:8080", "--namespace=x"},
			config{command: "crashes", address: "127.0.0.1:8080", namespace: "x", output: "text"}},
		{[]string{"sites", "web-0", "--path", "debug/mg", "--output", "text"},
			config{command: "sites", target: "web-0", output: "text", path: "/debug/mg/"}},
	} {
		got, err := parseArgs(c.args, io.Discard)
		if err != nil {
			t.Errorf("%q: %v", c.args, err)
			continue
		}
		want := c.want
		if want.port == 0 {
			want.port = 6060
		}
		if want.path == "" {
			want.path = "/debug/mapguard/"
		}
		want.color = "auto"
		if !reflect.DeepEqual(*got, want) {
			t.Errorf("%q:\n got %+v\nwant %+v", c.args, *got, want)
		}
	}
}

func TestParseArgsErrors(t *testing.T) {
	for _, args := range [][]string{
		{},
		{"trace", "pod/x"},
		{"watch"},
		{"watch", "pod/x", "--address", "h:1"},
		{"watch", "pod/x", "extra"},
		{"stats", "pod/x", "-o", "yaml"},
		{"stats", "pod/x", "--since", "-1m"},
		{"stats", "pod/x", "--color", "sometimes"},
		{"stats", "pod/x", "--bogus"},
	} {
		if _, err := parseArgs(args, io.Discard); err == nil {
			t.Errorf("%q: no error", args)
		}
	}
}

func TestParseTarget(t *testing.T) {
	for in, want := range map[string]target{
		"pod/web-0":       {"pod", "web-0"},
		"po/web-0":        {"pod", "web-0"},
		"web-0":           {"pod", "web-0"},
		"deploy/web":      {"deployment", "web"},
		"deployment/web":  {"deployment", "web"},
		"deployments/web": {"deployment", "web"},
	} {
		got, err := parseTarget(in)
		if err != nil || got != want {
			t.Errorf("%q: %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, in := range []string{"svc/web", "pod/", "pod/a/b", "/x"} {
		if _, err := parseTarget(in); err == nil {
			t.Errorf("%q: no error", in)
		}
	}
}

func regexpMatch(re, s string) bool { return regexp.MustCompile(re).MatchString(s) }
