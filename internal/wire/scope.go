package wire

import (
	"runtime/debug"
	"strings"
)

// Scope tells the program's own code (its main module and dependencies)
// from the Go standard library's, by function name.
type Scope struct {
	prefixes []string // nil: everything is the program's own
}

// ProgramScope returns the Scope of the running program, from its build
// information. Without build information, everything counts as the
// program's own.
func ProgramScope() Scope {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return Scope{}
	}
	s := Scope{prefixes: []string{"main."}}
	add := func(path string) {
		if path != "" {
			s.prefixes = append(s.prefixes, path+"/", path+".", path+"_test.")
		}
	}
	add(info.Main.Path)
	for _, m := range info.Deps {
		add(m.Path)
	}
	return s
}

// Own reports whether fn, a package-qualified function name such as
// "github.com/x/y.(*T).f", belongs to the program rather than the standard
// library.
func (s Scope) Own(fn string) bool {
	if s.prefixes == nil {
		return true
	}
	for _, p := range s.prefixes {
		if strings.HasPrefix(fn, p) {
			return true
		}
	}
	return false
}

// NewScope returns the Scope owning the functions of the packages whose
// import paths start with one of prefixes (a prefix "example.com/svc"
// owns example.com/svc and example.com/svc/...). No prefixes owns
// everything.
func NewScope(prefixes ...string) Scope {
	if len(prefixes) == 0 {
		return Scope{}
	}
	s := Scope{prefixes: []string{}}
	for _, p := range prefixes {
		p = strings.TrimSuffix(p, "/")
		if p == "main" {
			s.prefixes = append(s.prefixes, "main.")
			continue
		}
		s.prefixes = append(s.prefixes, p+"/", p+".", p+"_test.")
	}
	return s
}

// ModuleScope returns the Scope of the main module alone: package main and
// the packages of the module that holds it, without its dependencies.
// Without build information it owns everything.
func ModuleScope() Scope {
	info, ok := debug.ReadBuildInfo()
	if !ok || info.Main.Path == "" {
		return Scope{}
	}
	return NewScope("main", info.Main.Path)
}
