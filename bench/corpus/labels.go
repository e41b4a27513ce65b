//go:build linux

package main

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/mapguard/mapguard"
)

// Verdicts a label gives a (kind, call site).
const (
	True        = "true"     // a real misuse a maintainer would fix
	Intended    = "intended" // idiomatic Go, e.g. h := routes[method]; if h != nil
	False       = "false"    // wrong blame: the site did not do that map operation
	Unlabelled  = "unlabelled"
	labelsUsage = "VERDICT KIND FILE:LINE FUNCTION  # why"
)

// key is a distinct (kind, call site).
type key struct {
	Kind string
	Site string // normalized file:line, see normalizer
}

type label struct {
	Verdict, Function, Why string
}

// loadLabels reads the labels file: one "VERDICT KIND FILE:LINE FUNCTION
// # why" per line; blank lines and lines starting with # are skipped.
func loadLabels(path string) (map[key]label, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	labels := map[key]label{}
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		text, why, _ := strings.Cut(line, "#")
		f := strings.Fields(text)
		if len(f) < 3 {
			return nil, fmt.Errorf("%s:%d: want %s", path, n, labelsUsage)
		}
		switch f[0] {
		case True, Intended, False:
		default:
			return nil, fmt.Errorf("%s:%d: verdict %q is not true, intended or false", path, n, f[0])
		}
		k := key{f[1], f[2]}
		if _, dup := labels[k]; dup {
			return nil, fmt.Errorf("%s:%d: %s %s labelled twice", path, n, k.Kind, k.Site)
		}
		l := label{Verdict: f[0], Why: strings.TrimSpace(why)}
		if len(f) > 3 {
			l.Function = f[3]
		}
		labels[k] = l
	}
	return labels, sc.Err()
}

// normalizer turns the absolute paths the compiler recorded into names that
// are the same on every machine: "module@version/file.go" for a suite's copy
// and the module cache, "GOROOT/src/..." for the standard library and
// "mapguard/..." for this repository.
type normalizer struct {
	prefixes [][2]string // absolute prefix (with trailing /), replacement
}

func (n *normalizer) add(abs, name string) {
	n.prefixes = append(n.prefixes, [2]string{filepath.Clean(abs) + "/", name})
	// Longest first, so that a suite's copy inside the work directory wins.
	sort.Slice(n.prefixes, func(i, j int) bool { return len(n.prefixes[i][0]) > len(n.prefixes[j][0]) })
}

func (n *normalizer) file(path string) string {
	for _, p := range n.prefixes {
		if rest, ok := strings.CutPrefix(path, p[0]); ok {
			return p[1] + rest
		}
	}
	return path
}

// site is a frame's normalized "file:line", or its function (or "?") when
// the frame has no file.
func (n *normalizer) site(f mapguard.Frame) string {
	if f.File == "" {
		if f.Function != "" {
			return f.Function
		}
		return "?"
	}
	return unescapeModPath(n.file(f.File)) + ":" + strconv.Itoa(f.Line)
}

// unescapeModPath undoes the module cache's case escaping ("!burnt!sushi").
func unescapeModPath(p string) string {
	if !strings.Contains(p, "!") {
		return p
	}
	var b strings.Builder
	up := false
	for _, r := range p {
		switch {
		case r == '!':
			up = true
			continue
		case up:
			b.WriteString(strings.ToUpper(string(r)))
		default:
			b.WriteRune(r)
		}
		up = false
	}
	return b.String()
}
