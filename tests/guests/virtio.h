/*
 * virtio.h - the micro-guest's minimal virtio-mmio (version 2, virtio 1.x)
 * transport, shared by the drivers (blk.c, net.c): discovery from the
 * cmdline, registers, reset, feature negotiation, split virtqueues in guest
 * memory, kicks, bounded waits.  Polling only: the guest never takes an
 * interrupt.  README.md lists every register access in order.
 */
#ifndef VIRTIO_H
#define VIRTIO_H

#include "mg.h"

/* ---- virtio-mmio registers: the device's own table (native/) ---- */
#include "virtio_mmio_regs.h"

#define VIRTIO_ID_NET		1
#define VIRTIO_ID_BLOCK		2

#define ST_ACKNOWLEDGE		0x01
#define ST_DRIVER		0x02
#define ST_DRIVER_OK		0x04
#define ST_FEATURES_OK		0x08
#define ST_NEEDS_RESET		0x40
#define ST_FAILED		0x80

#define F_INDIRECT_DESC		(1ULL << 28)
#define F_EVENT_IDX		(1ULL << 29)
#define F_VERSION_1		(1ULL << 32)

#define D_NEXT			1
#define D_WRITE			2
#define D_INDIRECT		4

#define AVAIL_F_NO_INTERRUPT	1
#define USED_F_NO_NOTIFY	1

#define VQ_MAX			256	/* largest queue the guest has ring memory for */
#define HOSTILE_ADDR		0x7fff00000000ULL	/* far outside any guest RAM */

/* ---- split virtqueue (2.7), all guest-owned ---- */
struct vdesc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

struct vavail {
	u16 flags;
	u16 idx;
	u16 ring[VQ_MAX + 1];	/* ring[qsize] = used_event (EVENT_IDX) */
};

struct vused_elem {
	u32 id;
	u32 len;
};

struct vused {
	u16 flags;
	u16 idx;
	struct vused_elem ring[VQ_MAX + 1];	/* (u16) ring[qsize] = avail_event */
};

/* one queue's rings: descriptor table +0, avail +0x1000, used +0x2000 */
struct vring {
	struct vdesc desc[VQ_MAX] __attribute__((aligned(4096)));
	struct vavail avail __attribute__((aligned(4096)));
	struct vused used __attribute__((aligned(4096)));
};

_Static_assert(sizeof(struct vdesc) == 16, "vdesc");
_Static_assert(__builtin_offsetof(struct vring, avail) == 0x1000, "avail");
_Static_assert(__builtin_offsetof(struct vring, used) == 0x2000, "used");
_Static_assert(sizeof(struct vring) == 0x3000, "vring");

/* ---- driver state ---- */
struct vdev {
	const char *name;	/* "blk" / "net": the MG-ERROR prefix */
	u32 index;		/* dev= as the op named it */
	u32 word;		/* position among the virtio_mmio.device= words */
	u64 base, size;
	u32 irq;
	u64 offered, accepted;
};

struct vq {
	const struct vdev *dev;
	volatile struct vring *r;
	u32 qi, qmax, qsize;
	int evidx, noirq;
	u16 avail_idx, kicked, last_used;
	u64 kicks;
};

/*
 * Shared data memory for whichever mode runs (one per boot): mg=blk's 1 MiB
 * data buffer, mg=net's frame buffers.  .bss.noinit: never zeroed.
 */
#define VIRTIO_BUF_SIZE		(1u << 20)
extern u8 virtio_buf[VIRTIO_BUF_SIZE];

#define BARRIER()	__asm__ volatile("" : : : "memory")
/* full fence (store -> load): a locked instruction, which KVM's emulator has */
#define FENCE()		__asm__ volatile("lock addl $0, (%%rsp)" : : : "memory", "cc")

static inline u32 vio_rd(const struct vdev *d, u32 off)
{
	return mmio_read32(d->base + off);
}

static inline void vio_wr(const struct vdev *d, u32 off, u32 v)
{
	mmio_write32(d->base + off, v);
}

/* config space: 8- and 16-bit fields need accesses of their own width (4.2.2.2) */
static inline u8 vio_rd8(const struct vdev *d, u32 off)
{
	u8 v;
	__asm__ volatile("movb (%1), %0" : "=q"(v) : "r"(d->base + off) : "memory");
	return v;
}

static inline u16 vio_rd16(const struct vdev *d, u32 off)
{
	u16 v;
	__asm__ volatile("movw (%1), %0" : "=r"(v) : "r"(d->base + off) : "memory");
	return v;
}

static inline u32 vio_status(const struct vdev *d)
{
	return vio_rd(d, VIRTIO_MMIO_STATUS);
}

/*
 * ---- bounded waits: by the TSC and by iterations ----
 * "At least ms" with a 10 GHz bound, or ms at vio_wait_khz when a driver
 * set it from a measured TSC rate (mg=net does, mg=blk does not).
 */
extern u64 vio_wait_khz;

struct wait {
	u64 start, limit, iters, max_iters;
};

void wait_init(struct wait *w, u64 ms);
int wait_expired(struct wait *w);

/* ---- discovery: virtio_mmio.device=<size>@<base>:<irq>[:<id>] ---- */
u32 vio_count(void);	/* virtio_mmio.device= words on the cmdline */
void vio_find(struct vdev *d, const char *name, u32 index, u32 word);
int vio_probe_id(const struct vdev *d);	/* DeviceID, or -1 if Magic/Version is not virtio */

/* ---- transport ---- */
void vio_reset(const struct vdev *d);
void vio_ack(const struct vdev *d);
void vio_begin(struct vdev *d, u32 device_id, const char *id_name, u64 (*want)(void));
u32 vio_queue_size(struct vq *q, const struct vdev *d, u32 qi, u32 qdefault, int noirq);
void vio_queue_setup(struct vq *q, volatile struct vring *r, u64 desc_override);
void vio_driver_ok(const struct vdev *d);
u64 vio_config64(const struct vdev *d, u32 off);

/* ---- virtqueue ---- */
void vq_post_head(struct vq *q, u16 head);
void vq_kick(struct vq *q, int always);
int vq_wait_used(struct vq *q, u64 ms, u32 status_every);
void vq_set_used_event(struct vq *q);

/* Batching: avail entries one by one, then a single avail->idx store for the lot. */
static inline void vq_push(struct vq *q, u16 head)
{
	q->r->avail.ring[q->avail_idx % q->qsize] = head;
	q->avail_idx++;
}

static inline void vq_publish(struct vq *q)
{
	BARRIER();	/* entries before the index (x86 keeps stores in order) */
	q->r->avail.idx = q->avail_idx;
}

static inline void put_desc(volatile struct vdesc *t, u64 addr, u32 len, u16 flags, u16 next)
{
	t->addr = addr;
	t->len = len;
	t->flags = flags;
	t->next = next;
}

/* ---- output and checksums ---- */
void put_hex(u64 v, int digits);
u32 fnv1a_update(u32 h, const u8 *p, u64 n);
#define FNV1A_INIT	0x811c9dc5u

/* unaligned 64-bit access (x86 allows it; fewer emulated instructions than bytes) */
typedef u64 u64u __attribute__((aligned(1), may_alias));

#endif /* VIRTIO_H */
