// Package x86site is mapguard's x86-64 analyser: it decodes a runtime map
// function (code read from the binary, see package symbols) from its first
// byte and picks the instructions to probe for each kind.
//
// EntrySite, NilMapSite, MissSites and CallSites find instructions
// to probe inside a function, WrapperCall recognises a function that only
// calls another (Go 1.27's runtime.mapaccess1*), and CallArgType the
// static map type a caller passes in RAX. All decode the whole function
// linearly from its first byte with golang.org/x/arch/x86/x86asm (VEX and
// EVEX instructions, which it does not know, by their prefix and ModRM
// byte: see vex.go) and fail closed: a function
// that does not decode, or whose shape is not the expected one, gives an
// error wrapping ErrUnrecognized (or false), never a guess. Each Site
// says whether the kernel emulates its instruction and whether the frame
// pointer is set there, which tells where the return PC is.
package x86site
