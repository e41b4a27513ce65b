// Package bpf holds mapguard's eBPF program and its compiled object.
//
// src/mapguard.bpf.c is compiled by bpf2go with a pinned clang (see gen.go) and
// the object is committed, so that building mapguard needs no C toolchain.
// CI regenerates it with `go generate ./...` and fails if the result differs
// from what is committed.
//
// The program is generic: every probe site runs the same program, and the
// attach cookie selects the site's configuration (its event kind and how to
// find the caller's frame). Runtime structure offsets are passed in as
// constants that the loader verifies in the live process first.
//
// The generated loader only builds on linux/amd64, the one platform whose
// register layout the program assumes; package probe decides when to use it.
package bpf
