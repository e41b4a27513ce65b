// Package symbols finds functions in an amd64 ELF Go binary, including the
// running process, and computes the file offsets uprobes attach to.
//
// # Why .gopclntab and not .symtab
//
// Binaries built by go test, go run or with -ldflags='-s -w' have no .symtab,
// but every Go binary carries .gopclntab: the runtime needs it for stack
// traces and garbage collection. (PIE binaries of Go 1.25 and older call it
// .data.rel.ro.gopclntab or, when externally linked, merge it into
// .data.rel.ro, where it is found by its header.)
//
// A Go binary can name one function twice: an assembly function and its
// ABIInternal wrapper, or a Go function and its ABI0 wrapper. [Binary.Func]
// returns the one that is not a wrapper, since every call reaches it.
// .symtab names the ABIInternal one: for assembly functions, it calls the
// wrapped function name.abi0.
//
// Function ends come from each function's SP-delta table, which covers
// exactly the function's code, and match the sizes in .symtab. The next
// function's entry, which debug/gosym uses, would include the int3 padding
// between functions.
//
// # What is read, and what is kept
//
// A program looks up a few dozen functions, and a large binary has a
// function table of tens of megabytes. So the table is not decoded into a
// symbol table: Open reads the section headers, the table's header and its
// function index (8 bytes a function), and makes one pass over the
// functions' records and names through a buffer of fixed size, keeping a
// 32-bit hash of each name. [Binary.Func] finds its candidates by hash and
// reads their records and names from the file; [Binary.FuncAt] searches the
// index by address. The symbol table, when there is one, is read only for
// three symbols, also through a fixed buffer. Only tables of Go 1.18 and
// newer are read.
//
// # textStart
//
// Entries in Go 1.18+ tables are offsets from runtime.text. Since Go 1.26
// the linker no longer writes runtime.text into the pclntab header. The
// base is taken, in order, from the runtime.text symbol in .symtab, from
// the text field of the runtime's moduledata, from the Go 1.18-1.25
// pclntab header, and from the start of the .text section. The section
// start is right only for internally linked binaries: with external
// linking, C start-up code comes first. A base that does not come from .symtab is accepted only if the
// gaps between functions hold int3 padding. [OpenSelf] also checks the
// base against the running code, and corrects it if needed.
//
// # File offsets and PIE
//
// Addresses in [Func] are link-time virtual addresses. A uprobe attaches to
// an inode and a file offset, computed from the executable PT_LOAD segment
// that contains the address: offset = addr - p_vaddr + p_offset.
//
// Position-independent executables (-buildmode=pie) are loaded at an
// address picked by the kernel. The distance from the link-time address is
// the load bias, which [Binary.LoadBias] reports for [OpenSelf]. Go's own
// linker links PIE binaries at 0x400000, as it does non-PIE ones; with
// external linking they start near 0. File offsets do not depend on the
// load bias.
//
// Function code is always read from the file, never from memory: once a
// uprobe is attached, memory holds an int3 at the probed address.
//
// Choosing instructions to probe inside a function is internal/x86site's
// job.
package symbols
