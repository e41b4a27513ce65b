// SPDX-License-Identifier: (MIT OR GPL-2.0-only)
//
// Self-contained definitions for mapguard.bpf.c, so that the object depends
// only on the pinned clang and not on whichever kernel or libbpf headers the
// build machine has. Helper numbers are the stable UAPI ones from
// include/uapi/linux/bpf.h.

#ifndef MAPGUARD_H
#define MAPGUARD_H

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef long long __s64;

#define SEC(name) __attribute__((section(name), used))
#define __always_inline inline __attribute__((always_inline))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name

enum {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_PERCPU_ARRAY = 6,
	BPF_MAP_TYPE_LRU_HASH = 9,
	BPF_MAP_TYPE_RINGBUF = 27,
};

#define BPF_RB_NO_WAKEUP 1
#define BPF_RB_FORCE_WAKEUP 2
#define BPF_NOEXIST 1

// The x86-64 register file a uprobe program sees (struct pt_regs, UAPI names).
struct pt_regs {
	unsigned long r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8;
	unsigned long rax, rcx, rdx, rsi, rdi, orig_rax, rip, cs, eflags, rsp, ss;
};

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static long (*bpf_map_update_elem)(void *map, const void *key, const void *value, __u64 flags) = (void *)2;
static long (*bpf_map_delete_elem)(void *map, const void *key) = (void *)3;
static long (*bpf_ringbuf_output)(void *ringbuf, void *data, __u64 size, __u64 flags) = (void *)130;
static __u64 (*bpf_ktime_get_ns)(void) = (void *)5;
static __u32 (*bpf_get_prandom_u32)(void) = (void *)7;
static long (*bpf_probe_read_user)(void *dst, __u32 size, const void *unsafe_ptr) = (void *)112;
static void *(*bpf_ringbuf_reserve)(void *ringbuf, __u64 size, __u64 flags) = (void *)131;
static void (*bpf_ringbuf_submit)(void *data, __u64 flags) = (void *)132;
static __u64 (*bpf_get_attach_cookie)(void *ctx) = (void *)174;
// For the trap sampler (mapguard_sample): a BTF task pointer, and the
// user-mode registers the kernel saved at the task's entry.
static __u64 (*bpf_get_current_pid_tgid)(void) = (void *)14;
static long (*bpf_probe_read_kernel)(void *dst, __u32 size, const void *unsafe_ptr) = (void *)113;
static void *(*bpf_get_current_task_btf)(void) = (void *)158;
static struct pt_regs *(*bpf_task_pt_regs)(void *task) = (void *)175;

// Sizes and limits shared with the Go side (bpf2go -type mg_limit).
enum mg_limit {
	MG_MAX_SITES = 256,
	MG_MAX_FRAMES = 16,
	MG_DETAIL_LEN = 64,
	MG_IGNORED = 8, // goroutines ignored without a map lookup
};

// internal/abi: Kind_ & KindMask == Map for a map type.
#define MG_ABI_KIND_MASK 0x1f
#define MG_ABI_KIND_MAP 21

// Event kinds. The Go package mapguard uses the same numbers for Kind.
enum mg_kind {
	MG_KIND_NIL_MAP_WRITE = 1,
	MG_KIND_NIL_MAP_READ = 2,
	MG_KIND_MAP_GROWTH = 3,
	MG_KIND_MISSING_KEY_READ = 4,
	MG_KIND_UNHASHABLE_KEY = 5,
	MG_KIND_MAP_BLOAT = 6,
	MG_KIND_CONCURRENT_MISUSE = 7,
	MG_KIND_PREVIOUS_CRASH = 8,
	MG_KIND_MISSING_KEY_DELETE = 9,
	MG_KIND_NIL_MAP_DELETE = 10,
	MG_KIND_SHARED_WRITERS = 11,
	MG_KIND_NESTED_MAP_MISS = 12,
};

// Aggregates of nested-map misses are keyed by their nil-read site's index
// with this bit set, apart from that site's nil-map reads.
#define MG_AGG_NESTED 0x80000000

// How far after a miss (in code bytes, in the same function) a nil-map read
// by the same goroutine is the inner read of m[a][b].
#define MG_NESTED_SPAN 96

// The last miss (or nil-map read) of a goroutine, for nested-map misses.
struct last_miss {
	__u64 pc;
};

// Where a delete site finds the key (site_conf.key_mode).
enum mg_key {
	MG_KEY_NONE = 0,
	MG_KEY_U32 = 1, // the value in CX (mapdelete_fast32)
	MG_KEY_U64 = 2, // the value in CX (mapdelete_fast64)
	MG_KEY_STR = 3, // a string in CX (data) and DI (length) (mapdelete_faststr)
	MG_KEY_PTR = 4, // a pointer in CX to a key of the map type's key size (mapdelete)
};

// Where a site finds a value, for site_conf.map_reg and typ_reg: an
// argument register, or a home (spill) slot of the probed function's
// register arguments, at [BP+16+8*i] once its frame pointer is set up.
enum mg_reg {
	MG_REG_AX = 0,
	MG_REG_BX = 1,
	MG_REG_CX = 2,
	MG_REG_NONE = 3,
	MG_REG_HOME0 = 4,
	MG_REG_HOME1 = 5,
	MG_REG_DX = 6,
	MG_REG_SI = 7,
	MG_REG_DI = 8,
};

// site_conf.flags (bpf2go -type mg_site_flag).
enum mg_site_flag {
	MG_SITE_FRAMED = 1, // the probed function's frame pointer is set up at the site
	MG_SITE_NIL_ONLY = 2, // report only when the map argument is nil
	MG_SITE_GROWTH = 4, // report when the map crosses growth_threshold, then each doubling
	MG_SITE_NON_NIL = 8, // report only when the map argument is not nil
	MG_SITE_AGG = 16, // aggregate per (site, caller PC): the first occurrence is an event, later ones a count
	MG_SITE_STR = 32, // AX, BX hold a Go string (ptr, len): copy it to detail
	MG_SITE_ERR = 64, // AX, BX hold an interface whose data points at a Go string: copy it to detail
	MG_SITE_CRASH = 128, // the process is about to die: also write the event to the crash record
	MG_SITE_BLOAT = 256, // report when the map's capacity is at least growth_threshold slots
	// Deep sites, on hot paths (opt-in, under the Guard's CPU budget):
	MG_SITE_COUNT = 512, // count per (site, caller PC) without events: operation statistics
	MG_SITE_WRITER = 1024, // remember the map's last writers; report a second goroutine within shared_window_ns
	MG_SITE_DEL_NIL = 2048, // a delete begins: report a nil map
	MG_SITE_DEL_ENTRY = 4096, // a delete begins: report an empty map, else remember the map and its entries
	MG_SITE_DEL_DONE = 8192, // a delete ended: report if the entries did not change since DEL_ENTRY
	MG_SITE_UNWRAP = 32768, // called through a wrapper (return address in wrap_ret): the call site is the wrapper's caller
	MG_SITE_WRAPPED = 65536, // report only calls through a wrapper (Go 1.27: plain reads, not comma-ok ones)
	// In the caller's code, at the CALL of a map read whose map argument
	// the outer read of m[a][b] returned (the inner read): the call site is
	// wrap_ret[0] (the CALL's return address), the outer read's wrap_ret[1];
	// the frame pointer is the caller's own.
	MG_SITE_CALLER = 131072,
	// In runtime.fatal, where its call of printlock returns: of goroutines
	// that race into a fatal error, only the one whose report the runtime
	// prints gets here (printlock is never unlocked). Its fatal event, kept
	// by MG_SITE_CRASH, becomes the crash record's; no event of its own.
	MG_SITE_PRINTED = 262144,
};


struct site_conf {
	__u8 kind;
	__u8 map_reg;  // enum mg_reg holding the map pointer
	__u8 typ_reg;  // enum mg_reg holding the map type
	__u8 key_mode; // enum mg_key
	__u32 flags;
	// MG_SITE_UNWRAP: the return addresses of the calls of this function
	// by the wrappers it serves (0: none). MG_SITE_CALLER: the call site
	// and the outer read's.
	__u64 wrap_ret[2];
};

#define MG_KEY_HASHED 64 // key bytes hashed at most
#define MG_KEY_PREFIX 16 // key bytes captured at most (Options.CaptureKeys)

// A delete in progress, by goroutine (MG_SITE_DEL_ENTRY -> MG_SITE_DEL_DONE).
struct pending_delete {
	__u64 map;
	__u64 used;
	__u64 typ;
	__u64 key_hash;
	__u32 key_len;
	__u32 prefix_len;
	char prefix[MG_KEY_PREFIX];
};

// The last two goroutines that wrote a map (MG_SITE_WRITER).
struct writers {
	__u64 goid[2]; // [0] the latest
	__u64 pc[2];
	__u64 time_ns[2];
	__u64 reported;
	__u64 seed; // the map's hash seed: another map at a reused address has another
};

// Counters for one site, updated atomically.
struct site_stats {
	__u64 hits;     // traps taken at the site
	__u64 events;   // records submitted
	__u64 dropped;  // records lost because the ring buffer was full
	__u64 filtered; // hits that were not an anomaly (an empty, non-nil map; a map below the growth threshold)
	__u64 ignored;  // hits from the Guard's own goroutines
	__u64 agg;      // hits counted into an aggregate instead of an event of their own
	__u64 timed;    // hits whose program run time was measured (one in MG_TIME_EVERY)
	__u64 prog_ns;  // the program run time of those hits, in ns
	__u64 samples;  // trap sampler: samples that found the process in this site's trap
};

// One hit in MG_TIME_EVERY has its program run time measured, for the cost
// governor: what a hit costs is the trap (calibrated) plus that time. The
// first hit is not one of them: it runs cold (the start-up canary's took
// 70-150 us where a nil-map write site's later hits took about 4 us) and, being the only
// sample of a rare site for a long time, would cost it ten times over.
#define MG_TIME_EVERY 16

// Key of the per-call-site aggregates (MG_SITE_AGG).
struct agg_key {
	__u32 site;
	__u32 _pad;
	__u64 pc; // the probed function's caller
};

struct agg_val {
	__u64 count; // occurrences after the first, which was an event
	__u64 muted; // set by user space for call sites it does not report
};

// One record in the ring buffer.
struct event {
	__u64 time_ns; // bpf_ktime_get_ns: CLOCK_MONOTONIC
	__u64 goid;
	__u64 map;   // map header address, 0 for a nil map
	__u64 typ;   // *abi.MapType, 0 if it did not read back as a map type
	__u64 len;   // entries in the map at the time
	__u64 count; // occurrences this record stands for
	__u32 site;  // index into sites
	__u8 kind;   // enum mg_kind
	__u8 npcs;   // valid entries in pcs
	__u8 detail_len; // valid bytes in detail
	__u8 _pad;
	__u64 cap;   // MG_SITE_BLOAT: the map's capacity in slots
	__u64 aux;   // the call site: the user's return PC (pcs[0], or past a Go 1.27 mapaccess1* wrapper)
	__u64 peer_goid; // SharedWriters, ConcurrentMisuse: the other goroutine, 0 if unknown
	__u64 peer_pc;   // and the return PC of its map call
	__u64 key_hash;  // deletes: salted FNV-1a of the key's first MG_KEY_HASHED bytes
	__u32 key_len;   // deletes: the key's length in bytes
	__u32 _pad2;
	__u64 pcs[MG_MAX_FRAMES]; // return PCs, innermost first: pcs[0] is the probed function's caller
	char detail[MG_DETAIL_LEN]; // the runtime's message, for MG_SITE_STR and MG_SITE_ERR sites
};

// The crash record of this process, kept in a map pinned on the BPF file
// system so that it outlives the process. User space creates the entry at
// Start (who wrote it, and the binary); the program fills in the event when
// the runtime is about to die. The key is user space's hash of (pidns, pid,
// proc_start): readers recompute it, and nothing in an entry is trusted.
struct crash {
	__u64 bias;       // load bias of the binary in the process that wrote it
	__u64 exe_id;     // identity of the binary (hash of its Go build ID)
	__u64 start_ns;   // CLOCK_MONOTONIC when the entry was made
	__u64 crashed;    // set to 1 by the program
	__u64 pidns;      // inode of the writer's PID namespace
	__u64 proc_start; // the writer's start time, clock ticks after boot (/proc/PID/stat)
	__u32 pid;        // the writer's PID in its namespace
	__u32 _spare32;
	__u64 claimed;    // the first fatal error to reach the program claims the entry
	struct event ev;
};

#endif
