// SPDX-License-Identifier: (MIT OR GPL-2.0-only)
//
// mapguard's uprobe programs. Two programs serve every probe site (the
// always-on sites and the deep ones); the attach cookie is the site index,
// and sites[index] says what the site means. Everything the program reads from the Go runtime (goroutine id,
// map header, type kind) is at an offset passed in as a constant by the
// loader, after the loader has verified those offsets in the live process.
//
// The program never writes user memory and never blocks. A hit costs the
// trap (paid whatever this program does) plus a few reads; events go to a
// ring buffer without a wake-up, and the reader drains it on a timer.

#include "mapguard.h"

char __license[] SEC("license") = "Dual MIT/GPL";

// Offsets into runtime structures, verified by the loader before attach.
volatile const __u64 goid_offset = 0;      // runtime.g.goid
volatile const __u64 map_used_offset = 0;  // internal/runtime/maps.Map.used
volatile const __u64 map_seed_offset = 0;  // internal/runtime/maps.Map.seed
volatile const __u64 type_kind_offset = 0; // internal/abi.Type.Kind_
// How many return PCs to collect per event, at most MG_MAX_FRAMES.
volatile const __u32 max_frames = 4;
// Entries at which a growing map is first reported (Options.GrowthThreshold),
// and the capacity in slots from which an emptied map is reported as bloated.
volatile const __u64 growth_threshold = 0; // set by the loader (Go: Config.GrowthThreshold)
// Map directory and table layout, for a map's capacity.
volatile const __u64 map_dir_ptr_offset = 0;      // Map.dirPtr
volatile const __u64 map_dir_len_offset = 0;      // Map.dirLen
volatile const __u64 map_global_depth_offset = 0; // Map.globalDepth
volatile const __u64 table_capacity_offset = 0;   // table.capacity (u16)
volatile const __u64 table_local_depth_offset = 0; // table.localDepth (u8)
// Key of this process's entry in crashes (user space's hash of who it is).
volatile const __u64 crash_key = 0;
// Deep watching: the salt of key hashes, whether key prefixes leave the
// kernel (Options.CaptureKeys), the window within which two writers of one
// map are reported, and MapType.Key / Type.Size_ for generic keys.
volatile const __u64 key_salt = 0;
volatile const __u32 capture_keys = 0;
volatile const __u64 shared_window_ns = 0;
volatile const __u64 map_type_key_offset = 0;
volatile const __u64 type_size_offset = 0;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MG_MAX_SITES);
	__type(key, __u32);
	__type(value, struct site_conf);
} sites SEC(".maps");

// Per-site counters, in .bss so that user space reads them through a memory
// mapping: no system call, and no Go reflection (which would itself read the
// runtime's nil type map and hit our own probes).
struct site_stats stats[MG_MAX_SITES];

// The cost governor: what one hit of each site costs (CPU ns: the trap as
// calibrated plus the program's measured run time, set by user space),
// their sum over every hit so far, and the sum at which the governor is
// woken because the budget is spent (0: never), so that it acts at once,
// not at its next tick.
__u64 site_cost[MG_MAX_SITES];
__u64 spent_ns;
__u64 spend_limit;

// The link generation each site counts its hits on, which an attach
// cookie's upper 32 bits carry (its lower 32 are the site's index). A quiet
// site on a shared link that is detached because its busy sites are
// sampled moves to a link of its own first: user space attaches the new
// link (the next generation), flips the site's generation here, then
// detaches the old link. Both links' programs run on one trap while they
// overlap, and only one counts it: the site is never blind, never counted
// twice.
__u8 site_gen[MG_MAX_SITES];

// The goroutines whose hits are ignored (the Guard's own): the first
// MG_IGNORED are compared here without a map lookup, any more are in
// ignored_goids (ignored_more set).
__u64 ignored[MG_IGNORED];
__u32 ignored_more;

// Goroutines whose hits are ignored: the Guard's own reader and dispatcher.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u64);
	__type(value, __u8);
} ignored_goids SEC(".maps");

// For growth sites: map header address -> entry count at which that map is
// reported next (twice the count at its last report). An address reused by a
// new map after garbage collection inherits the old entry until evicted.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u64);
} growth_next SEC(".maps");

// Per call site aggregates of MG_SITE_AGG sites: user space reads the counts
// and reports them once per interval.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct agg_key);
	__type(value, struct agg_val);
} aggs SEC(".maps");

// Crash records, by process. User space pins this map on the BPF file
// system (so it outlives the process) and creates this process's entry.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u64);
	__type(value, struct crash);
} crashes SEC(".maps");

// The fatal events of this process's goroutines (MG_SITE_CRASH), by
// goroutine id, until one of them is the one the runtime prints
// (MG_SITE_PRINTED). Two goroutines can race into a fatal error.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16);
	__type(key, __u64);
	__type(value, struct event);
} fatal_events SEC(".maps");

// Deletes in progress, by goroutine id.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct pending_delete);
} deletes SEC(".maps");

// The last writers of each map, by map address, and the last map each
// goroutine wrote (for the other side of a fatal concurrent write).
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, __u64);
	__type(value, struct writers);
} map_writers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u64);
} goid_map SEC(".maps");

// The last miss of each goroutine (MG_KIND_MISSING_KEY_READ and
// MG_KIND_NIL_MAP_READ sites), for nested-map misses: m[a][b] with a
// missing is a miss, then a nil-map read a few instructions later.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct last_miss);
} last_misses SEC(".maps");

// Room to build one record: it is too large for the BPF stack.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct event);
} scratch SEC(".maps");

// Wake-ups of the budget governor, apart from events so that a flood of
// events cannot crowd them out.
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} wakeups SEC(".maps");

// The loader sets max_entries from Options.BufferSize.
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

// The deep sites' events, apart (the loader sizes it like events).
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} deep_events SEC(".maps");

// Keep the record types in BTF so bpf2go generates Go declarations for them.
const struct event *unused_event __attribute__((unused));
const enum mg_kind *unused_kind __attribute__((unused));
const struct crash *unused_crash __attribute__((unused));
const struct agg_key *unused_agg_key __attribute__((unused));
const struct agg_val *unused_agg_val __attribute__((unused));
const enum mg_key *unused_key __attribute__((unused));
const enum mg_reg *unused_reg __attribute__((unused));
const enum mg_site_flag *unused_site_flag __attribute__((unused));
const enum mg_limit *unused_limit __attribute__((unused));

// read_size returns n, which the caller has clamped to 1..max (max a power of
// two), in a form whose bound the verifier sees at the call: ((n-1) & (max-1))
// + 1. The compiler would drop a plain mask after the clamp, and older
// verifiers (Debian's 6.1) lose the clamp's bound through a stack spill.
static __always_inline __u64 read_size(__u64 n, __u64 max)
{
	n -= 1;
	asm volatile("" : "+r"(n));
	return (n & (max - 1)) + 1;
}

// read_u64, read_u16 and read_u8 read user memory, 0 where it cannot be
// read: the helper zeroes its buffer on failure, and testing its result
// would only add a branch for the verifier to explore at every read.
static __always_inline __u64 read_u64(__u64 addr)
{
	__u64 v;
	bpf_probe_read_user(&v, sizeof(v), (const void *)addr);
	return v;
}

static __always_inline __u64 read_u16(__u64 addr)
{
	__u16 v;
	bpf_probe_read_user(&v, sizeof(v), (const void *)addr);
	return v;
}

static __always_inline __u64 read_u8(__u64 addr)
{
	__u8 v;
	bpf_probe_read_user(&v, sizeof(v), (const void *)addr);
	return v;
}

// args holds the argument registers a site may need. They are loaded from
// ctx at fixed offsets up front: the verifier rejects a ctx load at an offset
// computed from the site's configuration.
struct args {
	__u64 ax, bx, cx, dx, si, di, bp;
};

static __always_inline __u64 arg_reg(const struct args *a, __u8 reg)
{
	switch (reg) {
	case MG_REG_AX:
		return a->ax;
	case MG_REG_BX:
		return a->bx;
	case MG_REG_CX:
		return a->cx;
	case MG_REG_DX:
		return a->dx;
	case MG_REG_SI:
		return a->si;
	case MG_REG_DI:
		return a->di;
	case MG_REG_HOME0:
		return read_u64(a->bp + 16);
	case MG_REG_HOME1:
		return read_u64(a->bp + 24);
	}
	return 0;
}

#define MG_MAX_TABLES 64

// map_capacity returns the slots of the map at m: 8 for a small map (one
// group), else the sum of the capacities of its distinct tables (a table of
// local depth l fills 2^(globalDepth-l) directory entries). Past
// MG_MAX_TABLES tables the rest is extrapolated.
//
// A global function: the verifier checks it once, on its own, rather than
// once for every path of the program that reaches it (its loop is most of
// what it would explore otherwise).
__attribute__((noinline)) __u64 map_capacity(__u64 m)
{
	__s64 dir_len = (__s64)read_u64(m + map_dir_len_offset);
	if (dir_len <= 0)
		return 8;
	__u64 dir = read_u64(m + map_dir_ptr_offset);
	__u64 depth = read_u8(m + map_global_depth_offset);
	__u64 capacity = 0, i = 0;
	for (int n = 0; n < MG_MAX_TABLES; n++) {
		if (i >= (__u64)dir_len)
			break;
		__u64 t = read_u64(dir + 8 * i);
		__u64 local = read_u8(t + table_local_depth_offset);
		if (t == 0 || local > depth)
			return 0;
		capacity += read_u16(t + table_capacity_offset);
		i += 1ULL << ((depth - local) & 63);
	}
	if (i == 0)
		return 0;
	if (i < (__u64)dir_len)
		capacity = capacity * (__u64)dir_len / i;
	return capacity;
}

// read_detail copies the Go string (ptr, n) into e->detail.
static __always_inline void read_detail(struct event *e, __u64 ptr, __u64 n)
{
	if (n > MG_DETAIL_LEN)
		n = MG_DETAIL_LEN;
	e->detail_len = 0;
	if (n == 0 || ptr == 0)
		return;
	if (bpf_probe_read_user(e->detail, read_size(n, MG_DETAIL_LEN), (const void *)ptr) == 0)
		e->detail_len = n;
}

// growth_due reports whether the map at m has crossed its next report size,
// and if so moves that size to twice its entry count.
static __always_inline int growth_due(__u64 m)
{
	if (!m)
		return 0;
	__u64 used = read_u64(m + map_used_offset);
	if (used < growth_threshold)
		return 0;
	__u64 *next = bpf_map_lookup_elem(&growth_next, &m);
	if (next && used < *next)
		return 0;
	__u64 due = used * 2;
	bpf_map_update_elem(&growth_next, &m, &due, 0);
	return 1;
}

static __always_inline void walk_frames(struct pt_regs *ctx, __u32 flags, __u64 pc0, struct event *e)
{
	__u64 fp = ctx->rbp;
	__u64 pc;

	// At a framed site this function's own frame is set up: its return
	// address is at [BP+8] and [BP] is the caller's frame pointer. Before
	// PUSHQ BP the return address is at [SP] and BP is still the caller's.
	// At a site in the caller (MG_SITE_CALLER), the first frame is the
	// call site itself and BP the caller's frame.
	if (flags & MG_SITE_CALLER) {
		pc = pc0;
	} else if (flags & MG_SITE_FRAMED) {
		pc = read_u64(fp + 8);
		fp = read_u64(fp);
	} else {
		pc = read_u64(ctx->rsp);
	}
	e->pcs[0] = pc;
	e->npcs = pc ? 1 : 0;

	for (__u32 i = 1; i < MG_MAX_FRAMES; i++) {
		if (i >= max_frames || fp == 0 || pc == 0)
			break;
		pc = read_u64(fp + 8);
		fp = read_u64(fp);
		if (pc == 0)
			break;
		e->pcs[i] = pc;
		e->npcs = i + 1;
	}
}

// Per-CPU room for a key while it is hashed.
struct keybuf {
	char b[MG_KEY_HASHED];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct keybuf);
} keys SEC(".maps");

// is_ignored reports whether goid is one of the Guard's own goroutines.
static __always_inline int is_ignored(__u64 goid)
{
	if (goid == 0)
		return 0;
	for (int i = 0; i < MG_IGNORED; i++)
		if (ignored[i] == goid)
			return 1;
	return ignored_more && bpf_map_lookup_elem(&ignored_goids, &goid);
}

// map_type returns typ if it reads back as a map type, else 0.
static __always_inline __u64 map_type(__u64 typ)
{
	__u8 kind = 0;
	if (!typ || bpf_probe_read_user(&kind, sizeof(kind), (const void *)(typ + type_kind_offset)) < 0 ||
	    (kind & MG_ABI_KIND_MASK) != MG_ABI_KIND_MAP)
		return 0;
	return typ;
}

// key_hash is the salted FNV-1a hash of the first n (at most MG_KEY_HASHED)
// bytes of this CPU's key buffer. A global function: the verifier checks
// its loop once, not on every path of the program that hashes a key.
__attribute__((noinline)) __u64 key_hash(__u64 n)
{
	__u32 zero = 0;
	struct keybuf *kb = bpf_map_lookup_elem(&keys, &zero);
	if (!kb)
		return 0;
	__u64 h = 14695981039346656037ULL ^ key_salt;
	for (int i = 0; i < MG_KEY_HASHED; i++) {
		if (i >= n)
			break;
		h ^= (__u8)kb->b[i];
		h *= 1099511628211ULL;
	}
	return h;
}

// read_key hashes the key a delete site was given (salted FNV-1a over its
// first MG_KEY_HASHED bytes) and, only if capture_keys is set, keeps its
// first MG_KEY_PREFIX bytes in p. Without capture_keys no key byte is
// written anywhere user space can read.
static __always_inline void read_key(const struct args *a, __u8 mode, __u64 typ, struct pending_delete *p)
{
	__u32 zero = 0;
	struct keybuf *kb = bpf_map_lookup_elem(&keys, &zero);
	p->key_hash = 0;
	p->key_len = 0;
	p->prefix_len = 0;
	if (!kb || mode == MG_KEY_NONE)
		return;
	// No stale bytes of an earlier key may follow a short one.
	__builtin_memset(kb->b, 0, sizeof(kb->b));
	__u64 n = 0;
	switch (mode) {
	case MG_KEY_U32:
		*(__u32 *)kb->b = (__u32)a->cx;
		n = 4;
		break;
	case MG_KEY_U64:
		*(__u64 *)kb->b = a->cx;
		n = 8;
		break;
	case MG_KEY_STR:
		p->key_len = (__u32)a->di;
		n = a->di;
		if (n > MG_KEY_HASHED)
			n = MG_KEY_HASHED;
		if (n && bpf_probe_read_user(kb->b, read_size(n, MG_KEY_HASHED), (const void *)a->cx) < 0)
			return;
		break;
	case MG_KEY_PTR: {
		typ = map_type(typ);
		__u64 ktyp = typ ? read_u64(typ + map_type_key_offset) : 0;
		__u64 size = ktyp ? read_u64(ktyp + type_size_offset) : 0;
		p->key_len = (__u32)size;
		n = size;
		if (n > MG_KEY_HASHED)
			n = MG_KEY_HASHED;
		if (n && bpf_probe_read_user(kb->b, read_size(n, MG_KEY_HASHED), (const void *)a->cx) < 0)
			return;
		break;
	}
	default:
		return;
	}
	if (mode == MG_KEY_U32 || mode == MG_KEY_U64)
		p->key_len = (__u32)n;
	p->key_hash = key_hash(n);
	if (capture_keys) {
		__builtin_memcpy(p->prefix, kb->b, MG_KEY_PREFIX);
		p->prefix_len = (__u32)(n < MG_KEY_PREFIX ? n : MG_KEY_PREFIX);
	}
}

// count adds one to the (site, caller PC) count of an operation-statistics
// site.
static __always_inline void count_op(__u32 index, __u64 pc)
{
	struct agg_key key = {.site = index, .pc = pc};
	struct agg_val *v = bpf_map_lookup_elem(&aggs, &key);
	if (v) {
		__sync_fetch_and_add(&v->count, 1);
		return;
	}
	struct agg_val one = {.count = 1};
	bpf_map_update_elem(&aggs, &key, &one, BPF_NOEXIST);
}

// note_writer records goid as the latest writer of m and returns 1 if
// another goroutine wrote m within shared_window_ns and m was not reported
// yet; then *peer_goid and *peer_pc name it.
static __always_inline int note_writer(__u64 m, __u64 goid, __u64 pc, __u64 now, __u64 *peer_goid, __u64 *peer_pc)
{
	// The last map of each goroutine: updated only when it changes, since
	// an LRU hash update takes a lock.
	__u64 *last = bpf_map_lookup_elem(&goid_map, &goid);
	if (!last || *last != m)
		bpf_map_update_elem(&goid_map, &goid, &m, 0);
	// A map's identity is its address and its hash seed: small maps live
	// on goroutine stacks, so maps of different goroutines share addresses
	// one after another; each map has its own random seed (clear(m) draws
	// a new one, which is a new map as far as writers go, too).
	__u64 seed = read_u64(m + map_seed_offset);
	struct writers *w = bpf_map_lookup_elem(&map_writers, &m);
	if (!w || w->seed != seed) {
		struct writers fresh = {.goid = {goid, 0}, .pc = {pc, 0}, .time_ns = {now, 0}, .seed = seed};
		bpf_map_update_elem(&map_writers, &m, &fresh, 0);
		return 0;
	}
	// Two writers may run this at once on two CPUs: the exchange makes
	// each see the other's id rather than both seeing the older one.
	__u64 prev_pc = w->pc[0], prev_time = w->time_ns[0];
	__u64 prev = __sync_lock_test_and_set(&w->goid[0], goid);
	w->pc[0] = pc;
	w->time_ns[0] = now;
	if (prev != goid) {
		w->goid[1] = prev;
		w->pc[1] = prev_pc;
		w->time_ns[1] = prev_time;
	}
	if (w->goid[1] == 0 || w->reported || now - w->time_ns[1] > shared_window_ns)
		return 0;
	w->reported = 1;
	*peer_goid = w->goid[1];
	*peer_pc = w->pc[1];
	return 1;
}

// crash_peer finds, for a goroutine about to die of a concurrent map
// misuse, the other goroutine that last wrote the map it last wrote (known
// only while writers are tracked).
static __always_inline void crash_peer(__u64 goid, struct event *e)
{
	__u64 *m = bpf_map_lookup_elem(&goid_map, &goid);
	if (!m)
		return;
	__u64 key = *m;
	struct writers *w = bpf_map_lookup_elem(&map_writers, &key);
	if (!w)
		return;
	for (int i = 0; i < 2; i++) {
		if (w->goid[i] != 0 && w->goid[i] != goid) {
			e->peer_goid = w->goid[i];
			e->peer_pc = w->pc[i];
			return;
		}
	}
}

// handle is both programs: deep is a constant, so that each program holds
// only its own half and the verifier explores fewer paths. run has counted
// the hit.
static __always_inline int handle(struct pt_regs *ctx, __u32 index, struct site_stats *st, const int deep)
{
	struct site_conf *conf = bpf_map_lookup_elem(&sites, &index);
	if (!conf)
		return 0;
	__u32 flags = conf->flags;
	struct args a = {ctx->rax, ctx->rbx, ctx->rcx, ctx->rdx, ctx->rsi, ctx->rdi, ctx->rbp};
	__u64 m = arg_reg(&a, conf->map_reg);
	// A nil-or-empty block: only a nil map is an anomaly (or, for a
	// missing-key site, only an empty one).
	if (!deep && (((flags & MG_SITE_NIL_ONLY) && m != 0) || ((flags & MG_SITE_NON_NIL) && m == 0))) {
		__sync_fetch_and_add(&st->filtered, 1);
		return 0;
	}
	if (!deep && (flags & MG_SITE_GROWTH) && !growth_due(m)) {
		__sync_fetch_and_add(&st->filtered, 1);
		return 0;
	}
	// Keep the type only if it reads back as a map type, so user space
	// never dereferences a pointer that is not one. Deep sites check it
	// only when they report.
	__u64 typ = arg_reg(&a, conf->typ_reg);
	if (!deep)
		typ = map_type(typ);

	__u64 capacity = 0;
	if (!deep && (flags & MG_SITE_BLOAT)) {
		// The map and type come from spill slots at some sites: a type
		// that does not read back as a map type means they are not there.
		capacity = (m && typ) ? map_capacity(m) : 0;
		if (capacity < growth_threshold) {
			__sync_fetch_and_add(&st->filtered, 1);
			return 0;
		}
	}

	__u64 goid = read_u64(ctx->r14 + goid_offset);
	if (is_ignored(goid)) {
		__sync_fetch_and_add(&st->ignored, 1);
		return 0;
	}
	if (!deep && (flags & MG_SITE_PRINTED)) {
		// This goroutine's report is the one the runtime prints: the
		// crash record keeps its fatal event, not the first to trap.
		struct event *fe = bpf_map_lookup_elem(&fatal_events, &goid);
		__u64 ck = crash_key;
		struct crash *c = bpf_map_lookup_elem(&crashes, &ck);
		if (fe && c) {
			__builtin_memcpy(&c->ev, fe, sizeof(*fe));
			c->crashed = 1;
		}
		__sync_fetch_and_add(&st->filtered, 1);
		return 0;
	}

	__u64 pc0 = (flags & MG_SITE_CALLER)   ? conf->wrap_ret[0]
		    : (flags & MG_SITE_FRAMED) ? read_u64(ctx->rbp + 8)
					       : read_u64(ctx->rsp);
	// Go 1.27's mapaccess1* only call mapaccess2*: a call from one of them
	// is a plain read whose user is the wrapper's caller (the wrapper's
	// frame is framed: its return address is at [its BP+8]); any other call
	// is a comma-ok read.
	if (flags & MG_SITE_UNWRAP) {
		if (pc0 && (pc0 == conf->wrap_ret[0] || pc0 == conf->wrap_ret[1])) {
			__u64 fp = (flags & MG_SITE_FRAMED) ? read_u64(ctx->rbp) : ctx->rbp;
			pc0 = read_u64(fp + 8);
		} else if (flags & MG_SITE_WRAPPED) {
			__sync_fetch_and_add(&st->filtered, 1);
			return 0;
		}
	}
	__u8 ev_kind = conf->kind;
	__u32 agg_site = index;
	__u64 peer_goid = 0, peer_pc = 0;

	// The inner read of m[a][b], probed at its CALL: the outer read is
	// known from the code.
	if (!deep && (flags & MG_SITE_CALLER)) {
		peer_goid = goid;
		peer_pc = conf->wrap_ret[1];
	}
	// A nil-map read just after the same goroutine's miss, in the same
	// expression, is the inner read of m[a][b]: a nested-map miss.
	if (!deep && (conf->kind == MG_KIND_MISSING_KEY_READ || conf->kind == MG_KIND_NIL_MAP_READ)) {
		if (conf->kind == MG_KIND_NIL_MAP_READ) {
			struct last_miss *lm = bpf_map_lookup_elem(&last_misses, &goid);
			if (lm && pc0 > lm->pc && pc0 - lm->pc <= MG_NESTED_SPAN) {
				// User space checks that the outer map's elements are
				// maps of this type (peer_pc is the outer read).
				ev_kind = MG_KIND_NESTED_MAP_MISS;
				agg_site = index | MG_AGG_NESTED;
				peer_goid = goid;
				peer_pc = lm->pc;
			}
		}
		struct last_miss now_miss = {.pc = pc0};
		bpf_map_update_elem(&last_misses, &goid, &now_miss, 0);
	}
	struct pending_delete pd = {};

	// Deep sites: counts, writers and deletes; most hits end here.
	if (deep) {
		int report = 0;
		if (flags & MG_SITE_COUNT)
			count_op(index, pc0);
		if ((flags & MG_SITE_WRITER) && m &&
		    note_writer(m, goid, pc0, bpf_ktime_get_ns(), &peer_goid, &peer_pc)) {
			report = 1;
			ev_kind = MG_KIND_SHARED_WRITERS;
		}
		if (flags & (MG_SITE_DEL_NIL | MG_SITE_DEL_ENTRY)) {
			if (m == 0) {
				if (flags & MG_SITE_DEL_NIL) {
					report = 1;
					ev_kind = MG_KIND_NIL_MAP_DELETE;
					read_key(&a, conf->key_mode, typ, &pd);
				}
			} else if (flags & MG_SITE_DEL_ENTRY) {
				read_key(&a, conf->key_mode, typ, &pd);
				pd.used = read_u64(m + map_used_offset);
				if (pd.used == 0) {
					report = 1;
					ev_kind = MG_KIND_MISSING_KEY_DELETE;
				} else {
					pd.map = m;
					pd.typ = typ;
					bpf_map_update_elem(&deletes, &goid, &pd, 0);
				}
			}
		}
		if (flags & MG_SITE_DEL_DONE) {
			struct pending_delete *p = bpf_map_lookup_elem(&deletes, &goid);
			if (p && p->map == m && m) {
				__builtin_memcpy(&pd, p, sizeof(pd));
				bpf_map_delete_elem(&deletes, &goid);
				if (read_u64(m + map_used_offset) == pd.used) {
					report = 1;
					ev_kind = MG_KIND_MISSING_KEY_DELETE;
					typ = pd.typ; // checked again below: harmless
				}
			}
		}
		// Hits that end here are counted by user space as the rest of
		// hits; one atomic less per hit.
		if (!report)
			return 0;
		typ = map_type(typ);
	}

	// One event per call site, then counts: the caller's PC is the key.
	if (!deep && (flags & MG_SITE_AGG)) {
		struct agg_key key = {.site = agg_site};
		key.pc = pc0;
		struct agg_val *v = bpf_map_lookup_elem(&aggs, &key);
		if (v) {
			__sync_fetch_and_add(&v->count, 1);
			__sync_fetch_and_add(&st->agg, 1);
			return 0;
		}
		struct agg_val zero = {};
		// If the table is full, every occurrence is an event of its own.
		bpf_map_update_elem(&aggs, &key, &zero, BPF_NOEXIST);
	}

	__u32 zero_key = 0;
	struct event *e = bpf_map_lookup_elem(&scratch, &zero_key);
	if (!e)
		return 0;

	e->time_ns = bpf_ktime_get_ns();
	e->goid = goid;
	e->site = index;
	e->kind = ev_kind;
	e->peer_goid = peer_goid;
	e->peer_pc = peer_pc;
	e->key_hash = pd.key_hash;
	e->key_len = pd.key_len;
	e->_pad2 = 0;
	e->count = 1;
	e->map = m;
	e->len = m ? read_u64(m + map_used_offset) : 0;
	e->cap = capacity;
	e->aux = pc0; // the call site as aggregates key it (past a Go 1.27 wrapper)
	e->_pad = 0;

	e->typ = typ;

	e->detail_len = 0;
	if (!deep && (flags & MG_SITE_STR)) {
		read_detail(e, a.ax, a.bx);
	} else if (!deep && (flags & MG_SITE_ERR)) {
		// BX points at the boxed string header.
		read_detail(e, read_u64(a.bx), read_u64(a.bx + 8));
	} else if (deep && capture_keys && pd.prefix_len) {
		__builtin_memcpy(e->detail, pd.prefix, MG_KEY_PREFIX);
		e->detail_len = pd.prefix_len < MG_KEY_PREFIX ? pd.prefix_len : MG_KEY_PREFIX;
	}

	walk_frames(ctx, flags, pc0, e);

	if (!deep && (flags & MG_SITE_CRASH)) {
		crash_peer(goid, e);
		__u64 ck = crash_key;
		struct crash *c = bpf_map_lookup_elem(&crashes, &ck);
		// Two goroutines can race into the fatal error (both saw the
		// other's write): the runtime prints the first to take its print
		// lock, which need not be the first to get here (seen in the
		// 6.1 VM: the record named the goroutine the report did not).
		// The first to get here is what the record keeps until the
		// printed one passes MG_SITE_PRINTED, where its event, kept
		// here, replaces it.
		bpf_map_update_elem(&fatal_events, &goid, e, 0); // BPF_ANY
		if (c && __sync_fetch_and_add(&c->claimed, 1) == 0) {
			__builtin_memcpy(&c->ev, e, sizeof(*e));
			c->crashed = 1;
		}
	}

	// Deep events have a ring of their own: a flood of them never takes
	// the room of a nil-map write.
	long err = deep ? bpf_ringbuf_output(&deep_events, e, sizeof(*e), BPF_RB_NO_WAKEUP)
			: bpf_ringbuf_output(&events, e, sizeof(*e), BPF_RB_NO_WAKEUP);
	if (err < 0) {
		__sync_fetch_and_add(&st->dropped, 1);
		return 0;
	}
	__sync_fetch_and_add(&st->events, 1);
	return 0;
}

// run counts a hit and its cost, wakes the governor when the budget is
// spent, and times one hit in MG_TIME_EVERY (drawn at random; never the
// site's first), from its first instruction: the counters' cache lines,
// which the other CPU's hits take away, cost more than handle when the
// program's own work has evicted them (timed around handle alone, the
// seeded service's programs booked 0.2-0.6 us a hit where a profile put
// 0.9 us in them).
static __always_inline int run(struct pt_regs *ctx, const int deep)
{
	__u64 t0 = (bpf_get_prandom_u32() % MG_TIME_EVERY) == 0 ? bpf_ktime_get_ns() : 0;
	__u64 cookie = bpf_get_attach_cookie(ctx);
	__u32 index = (__u32)cookie;
	if (index >= MG_MAX_SITES)
		return 0;
	// The other link of a site being moved counts this trap (site_gen).
	if ((__u8)(cookie >> 32) != site_gen[index & (MG_MAX_SITES - 1)])
		return 0;
	// The mask restates the bound for the verifier, which loses it otherwise.
	struct site_stats *st = &stats[index & (MG_MAX_SITES - 1)];
	__u64 hits = __sync_fetch_and_add(&st->hits, 1) + 1;
	__u64 cost = site_cost[index & (MG_MAX_SITES - 1)];
	__u64 spent = __sync_fetch_and_add(&spent_ns, cost) + cost;
	__u64 limit = spend_limit;
	if (limit && spent >= limit && spent - cost < limit) {
		// The budget is spent: wake the governor to act now.
		__u64 site = index;
		bpf_ringbuf_output(&wakeups, &site, sizeof(site), BPF_RB_FORCE_WAKEUP);
	}
	handle(ctx, index, st, deep);
	if (t0 && hits > 1) {
		__sync_fetch_and_add(&st->prog_ns, bpf_ktime_get_ns() - t0);
		__sync_fetch_and_add(&st->timed, 1);
	}
	return 0;
}

// mapguard_site serves the always-on sites: nil maps, misses, growth,
// bloat, the unhashable-key panic and the fatal error.
SEC("uprobe")
int mapguard_site(struct pt_regs *ctx)
{
	return run(ctx, 0);
}

// mapguard_deep serves the deep sites (counts, writers, deletes).
SEC("uprobe")
int mapguard_deep(struct pt_regs *ctx)
{
	return run(ctx, 1);
}

// An empty program: the floor a uprobe costs whatever the program does, at
// a single-stepped or an emulated instruction. The cost calibration
// measures it at Start and again from time to time; benchmarks compare it
// with mapguard_site at the same instruction.
SEC("uprobe")
int mapguard_empty(struct pt_regs *ctx)
{
	return 0;
}

// The trap sampler: what the traps cost in place, which the calibration
// (an empty program on a function of the Guard's own, caches evicted) can
// only approach. User space attaches this program, for a while, when the
// traps are a real part of the budget (internal/uprobe/sample_linux.go), to
// the local APIC timer's interrupt (irq_vectors:local_timer_entry, a raw
// tracepoint): the scheduler's tick, and the CPU's other timers, come
// anyway, so a sample costs only this program, and the interrupted thread
// is current. (Per-thread task-clock perf events, the first way, cost
// every context switch of a sampled thread about 3 us to stop and start
// their timers: 28 ms a second on the seeded service's 9,400 switches.)
// It runs for every process's interrupts; it counts only sample_tgid's.
// A sample of a thread that entered the kernel from an exception without
// an error code (int3 or #DB: the user registers' orig_rax is -1; also the
// timer's own entry from user mode), at a user address that is one of a
// site's (trap_ips: the breakpoint, or one past it, before the kernel
// emulates or single-steps the instruction; where it resumes after) is a
// sample of that site's trap; in the [uprobes] area (where the kernel
// single-steps a copy of the instruction), of some single-stepped site's.
// From user mode, the timer's entry has the same orig_rax: a thread
// interrupted in user code at a resume address counts too, rightly so when
// the interrupt came due in the trap's last stretch with interrupts off,
// wrongly when it simply ran there (one instruction among millions).
__u32 sample_tgid;          // the process sampled (0: count nothing)
__u64 xol_start, xol_end;   // its [uprobes] area
struct sample_counts {
	__u64 own;  // samples of the process, in any mode
	__u64 xol;  // samples in a single-stepped site's second trap
} sample_counts;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MG_MAX_SITES * 4);
	__type(key, __u64);   // a user address a site's trap is taken at or resumes from
	__type(value, __u32); // the site's index
} trap_ips SEC(".maps");

SEC("raw_tracepoint/local_timer_entry")
int mapguard_sample(void *ctx)
{
	__u32 tgid = sample_tgid;
	if (!tgid || (__u32)(bpf_get_current_pid_tgid() >> 32) != tgid)
		return 0;
	__sync_fetch_and_add(&sample_counts.own, 1);
	struct pt_regs *regs = bpf_task_pt_regs(bpf_get_current_task_btf());
	struct {
		__u64 orig_rax, rip, cs;
	} u;
	if (bpf_probe_read_kernel(&u, sizeof(u), &regs->orig_rax))
		return 0;
	if (u.orig_rax != (__u64)-1 || (u.cs & 3) != 3)
		return 0; // a system call, a page fault, or a kernel thread
	__u32 *index = bpf_map_lookup_elem(&trap_ips, &u.rip);
	if (index) {
		__sync_fetch_and_add(&stats[*index & (MG_MAX_SITES - 1)].samples, 1);
		return 0;
	}
	if (u.rip >= xol_start && u.rip < xol_end)
		__sync_fetch_and_add(&sample_counts.xol, 1);
	return 0;
}

// The object bpf2go builds from this file is committed, not next to it but
// where the loader embeds it: internal/uprobe/mapguard_x86_bpfel.o with its
// loader mapguard_x86_bpfel.go (bpf/gen.go says how; CI regenerates it and
// fails on any difference).
