/*
 * fuzz.h - what the libFuzzer harnesses share (not a harness itself):
 * an input reader, fake guest RAM, a tiny fake virtio-mmio driver, an
 * interpreter of guest actions ("ops") and the transport invariants.
 *
 * Guest RAM is the core's own guarded mappings (vmm_mem_add_region with
 * hva NULL): a PROT_NONE page on each side of every region, so any device
 * access outside guest RAM faults on the spot (ASan reports the SEGV).
 * Three regions: A and B adjacent (a buffer across 0x1000 must be split,
 * not read through A's guard page), C after a hole.
 *
 * Everything is static: each harness is one translation unit.  A failed
 * invariant prints why and aborts, which libFuzzer records as a crash.
 */
#ifndef VMM_FUZZ_H
#define VMM_FUZZ_H
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "memory.h"
#include "virtio_mmio.h"

#define RAM_A_GPA 0x0000ull
#define RAM_A_SIZE 0x1000ull
#define RAM_B_GPA 0x1000ull
#define RAM_B_SIZE 0x2000ull
#define RAM_C_GPA 0x10000ull
#define RAM_C_SIZE 0x1000ull

#define CHECK(cond, ...)                                                          \
	do {                                                                      \
		if (!(cond)) {                                                    \
			fprintf(stderr, "invariant failed: %s (%s:%d): ", #cond,  \
				__FILE__, __LINE__);                              \
			fprintf(stderr, __VA_ARGS__);                             \
			fputc('\n', stderr);                                      \
			abort();                                                  \
		}                                                                 \
	} while (0)

/* ---- input: reads past the end give zeros (no bytes are ever invented) ---- */
struct input {
	const uint8_t *p;
	size_t n;
};

static inline void in_bytes(struct input *in, void *out, size_t n)
{
	size_t k = n < in->n ? n : in->n;
	memcpy(out, in->p, k);
	memset((uint8_t *)out + k, 0, n - k);
	in->p += k;
	in->n -= k;
}

static inline uint8_t in_u8(struct input *in)
{
	uint8_t v;
	in_bytes(in, &v, 1);
	return v;
}

static inline uint16_t in_u16(struct input *in)
{
	uint16_t v;
	in_bytes(in, &v, 2);
	return v;
}

static inline uint32_t in_u32(struct input *in)
{
	uint32_t v;
	in_bytes(in, &v, 4);
	return v;
}

/* A sub-input of n bytes (fewer if the input ends first). */
static inline struct input in_sub(struct input *in, size_t n)
{
	struct input s = { in->p, n < in->n ? n : in->n };
	in->p += s.n;
	in->n -= s.n;
	return s;
}

/* ---- guest RAM ---- */

/* RAM as new: zeroed, then img fills A and B from gpa 0 and what is left
 * of it fills C.  The guarded mappings are made once and reused (zeroed
 * each time): an input sees exactly what it would in fresh RAM, without
 * the cost of mapping it again. */
static inline struct vmm_mem *ram_load(struct input img)
{
	static struct vmm_mem *mem;
	if (!mem) {
		mem = vmm_mem_new();
		CHECK(mem, "no memory");
		CHECK(vmm_mem_add_region(mem, RAM_A_GPA, RAM_A_SIZE, NULL) == 0 &&
		      vmm_mem_add_region(mem, RAM_B_GPA, RAM_B_SIZE, NULL) == 0 &&
		      vmm_mem_add_region(mem, RAM_C_GPA, RAM_C_SIZE, NULL) == 0, "regions");
		/* Dirty tracking on, as for a VM that will be snapshotted: every
		 * device write then marks pages from guest-derived ranges. */
		CHECK(vmm_mem_track_dirty(mem) == 0, "dirty tracking");
	}
	for (int i = 0; i < mem->n; i++) {
		memset(mem->r[i].hva, 0, mem->r[i].size);
		memset(mem->r[i].dirty, 0, (mem->r[i].size / 4096 + 63) / 64 * 8);
	}
	size_t ab = img.n < RAM_A_SIZE + RAM_B_SIZE ? img.n : RAM_A_SIZE + RAM_B_SIZE;
	CHECK(vmm_mem_write(mem, 0, img.p, ab) == 0, "image");
	size_t c = img.n - ab < RAM_C_SIZE ? img.n - ab : RAM_C_SIZE;
	CHECK(vmm_mem_write(mem, RAM_C_GPA, img.p + ab, c) == 0, "image C");
	return mem;
}

/* Is the host range [p, p+len) wholly inside one region of guest RAM? */
static inline int in_ram(const struct vmm_mem *mem, const void *p, uint64_t len)
{
	const uint8_t *b = p;
	for (int i = 0; i < mem->n; i++) {
		const struct vmm_mem_region *r = &mem->r[i];
		if (b >= r->hva && len <= r->size && (uint64_t)(b - r->hva) <= r->size - len)
			return 1;
	}
	return 0;
}

/* ---- virtio-mmio registers (version 2) ---- */
enum {
	R_MAGIC = 0x000, R_DEV_FEATURES = 0x010, R_DEV_FEATURES_SEL = 0x014,
	R_DRV_FEATURES = 0x020, R_DRV_FEATURES_SEL = 0x024, R_QUEUE_SEL = 0x030,
	R_QUEUE_NUM = 0x038, R_QUEUE_READY = 0x044, R_QUEUE_NOTIFY = 0x050,
	R_INT_STATUS = 0x060, R_INT_ACK = 0x064, R_STATUS = 0x070,
	R_QUEUE_DESC_LO = 0x080, R_QUEUE_AVAIL_LO = 0x090, R_QUEUE_USED_LO = 0x0a0,
	R_CONFIG = 0x100,
	S_ACK = 1, S_DRIVER = 2, S_DRIVER_OK = 4, S_FEATURES_OK = 8,
};

#define TRANSPORT_FEATURES (VMM_VIRTIO_F_VERSION_1 | VMM_VIRTIO_F_EVENT_IDX | \
			    VMM_VIRTIO_F_INDIRECT_DESC)

static inline void wr(struct vmm_virtio *v, uint64_t off, uint32_t val)
{
	vmm_virtio_mmio_write(v, off, val, 4);
}

static inline uint32_t rd(struct vmm_virtio *v, uint64_t off)
{
	return vmm_virtio_mmio_read(v, off, 4);
}

/* What a driver programs: features, and per queue its size and rings. */
struct setup {
	uint8_t flags;		/* SETUP_* */
	uint64_t features;
	uint16_t qsize[VMM_VIRTIO_MAX_QUEUES];
	uint32_t desc[VMM_VIRTIO_MAX_QUEUES], avail[VMM_VIRTIO_MAX_QUEUES],
		 used[VMM_VIRTIO_MAX_QUEUES];
};
enum { SETUP_INIT = 1, SETUP_NO_DRIVER_OK = 2 };
#define SETUP_BYTES (1 + 8 + VMM_VIRTIO_MAX_QUEUES * 14)

static inline void setup_parse(struct input *in, struct setup *s)
{
	s->flags = in_u8(in);
	s->features = in_u32(in);
	s->features |= (uint64_t)in_u32(in) << 32;
	for (int q = 0; q < VMM_VIRTIO_MAX_QUEUES; q++) {
		s->qsize[q] = in_u16(in);
		s->desc[q] = in_u32(in);
		s->avail[q] = in_u32(in);
		s->used[q] = in_u32(in);
	}
}

/* The init sequence a Linux driver runs (virtio 1.x, 3.1.1); the device
 * may refuse any step, which the ops then run into. */
static inline void driver_init(struct vmm_virtio *v, const struct setup *s)
{
	wr(v, R_STATUS, 0);
	wr(v, R_STATUS, S_ACK);
	wr(v, R_STATUS, S_ACK | S_DRIVER);
	wr(v, R_DRV_FEATURES_SEL, 0);
	wr(v, R_DRV_FEATURES, (uint32_t)s->features);
	wr(v, R_DRV_FEATURES_SEL, 1);
	wr(v, R_DRV_FEATURES, (uint32_t)(s->features >> 32));
	wr(v, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
	for (uint32_t q = 0; q < v->ops->num_queues; q++) {
		wr(v, R_QUEUE_SEL, q);
		wr(v, R_QUEUE_NUM, s->qsize[q]);
		wr(v, R_QUEUE_DESC_LO, s->desc[q]);
		wr(v, R_QUEUE_DESC_LO + 4, 0);
		wr(v, R_QUEUE_AVAIL_LO, s->avail[q]);
		wr(v, R_QUEUE_AVAIL_LO + 4, 0);
		wr(v, R_QUEUE_USED_LO, s->used[q]);
		wr(v, R_QUEUE_USED_LO + 4, 0);
		wr(v, R_QUEUE_READY, 1);
	}
	if (!(s->flags & SETUP_NO_DRIVER_OK))
		wr(v, R_STATUS, rd(v, R_STATUS) | S_DRIVER_OK);
}

/* Two saved states alike in every field (not memcmp: the compound literal
 * vmm_virtio_save assigns leaves the padding unspecified). */
static inline int state_same(const struct vmm_virtio_state *a, const struct vmm_virtio_state *b)
{
	if (a->device_id != b->device_id || a->nqueues != b->nqueues || a->status != b->status ||
	    a->dev_feat_sel != b->dev_feat_sel || a->drv_feat_sel != b->drv_feat_sel ||
	    a->queue_sel != b->queue_sel || a->int_status != b->int_status ||
	    a->config_gen != b->config_gen || a->driver_features != b->driver_features)
		return 0;
	for (uint32_t i = 0; i < a->nqueues && i < VMM_VIRTIO_MAX_QUEUES; i++) {
		const struct vmm_virtq_state *x = &a->q[i], *y = &b->q[i];
		if (x->desc != y->desc || x->avail != y->avail || x->used != y->used ||
		    x->size != y->size || x->last_avail != y->last_avail ||
		    x->used_idx != y->used_idx || x->signalled_used != y->signalled_used ||
		    x->ready != y->ready || x->event_idx != y->event_idx || x->indirect != y->indirect)
			return 0;
	}
	return 1;
}

/* ---- invariants of the transport, after every guest action ---- */
static inline void check_transport(const struct vmm_virtio *v, int restored)
{
	uint64_t offered = v->ops->features | TRANSPORT_FEATURES;
	CHECK(!(v->int_status & ~3u), "int_status %#x", v->int_status);
	if (v->status & S_FEATURES_OK)
		CHECK(!(v->driver_features & ~offered) &&
		      (v->driver_features & VMM_VIRTIO_F_VERSION_1),
		      "FEATURES_OK with features %#llx", (unsigned long long)v->driver_features);
	/* Only a bad chain (or a snapshot) sets NEEDS_RESET. */
	if (!restored && (v->status & VMM_VIRTIO_STATUS_NEEDS_RESET))
		CHECK(v->st.bad_chains > 0, "NEEDS_RESET without a bad chain");
	for (uint32_t i = 0; i < v->ops->num_queues; i++) {
		const struct vmm_virtq *q = &v->q[i];
		if (!q->ready)
			continue;
		uint64_t n = q->size;
		CHECK(n && n <= VMM_VIRTQ_MAX_SIZE && !(n & (n - 1)), "ready queue size %llu",
		      (unsigned long long)n);
		CHECK(q->desc && in_ram(v->mem, q->desc, 16 * n), "desc table outside RAM");
		CHECK(q->avail && in_ram(v->mem, q->avail, 6 + 2 * n), "avail ring outside RAM");
		CHECK(q->used && in_ram(v->mem, q->used, 6 + 8 * n), "used ring outside RAM");
		CHECK(q->desc == vmm_mem_translate(v->mem, q->desc_gpa, 16 * n) &&
		      q->avail == vmm_mem_translate(v->mem, q->avail_gpa, 6 + 2 * n) &&
		      q->used == vmm_mem_translate(v->mem, q->used_gpa, 6 + 8 * n),
		      "ring views do not match their guest addresses");
	}
}

/* Build with -DFUZZ_DEBUG to see what an input did (checking seeds). */
static inline void debug_stats(const char *what, const struct vmm_virtio *v)
{
#ifdef FUZZ_DEBUG
	const struct vmm_virtio_stats *s = &v->st;
	fprintf(stderr, "%s: status %#x notifies %llu requests %llu bad %llu ioerr %llu "
		"rd %llu wr %llu irq %llu rx %llu tx %llu\n", what, v->status,
		(unsigned long long)s->notifies, (unsigned long long)s->requests,
		(unsigned long long)s->bad_chains, (unsigned long long)s->io_errors,
		(unsigned long long)s->bytes_read, (unsigned long long)s->bytes_written,
		(unsigned long long)s->interrupts, (unsigned long long)s->rx_frames,
		(unsigned long long)s->tx_frames);
#else
	(void)what;
	(void)v;
#endif
}

/* ---- guest actions ---- */
/* One op is 8 bytes: kind, a, off (u16), val (u32). */
#define OP_BYTES 8
#define MAX_OPS 64

enum op_kind {
	OP_WRITE,	/* register write: off, val; len 1 << (a & 3) */
	OP_READ,	/* register read: off; len 1 << (a & 3) */
	OP_NOTIFY,	/* QueueNotify: queue a % 3 (2 is no queue) */
	OP_POKE,	/* the guest writes val (4 bytes) at gpa off (+ 0x10000 if a & 1) */
	OP_PUBLISH,	/* the guest adds val % 17 to queue (a & 1)'s avail idx */
	OP_BACKEND,	/* the backend fd is readable (net) */
	OP_FRAME,	/* a frame arrives at the tap (net RX) */
	OP_REINIT,	/* the driver resets and runs its init sequence again */
	OP_KINDS
};

struct op {
	uint8_t kind, a;
	uint16_t off;
	uint32_t val;
};

static inline struct op op_parse(struct input *in)
{
	struct op o;
	o.kind = in_u8(in) % OP_KINDS;
	o.a = in_u8(in);
	o.off = in_u16(in);
	o.val = in_u32(in);
	return o;
}

/* Register access through the bus ops, as a vCPU's MMIO exit makes it:
 * any length 1..8, any offset inside the 4 KiB slot (the bus refuses the
 * rest).  Bytes of data past len must stay untouched. */
static inline void mmio_access(struct vmm_virtio *v, int write, uint64_t off, uint32_t len,
			       uint32_t val)
{
	uint8_t data[16];
	memset(data, 0xa5, sizeof(data));
	if (write) {
		memcpy(data, &val, 4);
		vmm_virtio_mmio_ops.write(v, off, data, len);
	} else {
		vmm_virtio_mmio_ops.read(v, off, data, len);
	}
	for (uint32_t i = write ? 4 : len; i < sizeof(data); i++)
		CHECK(data[i] == 0xa5, "access of %u bytes at %#llx touched byte %u", len,
		      (unsigned long long)off, i);
}

/* The common ops; the harness serves OP_BACKEND and OP_FRAME itself
 * (returns 0 for those, 1 when done here). */
static inline int op_common(struct vmm_virtio *v, struct vmm_mem *mem, const struct setup *s,
			    const struct op *o)
{
	switch (o->kind) {
	case OP_WRITE:
	case OP_READ: {
		uint64_t off = o->off % VMM_VIRTIO_MMIO_SIZE;
		uint32_t len = 1u << (o->a & 3);
		if (off + len <= VMM_VIRTIO_MMIO_SIZE)	/* what the bus lets through */
			mmio_access(v, o->kind == OP_WRITE, off, len, o->val);
		return 1;
	}
	case OP_NOTIFY:
		wr(v, R_QUEUE_NOTIFY, o->a % 3);
		return 1;
	case OP_POKE:
		vmm_mem_write(mem, o->off + ((o->a & 1) ? RAM_C_GPA : 0), &o->val, 4);
		return 1;
	case OP_PUBLISH: {
		int q = o->a & 1;
		uint16_t idx;
		if (vmm_mem_read(mem, s->avail[q] + 2ull, &idx, 2) == 0) {
			idx = (uint16_t)(idx + o->val % 17);
			vmm_mem_write(mem, s->avail[q] + 2ull, &idx, 2);
		}
		return 1;
	}
	case OP_REINIT:
		driver_init(v, s);
		return 1;
	default:
		return 0;
	}
}

/* ---- devices ---- */
#include <sys/mman.h>
#include "virtio_blk.h"
#include "virtio_net.h"

#define DISK_SECTORS 16

static uint8_t image[DISK_SECTORS * 512];

static inline void disk_image_init(void)
{
	static int done;
	for (size_t i = 0; !done && i < sizeof(image); i++)
		image[i] = (uint8_t)(i * 7 + i / 512);
	done = 1;
}

/* A virtio-blk drive on a fresh memfd of DISK_SECTORS patterned sectors;
 * *disk is the memfd (the harness closes it after the device). */
static inline struct vmm_virtio *blk_new(struct vmm_mem *mem, int read_only, const char *serial,
					 int *disk)
{
	disk_image_init();
	*disk = memfd_create("fuzz-disk", MFD_CLOEXEC);
	CHECK(*disk >= 0 && pwrite(*disk, image, sizeof(image), 0) == (ssize_t)sizeof(image),
	      "memfd");
	struct vmm_virtio *v;	/* the device keeps its own duplicate of the fd */
	int r = vmm_virtio_blk_new(mem, *disk, read_only, serial, &v);
	CHECK(r == 0, "vmm_virtio_blk_new: %d", r);
	return v;
}

/* The disk is still DISK_SECTORS long, and unchanged if read-only. */
static inline void check_disk(int disk, int read_only)
{
	static uint8_t got[DISK_SECTORS * 512 + 1];
	CHECK(pread(disk, got, sizeof(got), 0) == DISK_SECTORS * 512, "disk size changed");
	CHECK(!read_only || !memcmp(got, image, sizeof(image)), "read-only disk written");
}

/* Whether the device wants its tap polled, as the I/O thread would see it. */
struct polling {
	int on;
};

static inline void poll_cb(void *ctx, int on)
{
	((struct polling *)ctx)->on = on;
}

/* A virtio-net device over a SOCK_SEQPACKET pair standing in for the tap
 * (frame boundaries kept, as a tap keeps them): fds[0] the device's side
 * (non-blocking), fds[1] the host's. */
static inline struct vmm_virtio *net_new(struct vmm_mem *mem, uint32_t max_frame, int fds[2],
					 struct polling *poll)
{
	static const uint8_t mac[6] = { 2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee };
	CHECK(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) == 0,
	      "socketpair");
	struct vmm_virtio *v;
	int r = vmm_virtio_net_new(mem, fds[0], mac, max_frame, &v);
	CHECK(r == 0, "vmm_virtio_net_new: %d", r);
	poll->on = 1;	/* a new device's tap is polled (rx_blocked 0) */
	v->poll_backend = poll_cb;
	v->poll_ctx = poll;
	return v;
}

static inline void check_net(struct vmm_virtio *v, const struct polling *poll)
{
	const struct vmm_net *n = (const struct vmm_net *)v;
	CHECK(poll->on == !n->rx_blocked, "polling %d but rx_blocked %d", poll->on, n->rx_blocked);
}

/* Frames the device sent to the tap, drained: count and bytes. */
static inline void drain(int fd, uint64_t *frames, uint64_t *bytes)
{
	static uint8_t buf[64];
	for (;;) {
		ssize_t r = recv(fd, buf, sizeof(buf), MSG_TRUNC | MSG_DONTWAIT);
		if (r < 0)
			break;
		CHECK(r >= 12, "a %zd-byte frame: shorter than the vnet header", r);
		(*frames)++;
		*bytes += (uint64_t)r;
	}
}

#endif
