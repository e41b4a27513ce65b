package decode

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
