// Package bpf holds the source of mapguard's eBPF program; it exports
// nothing.
//
// src/mapguard.bpf.c (with src/mapguard.h) is compiled by bpf2go with a
// pinned clang (see gen.go) into internal/uprobe (mapguard_x86_bpfel.o and
// its loader, mapguard_x86_bpfel.go, all names unexported), and the output
// is committed, so that building mapguard needs no C toolchain. CI
// regenerates it with `go generate ./...` and fails if the result differs
// from what is committed.
//
// The program is generic: every probe site runs one of two programs
// (mapguard_site for the always-on kinds, mapguard_deep for the deep ones),
// and the attach cookie selects the site's configuration (its event kind and
// where to find the map, its type and the caller's frame). Runtime
// structure offsets are passed in as variables that the loader verifies in
// the live process first. Every constant the Go side shares with the
// program (kinds, site flags, registers, key modes, limits) is an enum that
// bpf2go turns into Go constants (-type), and a test compares the record
// layout that internal/wire decodes with the one bpf2go generated.
//
// The generated loader only builds on linux/amd64, the one platform whose
// register layout the program assumes.
package bpf
