/*
 * blk.c - a minimal virtio-mmio (version 2) transport and virtio-blk driver
 * for the micro-guest, and the mg=blk mode that uses it.
 *
 * Polling only: the guest never takes an interrupt (IF stays 0), it watches
 * used->idx in memory and acknowledges InterruptStatus after completions.
 * Devices come from the cmdline words virtio_mmio.device=<size>@<base>:<irq>
 * (in order: device index 0, 1, ...).  One split virtqueue (queue 0), its
 * rings and every request buffer live in the image's .bss.noinit (not
 * zeroed at boot: the driver initialises what the device reads).
 *
 * Every wait is bounded (iterations and TSC).  README.md ("mg=blk") lists
 * the steps, each op's output and what it writes where.
 */
#include "mg.h"

/* ---- virtio-mmio registers (virtio 1.x, 4.2.2) ---- */
enum {
	VM_MAGIC = 0x000, VM_VERSION = 0x004, VM_DEVICE_ID = 0x008, VM_VENDOR_ID = 0x00c,
	VM_DEV_FEATURES = 0x010, VM_DEV_FEATURES_SEL = 0x014,
	VM_DRV_FEATURES = 0x020, VM_DRV_FEATURES_SEL = 0x024,
	VM_QUEUE_SEL = 0x030, VM_QUEUE_NUM_MAX = 0x034, VM_QUEUE_NUM = 0x038,
	VM_QUEUE_READY = 0x044, VM_QUEUE_NOTIFY = 0x050,
	VM_INT_STATUS = 0x060, VM_INT_ACK = 0x064, VM_STATUS = 0x070,
	VM_QUEUE_DESC_LO = 0x080, VM_QUEUE_DESC_HI = 0x084,
	VM_QUEUE_AVAIL_LO = 0x090, VM_QUEUE_AVAIL_HI = 0x094,
	VM_QUEUE_USED_LO = 0x0a0, VM_QUEUE_USED_HI = 0x0a4,
	VM_CONFIG_GEN = 0x0fc, VM_CONFIG = 0x100,
};

#define VIRTIO_MAGIC		0x74726976u	/* "virt" */
#define VIRTIO_ID_BLOCK		2

#define ST_ACKNOWLEDGE		0x01
#define ST_DRIVER		0x02
#define ST_DRIVER_OK		0x04
#define ST_FEATURES_OK		0x08
#define ST_NEEDS_RESET		0x40
#define ST_FAILED		0x80

#define F_SEG_MAX		(1ULL << 2)
#define F_RO			(1ULL << 5)
#define F_BLK_SIZE		(1ULL << 6)
#define F_FLUSH			(1ULL << 9)
#define F_INDIRECT_DESC		(1ULL << 28)
#define F_EVENT_IDX		(1ULL << 29)
#define F_VERSION_1		(1ULL << 32)

#define T_IN			0
#define T_OUT			1
#define T_FLUSH			4
#define T_GET_ID		8
#define S_NONE			0xff	/* status byte sentinel: the device never wrote it */

#define D_NEXT			1
#define D_WRITE			2
#define D_INDIRECT		4

#define AVAIL_F_NO_INTERRUPT	1
#define USED_F_NO_NOTIFY	1

#define SECTOR			512
#define ID_BYTES		20

#define QMAX			256		/* largest queue the guest has memory for */
#define QDEFAULT		64
#define OPEN_MAX		2		/* devices open at once (twodev) */
#define BUF_SIZE		(1u << 20)	/* data buffer: 2048 sectors */
#define IND_MAX			4		/* descriptors per indirect table */

#define HOSTILE_ADDR		0x7fff00000000ULL	/* far outside any guest RAM */

/* ---- ring memory (one per open device), all guest-owned ---- */
struct vdesc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

struct vavail {
	u16 flags;
	u16 idx;
	u16 ring[QMAX + 1];	/* ring[qsize] = used_event (EVENT_IDX) */
};

struct vused_elem {
	u32 id;
	u32 len;
};

struct vused {
	u16 flags;
	u16 idx;
	struct vused_elem ring[QMAX + 1];	/* (u16) ring[qsize] = avail_event */
};

struct blk_hdr {
	u32 type;
	u32 reserved;
	u64 sector;
};

struct vq_mem {
	struct vdesc desc[QMAX] __attribute__((aligned(4096)));
	struct vavail avail __attribute__((aligned(4096)));
	struct vused used __attribute__((aligned(4096)));
	struct vdesc ind[QMAX][IND_MAX] __attribute__((aligned(4096)));
	struct blk_hdr hdr[QMAX] __attribute__((aligned(4096)));
	u8 status[QMAX];
};

_Static_assert(sizeof(struct vdesc) == 16, "vdesc");
_Static_assert(__builtin_offsetof(struct vq_mem, avail) == 0x1000, "avail");
_Static_assert(__builtin_offsetof(struct vq_mem, used) == 0x2000, "used");

/* Not zeroed at boot: the driver writes every field the device reads. */
static struct vq_mem vqm[OPEN_MAX] __attribute__((section(".bss.noinit"), aligned(4096)));
static u8 blk_buf[BUF_SIZE] __attribute__((section(".bss.noinit"), aligned(4096)));

/* ---- driver state ---- */
struct blkdev {
	u32 index;		/* position among the virtio_mmio.device= words */
	u64 base, size;
	u32 irq;
	u64 offered, accepted, capacity;
	u32 qmax, qsize, nslots;
	int evidx, indirect, noirq, ro;
	volatile struct vq_mem *m;
	u16 avail_idx, kicked, last_used;
	u64 kicks;
};

static u64 timeout_ms;

#define BARRIER()	__asm__ volatile("" : : : "memory")
/* full fence (store -> load): a locked instruction, which KVM's emulator has */
#define FENCE()		__asm__ volatile("lock addl $0, (%%rsp)" : : : "memory", "cc")

static u32 rd(const struct blkdev *d, u32 off)
{
	return mmio_read32(d->base + off);
}

static void wr(const struct blkdev *d, u32 off, u32 v)
{
	mmio_write32(d->base + off, v);
}

/* ---- bounded waits: "at least ms" by the TSC (10 GHz bound) and by iterations ---- */
struct wait {
	u64 start, limit, iters, max_iters;
};

static void wait_init(struct wait *w, u64 ms)
{
	w->start = rdtsc();
	w->limit = ms * 10000000ULL;	/* TSC ticks at 10 GHz */
	w->iters = 0;
	w->max_iters = ms * 1000000ULL;	/* no iteration takes less than 1 ns */
}

static int wait_expired(struct wait *w)
{
	u64 now;
	cpu_relax();
	if (++w->iters >= w->max_iters)
		return 1;
	now = rdtsc();
	if (now < w->start)	/* TSC went backwards (restore): start over */
		w->start = now;
	return now - w->start >= w->limit;
}

/* ---- output helpers ---- */
static void put_hex(u64 v, int digits)
{
	while (digits-- > 0)
		mg_putc("0123456789abcdef"[(v >> (4 * digits)) & 0xf]);
}

/* unaligned 64-bit access (x86 allows it; fewer emulated instructions than bytes) */
typedef u64 u64u __attribute__((aligned(1), may_alias));

/* 32-bit FNV-1a; one load per 8 bytes (every instruction costs ~0.7 us on PVM hosts) */
static u32 fnv1a(const u8 *p, u64 n)
{
	u32 h = 0x811c9dc5u;
	u64 i = 0;
	for (; i + 8 <= n; i += 8) {
		u64 w = *(const u64u *)(p + i);
#pragma GCC unroll 8
		for (int b = 0; b < 8; b++, w >>= 8) {
			h ^= (u8)w;
			h *= 0x01000193u;
		}
	}
	for (; i < n; i++) {
		h ^= p[i];
		h *= 0x01000193u;
	}
	return h;
}

/*
 * The write pattern (README): byte i of the request is
 * (seed*31 + i*7 + (i>>9)) & 0xff.  Within sector k (i>>9 = k, j = i & 511)
 * that is seed*31 + 7j + k, and as 7 * 183 = 1281 = 1 (mod 256) and 7 * 256
 * = 0 (mod 256), it equals ptab[j + (183k mod 256)] with ptab[x] =
 * seed*31 + 7x: each sector is a 512-byte window of one 768-byte table,
 * copied 8 bytes at a time.  invert: the complement (the verify scribble).
 */
static u8 ptab[768] __attribute__((section(".bss.noinit"), aligned(8)));	/* written before use */

static u8 pattern(u64 seed, u64 i)
{
	return (u8)(seed * 31 + i * 7 + (i >> 9));
}

static void pattern_table(u64 seed, int invert)
{
	for (u32 x = 0; x < sizeof(ptab); x++)
		ptab[x] = (u8)((seed * 31 + x * 7) ^ (invert ? 0xff : 0));
}

static const u8 *pattern_sector(u64 k)
{
	return ptab + ((183 * k) & 255);
}

static void pattern_fill(u8 *buf, u64 seed, u32 sectors, int invert)
{
	pattern_table(seed, invert);
	for (u32 k = 0; k < sectors; k++) {
		const u8 *src = pattern_sector(k);
		u64 *dst = (u64 *)(buf + (u64)k * SECTOR);
		for (u32 w = 0; w < SECTOR / 8; w++)
			dst[w] = *(const u64u *)(src + 8 * w);
	}
}

/* Offset of the first byte that differs from the pattern, or -1. */
static s64 pattern_check(const u8 *buf, u64 seed, u32 sectors)
{
	pattern_table(seed, 0);
	for (u32 k = 0; k < sectors; k++) {
		const u8 *src = pattern_sector(k);
		const u64 *p = (const u64 *)(buf + (u64)k * SECTOR);
		for (u32 w = 0; w < SECTOR / 8; w++)
			if (p[w] != *(const u64u *)(src + 8 * w))
				for (u32 b = 0; b < 8; b++) {
					u64 i = (u64)k * SECTOR + 8 * w + b;
					if (buf[i] != pattern(seed, i))
						return (s64)i;
				}
	}
	return -1;
}

/* ---- discovery: virtio_mmio.device=<size>@<base>:<irq>[:<id>] ---- */
static int parse_num(const char **pp, const char *end, u64 *out)
{
	const char *p = *pp;
	unsigned base = 10;
	u64 r = 0;
	int digits = 0;

	if (end - p > 2 && p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
		base = 16;
		p += 2;
	}
	for (; p < end; p++) {
		unsigned dg;
		if (*p >= '0' && *p <= '9')
			dg = (unsigned)(*p - '0');
		else if (base == 16 && *p >= 'a' && *p <= 'f')
			dg = (unsigned)(*p - 'a' + 10);
		else if (base == 16 && *p >= 'A' && *p <= 'F')
			dg = (unsigned)(*p - 'A' + 10);
		else
			break;
		if (r > (~0ULL - dg) / base)
			return -1;
		r = r * base + dg;
		digits++;
	}
	if (!digits)
		return -1;
	*pp = p;
	*out = r;
	return 0;
}

static u32 blk_count(void)
{
	u32 n = 0;
	while (mg_arg_nth("virtio_mmio.device", n, NULL))
		n++;
	return n;
}

static void blk_find(u32 index, struct blkdev *d)
{
	usize len;
	const char *w = mg_arg_nth("virtio_mmio.device", index, &len);
	const char *p = w, *end = w + len;
	u64 size, base, irq;

	if (!w)
		mg_error("blk dev=%u: no such virtio_mmio.device= word (%u found)", index,
			 blk_count());
	if (parse_num(&p, end, &size))
		goto bad;
	if (p < end && (*p == 'K' || *p == 'k'))
		size <<= 10, p++;
	else if (p < end && (*p == 'M' || *p == 'm'))
		size <<= 20, p++;
	else if (p < end && (*p == 'G' || *p == 'g'))
		size <<= 30, p++;
	if (p >= end || *p++ != '@' || parse_num(&p, end, &base))
		goto bad;
	if (p >= end || *p++ != ':' || parse_num(&p, end, &irq))
		goto bad;
	if (p < end && *p != ':')	/* an optional :<id> follows */
		goto bad;
	if (size < 0x200 || base & 3 || base >= 0x100000000ULL || size > 0x100000000ULL - base)
		mg_error("blk dev=%u: virtio_mmio.device=%.*s: too small, or not below 4 GiB",
			 index, (int)len, w);
	memset(d, 0, sizeof(*d));
	d->index = index;
	d->size = size;
	d->base = base;
	d->irq = (u32)irq;
	return;
bad:
	mg_error("blk dev=%u: bad virtio_mmio.device=%.*s", index, (int)len, w);
}

/* ---- transport ---- */
static u32 blk_status(const struct blkdev *d)
{
	return rd(d, VM_STATUS);
}

static void blk_reset(const struct blkdev *d)
{
	struct wait w;
	wr(d, VM_STATUS, 0);
	wait_init(&w, 100);
	while (rd(d, VM_STATUS) != 0)	/* the device may take a while */
		if (wait_expired(&w))
			mg_error("blk dev=%u: status stays 0x%x after reset", d->index,
				 rd(d, VM_STATUS));
}

static void blk_ack(const struct blkdev *d)
{
	u32 s = rd(d, VM_INT_STATUS);
	if (s)
		wr(d, VM_INT_ACK, s);
}

static u64 blk_config64(const struct blkdev *d, u32 off)
{
	u32 gen, lo, hi;
	for (int i = 0; i < 10; i++) {	/* 64-bit field: two 32-bit reads, same generation */
		gen = rd(d, VM_CONFIG_GEN);
		lo = rd(d, VM_CONFIG + off);
		hi = rd(d, VM_CONFIG + off + 4);
		if (rd(d, VM_CONFIG_GEN) == gen)
			break;
	}
	return ((u64)hi << 32) | lo;
}

/* used->ring[qsize], as a u16: the device's avail_event (EVENT_IDX) */
static volatile u16 *avail_event(const struct blkdev *d)
{
	return (volatile u16 *)((usize)&d->m->used.ring[d->qsize]);
}

static void set_used_event(struct blkdev *d)
{
	volatile struct vq_mem *m = d->m;
	if (d->evidx)	/* interrupt after the next completion, or (noirq) practically never */
		m->avail.ring[d->qsize] = (u16)(d->last_used + (d->noirq ? 0x8000 : 0));
}

/*
 * Device initialisation (virtio 1.x, 3.1.1).  desc_override != 0 (the
 * badqueue case) gives the device that descriptor table address instead of
 * ours.  Errors end the VM with MG-ERROR.
 */
static void blk_open(struct blkdev *d, volatile struct vq_mem *m, u64 desc_override)
{
	u32 v, lo, hi;
	u64 want, qsize_arg;
	volatile struct vavail *av = &m->avail;
	volatile struct vused *us = &m->used;

	d->m = m;
	if ((v = rd(d, VM_MAGIC)) != VIRTIO_MAGIC)
		mg_error("blk dev=%u: bad magic 0x%x at 0x%llx", d->index, v, d->base);
	if ((v = rd(d, VM_VERSION)) != 2)
		mg_error("blk dev=%u: virtio-mmio version %u, want 2", d->index, v);
	if ((v = rd(d, VM_DEVICE_ID)) != VIRTIO_ID_BLOCK)
		mg_error("blk dev=%u: device id %u, want 2 (block)", d->index, v);

	blk_reset(d);
	wr(d, VM_STATUS, ST_ACKNOWLEDGE);
	wr(d, VM_STATUS, ST_ACKNOWLEDGE | ST_DRIVER);

	wr(d, VM_DEV_FEATURES_SEL, 0);
	lo = rd(d, VM_DEV_FEATURES);
	wr(d, VM_DEV_FEATURES_SEL, 1);
	hi = rd(d, VM_DEV_FEATURES);
	d->offered = ((u64)hi << 32) | lo;
	if (!(d->offered & F_VERSION_1))
		mg_error("blk dev=%u: VIRTIO_F_VERSION_1 not offered (features 0x%llx)",
			 d->index, d->offered);
	want = F_VERSION_1 | F_RO | F_BLK_SIZE | F_FLUSH | F_SEG_MAX;
	if (mg_arg_u64("evidx", 0))
		want |= F_EVENT_IDX;
	if (mg_arg_u64("indirect", 0))
		want |= F_INDIRECT_DESC;
	d->accepted = d->offered & want;
	d->evidx = (d->accepted & F_EVENT_IDX) != 0;
	d->indirect = (d->accepted & F_INDIRECT_DESC) != 0;
	d->ro = (d->accepted & F_RO) != 0;
	d->noirq = mg_arg_u64("noirq", 0) != 0;
	wr(d, VM_DRV_FEATURES_SEL, 0);
	wr(d, VM_DRV_FEATURES, (u32)d->accepted);
	wr(d, VM_DRV_FEATURES_SEL, 1);
	wr(d, VM_DRV_FEATURES, (u32)(d->accepted >> 32));
	wr(d, VM_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK);
	if (!((v = blk_status(d)) & ST_FEATURES_OK))
		mg_error("blk dev=%u: FEATURES_OK did not stick (status 0x%x, features 0x%llx)",
			 d->index, v, d->accepted);

	wr(d, VM_QUEUE_SEL, 0);
	if (rd(d, VM_QUEUE_READY))
		mg_error("blk dev=%u: queue 0 ready before set-up", d->index);
	d->qmax = rd(d, VM_QUEUE_NUM_MAX);
	if (!d->qmax)
		mg_error("blk dev=%u: queue 0 not available (QueueNumMax 0)", d->index);
	qsize_arg = mg_arg_u64("qsize", 0);
	d->qsize = qsize_arg ? (u32)qsize_arg : (d->qmax < QDEFAULT ? d->qmax : QDEFAULT);
	if (qsize_arg > QMAX || (!qsize_arg && d->qsize > QMAX))
		mg_error("blk dev=%u: qsize %u above the guest's %u", d->index, d->qsize, QMAX);
	d->nslots = d->indirect ? d->qsize : d->qsize / 3;
	if (d->nslots == 0)
		mg_error("blk dev=%u: qsize %u too small for one request", d->index, d->qsize);
	wr(d, VM_QUEUE_NUM, d->qsize);

	/* what the device reads before we post anything */
	av->flags = d->noirq ? AVAIL_F_NO_INTERRUPT : 0;
	av->idx = 0;
	us->flags = 0;
	us->idx = 0;
	*avail_event(d) = 0;
	d->avail_idx = d->kicked = d->last_used = 0;
	d->kicks = 0;
	set_used_event(d);
	BARRIER();

	u64 desc = desc_override ? desc_override : (u64)(usize)m->desc;
	wr(d, VM_QUEUE_DESC_LO, (u32)desc);
	wr(d, VM_QUEUE_DESC_HI, (u32)(desc >> 32));
	wr(d, VM_QUEUE_AVAIL_LO, (u32)(usize)av);
	wr(d, VM_QUEUE_AVAIL_HI, (u32)((u64)(usize)av >> 32));
	wr(d, VM_QUEUE_USED_LO, (u32)(usize)us);
	wr(d, VM_QUEUE_USED_HI, (u32)((u64)(usize)us >> 32));
	wr(d, VM_QUEUE_READY, 1);

	d->capacity = blk_config64(d, 0);
	wr(d, VM_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
}

/* ---- requests ---- */
static void blk_post_head(struct blkdev *d, u16 head)
{
	volatile struct vq_mem *m = d->m;
	m->avail.ring[d->avail_idx % d->qsize] = head;
	BARRIER();	/* x86 keeps stores in order; the compiler must too */
	d->avail_idx++;
	m->avail.idx = d->avail_idx;
}

static void put_desc(volatile struct vdesc *t, u64 addr, u32 len, u16 flags, u16 next)
{
	t->addr = addr;
	t->len = len;
	t->flags = flags;
	t->next = next;
}

/*
 * Post one request in slot s: header, optional data buffer, status byte.
 * Direct: descriptors 3s..3s+2.  Indirect: descriptor s -> table ind[s].
 */
static void blk_post(struct blkdev *d, u32 s, u32 type, u64 sector, u64 buf, u32 len)
{
	volatile struct vq_mem *m = d->m;
	volatile struct vdesc *t = d->indirect ? m->ind[s] : &m->desc[3 * s];
	u16 first = d->indirect ? 0 : (u16)(3 * s), n = 0;

	m->hdr[s].type = type;
	m->hdr[s].reserved = 0;
	m->hdr[s].sector = sector;
	m->status[s] = S_NONE;
	put_desc(&t[n], (u64)(usize)&m->hdr[s], sizeof(struct blk_hdr), D_NEXT, first + 1);
	n++;
	if (len) {
		put_desc(&t[n], buf, len, D_NEXT | (type == T_OUT ? 0 : D_WRITE), first + n + 1);
		n++;
	}
	put_desc(&t[n], (u64)(usize)&m->status[s], 1, D_WRITE, 0);
	n++;
	if (d->indirect) {
		put_desc(&m->desc[s], (u64)(usize)t, n * sizeof(struct vdesc), D_INDIRECT, 0);
		blk_post_head(d, (u16)s);
	} else {
		blk_post_head(d, first);
	}
}

/* Notify unless the device said it does not need it (EVENT_IDX or NO_NOTIFY). */
static void blk_kick(struct blkdev *d, int always)
{
	volatile struct vq_mem *m = d->m;
	u16 nw = d->avail_idx, old = d->kicked;
	int need;

	if (nw == old && !always)
		return;
	FENCE();	/* avail->idx visible before we read the device's hint */
	if (d->evidx) {
		u16 ev = *avail_event(d);
		need = (u16)(nw - ev - 1) < (u16)(nw - old);
	} else {
		need = !(m->used.flags & USED_F_NO_NOTIFY);
	}
	d->kicked = nw;
	if (need || always) {
		wr(d, VM_QUEUE_NOTIFY, 0);
		d->kicks++;
	}
}

/* Wait until used->idx moves past last_used: 1 = it did, 0 = timeout or NEEDS_RESET. */
static int blk_wait_used(struct blkdev *d, u64 ms, u32 status_every)
{
	volatile struct vq_mem *m = d->m;
	struct wait w;
	wait_init(&w, ms);
	for (u32 i = 1;; i++) {
		if (m->used.idx != d->last_used)
			return 1;
		if (i % status_every == 0 && (blk_status(d) & ST_NEEDS_RESET))
			return m->used.idx != d->last_used;
		if (wait_expired(&w))
			return 0;
	}
}

/* Slot of a used element's id (a head we posted), or -1 when the device made it up. */
static int slot_of(const struct blkdev *d, u32 id)
{
	if (d->indirect)
		return id < d->nslots ? (int)id : -1;
	return id % 3 == 0 && id / 3 < d->nslots ? (int)(id / 3) : -1;
}

/* A request never completed: a timeout, or the device stopped (NEEDS_RESET). */
MG_NORETURN static void blk_timeout(const struct blkdev *d, const char *what)
{
	u32 st = blk_status(d);
	mg_error("blk %s dev=%u %s used=%u avail=%u status=0x%x",
		 st & ST_NEEDS_RESET ? "needs-reset" : "timeout", d->index, what,
		 d->m->used.idx, d->avail_idx, st);
}

/* One request in slot 0, synchronously; returns its status byte. */
static u8 blk_sync(struct blkdev *d, u32 type, u64 sector, void *buf, u32 len)
{
	volatile struct vq_mem *m = d->m;
	blk_post(d, 0, type, sector, (u64)(usize)buf, len);
	blk_kick(d, 0);
	if (!blk_wait_used(d, timeout_ms, 4096))
		blk_timeout(d, type == T_IN ? "read" : type == T_OUT ? "write" :
			       type == T_FLUSH ? "flush" : "getid");
	while (d->last_used != m->used.idx) {
		u32 id = m->used.ring[d->last_used % d->qsize].id;
		d->last_used++;
		if (slot_of(d, id) != 0)
			mg_error("blk dev=%u: used id %u is not the head we posted", d->index, id);
	}
	set_used_event(d);
	if (!d->noirq)
		blk_ack(d);
	return m->status[0];
}

/* ---- ops ---- */
static void print_info(const struct blkdev *d)
{
	mg_printf("MG-BLK dev=%u capacity=%llu features=0x%llx ro=%u qmax=%u\n", d->index,
		  d->capacity, d->accepted, d->ro, d->qmax);
}

static u32 sectors_arg(void)
{
	u64 count = mg_arg_u64("count", 1);
	if (count == 0 || count > BUF_SIZE / SECTOR)
		mg_error("blk count=%llu: 1..%u sectors", count, BUF_SIZE / SECTOR);
	return (u32)count;
}

static void do_read(struct blkdev *d, u64 sector, u32 count)
{
	u32 len = count * SECTOR;
	u8 st = blk_sync(d, T_IN, sector, blk_buf, len);

	mg_printf("MG-BLK-READ sector=%llu status=%u sum=", sector, st);
	if (st == 0) {
		put_hex(fnv1a(blk_buf, len), 8);
		mg_puts(" first=");
		for (u32 i = 0; i < 16 && i < len; i++)
			put_hex(blk_buf[i], 2);
		mg_putc('\n');
	} else {
		mg_puts("none first=none\n");
	}
}

static void op_write(struct blkdev *d)
{
	u64 sector = mg_arg_u64("sector", 0), seed = mg_arg_u64("seed", 0);
	u32 count = sectors_arg(), len = count * SECTOR;
	u8 st;

	pattern_fill(blk_buf, seed, count, 0);
	st = blk_sync(d, T_OUT, sector, blk_buf, len);
	mg_printf("MG-BLK-WRITE sector=%llu status=%u\n", sector, st);
	if (!mg_arg_u64("verify", 0))
		return;
	if (st != 0) {
		mg_printf("MG-BLK-VERIFY bad write-status=%u\n", st);
		return;
	}
	pattern_fill(blk_buf, seed, count, 1);	/* scribble: a read that moves nothing fails */
	st = blk_sync(d, T_IN, sector, blk_buf, len);
	if (st != 0) {
		mg_printf("MG-BLK-VERIFY bad read-status=%u\n", st);
		return;
	}
	s64 bad = pattern_check(blk_buf, seed, count);
	if (bad >= 0) {
		mg_printf("MG-BLK-VERIFY bad offset=%lld\n", bad);
		return;
	}
	mg_puts("MG-BLK-VERIFY ok\n");
}

/* Read sector S.. and check the write pattern of seed X (written by op=write or the host). */
static void op_verify(struct blkdev *d)
{
	u64 sector = mg_arg_u64("sector", 0), seed = mg_arg_u64("seed", 0);
	u32 count = sectors_arg();
	u8 st;
	s64 bad;

	pattern_fill(blk_buf, seed, count, 1);
	st = blk_sync(d, T_IN, sector, blk_buf, count * SECTOR);
	if (st != 0)
		mg_printf("MG-BLK-VERIFY bad read-status=%u\n", st);
	else if ((bad = pattern_check(blk_buf, seed, count)) >= 0)
		mg_printf("MG-BLK-VERIFY bad offset=%lld\n", bad);
	else
		mg_puts("MG-BLK-VERIFY ok\n");
}

static void op_getid(struct blkdev *d)
{
	u8 st;
	char id[ID_BYTES + 1];

	for (u32 i = 0; i < ID_BYTES; i++)
		blk_buf[i] = 0;
	st = blk_sync(d, T_GET_ID, 0, blk_buf, ID_BYTES);
	for (u32 i = 0; i <= ID_BYTES; i++) {
		u8 c = i < ID_BYTES ? blk_buf[i] : 0;
		id[i] = (char)(c == 0 ? 0 : (c > ' ' && c <= '~') ? c : '?');
		if (!c)
			break;
	}
	mg_printf("MG-BLK-ID %s status=%u\n", st == 0 ? id : "", st);
}

/* xorshift64* */
static u64 rnd_state;
static u64 rnd(void)
{
	rnd_state ^= rnd_state >> 12;
	rnd_state ^= rnd_state << 25;
	rnd_state ^= rnd_state >> 27;
	return rnd_state * 0x2545f4914f6cdd1dULL;
}

/*
 * n requests, at most qd in flight.  Random bs-aligned positions (seq=1:
 * sequential from sector 0, wrapping), rw=read|write|mixed.  Data buffers:
 * slot i uses blk_buf + i*bs when qd*bs fits in the buffer, else all share
 * it.  Written data is whatever the buffer holds.
 */
static void op_multi(struct blkdev *d)
{
	volatile struct vq_mem *m = d->m;
	int seq = mg_arg_u64("seq", 0) != 0;
	u64 n = mg_arg_u64("n", 1000), qd = mg_arg_u64("qd", 1);
	u64 bs = mg_arg_u64("bs", seq ? BUF_SIZE : 4096);
	int rw = mg_arg_is("rw", "write") ? 1 : mg_arg_is("rw", "mixed") ? 2 : 0;
	u64 nblocks, next_seq = 0, submitted = 0, done = 0, ok = 0, errors = 0;
	u32 freel[QMAX], nfree = 0;
	u64 t0, t1;

	if (mg_arg("rw", NULL) && !rw && !mg_arg_is("rw", "read"))
		mg_error("blk rw= read|write|mixed");
	if (bs == 0 || bs % SECTOR || bs > BUF_SIZE)
		mg_error("blk bs=%llu: a multiple of 512 up to %u", bs, BUF_SIZE);
	if (qd == 0 || qd > d->nslots)
		mg_error("blk qd=%llu: 1..%u for qsize %u%s", qd, d->nslots, d->qsize,
			 d->indirect ? " (indirect)" : " (3 descriptors a request)");
	nblocks = d->capacity / (bs / SECTOR);
	if (nblocks == 0)
		mg_error("blk capacity %llu sectors below bs=%llu", d->capacity, bs);
	rnd_state = mg_arg_u64("seed", 1) | 1;
	for (u32 i = (u32)qd; i-- > 0;)
		freel[nfree++] = i;
	MB->progress = 0;

	t0 = rdtsc();
	while (done < n) {
		while (submitted < n && nfree) {
			u32 s = freel[--nfree];
			u64 r = rnd(), blk;
			if (seq) {
				blk = next_seq;
				next_seq = next_seq + 1 < nblocks ? next_seq + 1 : 0;
			} else {
				blk = r % nblocks;
			}
			u32 type = rw == 0 ? T_IN : rw == 1 ? T_OUT : ((r >> 63) ? T_OUT : T_IN);
			u8 *buf = qd * bs <= BUF_SIZE ? blk_buf + s * bs : blk_buf;
			blk_post(d, s, type, blk * (bs / SECTOR), (u64)(usize)buf, (u32)bs);
			submitted++;
		}
		blk_kick(d, 0);
		if (!blk_wait_used(d, timeout_ms, 4096))
			blk_timeout(d, "multi");
		u16 idx = m->used.idx;
		while (d->last_used != idx) {
			u32 id = m->used.ring[d->last_used % d->qsize].id;
			int s = slot_of(d, id);
			d->last_used++;
			if (s < 0 || s >= (int)qd)
				mg_error("blk dev=%u: used id %u is not a head we posted", d->index, id);
			if (m->status[s] == 0)
				ok++;
			else
				errors++;
			freel[nfree++] = (u32)s;
			done++;
		}
		MB->progress = done;
		set_used_event(d);
		if (!d->noirq)
			blk_ack(d);
	}
	t1 = rdtsc();
	mg_printf("MG-BLK-MULTI n=%llu ok=%llu errors=%llu tsc=%llu\n", n, ok, errors, t1 - t0);
}

/*
 * Hostile requests: one malformed request (or ring), then observe.  The
 * status byte starts as 0xff; result=none when used->idx never moved.
 */
static void op_hostile(struct blkdev *d, volatile struct vq_mem *mem)
{
	usize clen;
	const char *c = mg_arg("case", &clen);
	u64 ms = mg_arg_u64("timeout_ms", 500);
	int badqueue = mg_arg_is("case", "badqueue");
	u16 used;
	u32 st;
	int moved;

	if (!c)
		mg_error("blk op=hostile needs case=");
	blk_open(d, mem, badqueue ? HOSTILE_ADDR : 0);
	volatile struct vq_mem *m = d->m;
	u64 hdr = (u64)(usize)&m->hdr[0], status = (u64)(usize)&m->status[0];
	u64 buf = (u64)(usize)blk_buf;

	m->hdr[0].type = T_IN;
	m->hdr[0].reserved = 0;
	m->hdr[0].sector = 0;
	m->status[0] = S_NONE;
	if (mg_arg_is("case", "badaddr") || mg_arg_is("case", "overflow")) {
		int of = mg_arg_is("case", "overflow");
		put_desc(&m->desc[0], hdr, 16, D_NEXT, 1);
		put_desc(&m->desc[1], of ? 0xfffffffffffff000ULL : HOSTILE_ADDR,
			 of ? 0x2000 : SECTOR, D_NEXT | D_WRITE, 2);
		put_desc(&m->desc[2], status, 1, D_WRITE, 0);
		blk_post_head(d, 0);
	} else if (mg_arg_is("case", "loop")) {
		put_desc(&m->desc[0], hdr, 16, D_NEXT, 0);	/* next = itself */
		blk_post_head(d, 0);
	} else if (mg_arg_is("case", "longchain")) {
		for (u32 i = 0; i < d->qsize; i++)	/* a ring: qsize NEXT descriptors */
			put_desc(&m->desc[i], hdr, 16, D_NEXT, (u16)((i + 1) % d->qsize));
		blk_post_head(d, 0);
	} else if (badqueue) {
		blk_post_head(d, 0);	/* the table lives at HOSTILE_ADDR */
	} else if (mg_arg_is("case", "badhead")) {
		put_desc(&m->desc[0], hdr, 16, D_NEXT, 1);
		put_desc(&m->desc[1], status, 1, D_WRITE, 0);
		blk_post_head(d, (u16)d->qsize);	/* head >= queue size */
	} else if (mg_arg_is("case", "badind") || mg_arg_is("case", "nestind")) {
		/* badind: table length 24, not a multiple of 16; nestind: an
		 * INDIRECT descriptor inside an indirect table */
		int nest = mg_arg_is("case", "nestind");
		volatile struct vdesc *t = m->ind[0];
		put_desc(&t[0], hdr, 16, D_NEXT, 1);
		if (nest)
			put_desc(&t[1], (u64)(usize)m->ind[1], 16, D_INDIRECT, 0);
		else
			put_desc(&t[1], status, 1, D_WRITE, 0);
		put_desc(&m->desc[0], (u64)(usize)t, nest ? 32 : 24, D_INDIRECT, 0);
		put_desc(&m->ind[1][0], status, 1, D_WRITE, 0);
		blk_post_head(d, 0);
	} else if (mg_arg_is("case", "rowrite")) {
		/* read sector S, write it back unchanged: harmless on a writable drive */
		u64 sector = mg_arg_u64("sector", 0);
		u8 rs = blk_sync(d, T_IN, sector, blk_buf, SECTOR);
		if (rs != 0)
			mg_printf("MG-BLK-HOSTILE rowrite: read of sector %llu gave status %u\n",
				  sector, rs);
		blk_post(d, 0, T_OUT, sector, buf, SECTOR);
	} else if (mg_arg_is("case", "beyond") || mg_arg_is("case", "wrapsector")) {
		/* beyond: one sector at capacity; wrapsector: sector*512 wraps to 0 */
		u64 sector = mg_arg_is("case", "beyond") ? d->capacity : 1ULL << 55;
		blk_post(d, 0, T_IN, sector, buf, SECTOR);
	} else {
		mg_error("blk unknown case=%.*s", (int)clen, c);
	}
	blk_kick(d, 1);
	moved = blk_wait_used(d, ms, 64);
	st = blk_status(d);
	used = m->used.idx;
	blk_ack(d);
	mg_printf("MG-BLK-HOSTILE case=%.*s status=0x%x used=%u result=", (int)clen, c, st, used);
	if (moved)
		mg_printf("%u\n", m->status[0]);
	else
		mg_puts("none\n");

	if (!mg_arg_u64("recover", 1))
		return;
	/* reset, set the device up again, read sector 0 */
	blk_open(d, mem, 0);
	blk_post(d, 0, T_IN, 0, buf, SECTOR);
	blk_kick(d, 0);
	moved = blk_wait_used(d, ms, 64);
	st = blk_status(d);
	blk_ack(d);
	mg_printf("MG-BLK-RECOVER status=0x%x result=", st);
	if (moved)
		mg_printf("%u\n", m->status[0]);
	else
		mg_puts("none\n");
}

void mode_blk(void)
{
	usize len;
	const char *op = mg_arg("op", &len);
	struct blkdev d, d1;

	timeout_ms = mg_arg_u64("timeout_ms", 2000);
	if (!op || mg_arg_is("op", "info")) {
		blk_find((u32)mg_arg_u64("dev", 0), &d);
		blk_open(&d, &vqm[0], 0);
		print_info(&d);
	} else if (mg_arg_is("op", "read")) {
		blk_find((u32)mg_arg_u64("dev", 0), &d);
		blk_open(&d, &vqm[0], 0);
		do_read(&d, mg_arg_u64("sector", 0), sectors_arg());
	} else if (mg_arg_is("op", "write")) {
		blk_find((u32)mg_arg_u64("dev", 0), &d);
		blk_open(&d, &vqm[0], 0);
		op_write(&d);
	} else if (mg_arg_is("op", "verify")) {
		blk_find((u32)mg_arg_u64("dev", 0), &d);
		blk_open(&d, &vqm[0], 0);
		op_verify(&d);
	} else if (mg_arg_is("op", "flush")) {
		blk_find((u32)mg_arg_u64("dev", 0), &d);
		blk_open(&d, &vqm[0], 0);
		mg_printf("MG-BLK-FLUSH status=%u\n", blk_sync(&d, T_FLUSH, 0, NULL, 0));
	} else if (mg_arg_is("op", "getid")) {
		blk_find((u32)mg_arg_u64("dev", 0), &d);
		blk_open(&d, &vqm[0], 0);
		op_getid(&d);
	} else if (mg_arg_is("op", "twodev")) {
		u64 sector = mg_arg_u64("sector", 0);
		u32 count = sectors_arg();
		blk_find(0, &d);
		blk_find(1, &d1);
		blk_open(&d, &vqm[0], 0);
		blk_open(&d1, &vqm[1], 0);
		print_info(&d);
		do_read(&d, sector, count);
		print_info(&d1);
		do_read(&d1, sector, count);
	} else if (mg_arg_is("op", "multi")) {
		blk_find((u32)mg_arg_u64("dev", 0), &d);
		blk_open(&d, &vqm[0], 0);
		op_multi(&d);
	} else if (mg_arg_is("op", "hostile")) {
		blk_find((u32)mg_arg_u64("dev", 0), &d);
		op_hostile(&d, &vqm[0]);
	} else {
		mg_error("blk unknown op=%.*s", (int)len, op);
	}
	mg_puts("MG-DONE\n");
}
