// SPDX-License-Identifier: (MIT OR GPL-2.0-only)
//
// mapguard's uprobe program. One program serves every probe site: the
// attach cookie is the site index, and sites[index] says what the site
// means. Everything the program reads from the Go runtime (goroutine id,
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
volatile const __u64 type_kind_offset = 0; // internal/abi.Type.Kind_
// How many return PCs to collect per event, at most MG_MAX_FRAMES.
volatile const __u32 max_frames = 4;
// Entries at which a growing map is first reported (Options.GrowthThreshold).
volatile const __u64 growth_threshold = 1 << 20;

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

// The loader sets max_entries from Options.BufferSize.
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

// Keep the record types in BTF so bpf2go generates Go declarations for them.
const struct event *unused_event __attribute__((unused));
const enum mg_kind *unused_kind __attribute__((unused));

static __always_inline __u64 read_u64(__u64 addr)
{
	__u64 v = 0;
	if (bpf_probe_read_user(&v, sizeof(v), (const void *)addr) < 0)
		return 0;
	return v;
}

// args holds the argument registers a site may need. They are loaded from
// ctx at fixed offsets up front: the verifier rejects a ctx load at an offset
// computed from the site's configuration.
struct args {
	__u64 ax, bx, cx;
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
	}
	return 0;
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

static __always_inline void walk_frames(struct pt_regs *ctx, __u8 framed, struct event *e)
{
	__u64 fp = ctx->rbp;
	__u64 pc;

	// At a framed site this function's own frame is set up: its return
	// address is at [BP+8] and [BP] is the caller's frame pointer. Before
	// PUSHQ BP the return address is at [SP] and BP is still the caller's.
	if (framed) {
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

SEC("uprobe")
int mapguard_site(struct pt_regs *ctx)
{
	__u32 index = (__u32)bpf_get_attach_cookie(ctx);
	if (index >= MG_MAX_SITES)
		return 0;
	struct site_conf *conf = bpf_map_lookup_elem(&sites, &index);
	if (!conf)
		return 0;
	// The mask restates the bound for the verifier, which loses it otherwise.
	struct site_stats *st = &stats[index & (MG_MAX_SITES - 1)];
	__sync_fetch_and_add(&st->hits, 1);

	struct args a = {ctx->rax, ctx->rbx, ctx->rcx};
	__u64 m = arg_reg(&a, conf->map_reg);
	// A nil-or-empty block: only a nil map is an anomaly.
	if ((conf->flags & MG_SITE_NIL_ONLY) && m != 0) {
		__sync_fetch_and_add(&st->filtered, 1);
		return 0;
	}
	if ((conf->flags & MG_SITE_GROWTH) && !growth_due(m)) {
		__sync_fetch_and_add(&st->filtered, 1);
		return 0;
	}

	__u64 goid = read_u64(ctx->r14 + goid_offset);
	if (bpf_map_lookup_elem(&ignored_goids, &goid)) {
		__sync_fetch_and_add(&st->ignored, 1);
		return 0;
	}

	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		__sync_fetch_and_add(&st->dropped, 1);
		return 0;
	}

	e->time_ns = bpf_ktime_get_ns();
	e->goid = goid;
	e->site = index;
	e->kind = conf->kind;
	e->count = 1;
	e->map = m;
	e->len = m ? read_u64(m + map_used_offset) : 0;

	// typ_reg holds the map type at every site the loader accepts. Keep it
	// only if it reads back as a map type, so user space never dereferences
	// a pointer that is not one.
	__u64 typ = arg_reg(&a, conf->typ_reg);
	__u8 kind = 0;
	e->typ = 0;
	if (bpf_probe_read_user(&kind, sizeof(kind), (const void *)(typ + type_kind_offset)) == 0 &&
	    (kind & MG_ABI_KIND_MASK) == MG_ABI_KIND_MAP)
		e->typ = typ;

	walk_frames(ctx, conf->flags & MG_SITE_FRAMED, e);

	bpf_ringbuf_submit(e, BPF_RB_NO_WAKEUP);
	__sync_fetch_and_add(&st->events, 1);
	return 0;
}

// An empty program: the floor a uprobe costs whatever the program does. It is
// attached only by benchmarks and by the cost calibration, to compare with
// mapguard_site at the same instruction.
SEC("uprobe")
int mapguard_empty(struct pt_regs *ctx)
{
	return 0;
}
