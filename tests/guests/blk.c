/*
 * blk.c - a minimal virtio-blk driver for the micro-guest, over the shared
 * virtio-mmio (version 2) transport in virtio.c, and the mg=blk mode.
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
#include "virtio.h"

#define F_SEG_MAX		(1ULL << 2)
#define F_RO			(1ULL << 5)
#define F_BLK_SIZE		(1ULL << 6)
#define F_FLUSH			(1ULL << 9)

#define T_IN			0
#define T_OUT			1
#define T_FLUSH			4
#define T_GET_ID		8
#define S_NONE			0xff	/* status byte sentinel: the device never wrote it */

#define SECTOR			512
#define ID_BYTES		20

#define QMAX			VQ_MAX		/* largest queue the guest has memory for */
#define QDEFAULT		64
#define OPEN_MAX		2		/* devices open at once (twodev) */
#define BUF_SIZE		VIRTIO_BUF_SIZE	/* data buffer: 2048 sectors */
#define IND_MAX			4		/* descriptors per indirect table */

/* ---- ring memory (one per open device), all guest-owned ---- */
struct blk_hdr {
	u32 type;
	u32 reserved;
	u64 sector;
};

struct vq_mem {
	struct vring r;		/* desc +0, avail +0x1000, used +0x2000 */
	struct vdesc ind[QMAX][IND_MAX] __attribute__((aligned(4096)));
	struct blk_hdr hdr[QMAX] __attribute__((aligned(4096)));
	u8 status[QMAX];
};

_Static_assert(__builtin_offsetof(struct vq_mem, ind) == 0x3000, "ind");
_Static_assert(__builtin_offsetof(struct vq_mem, hdr) == 0x7000, "hdr");
_Static_assert(__builtin_offsetof(struct vq_mem, status) == 0x8000, "status");

/* Not zeroed at boot: the driver writes every field the device reads. */
static struct vq_mem vqm[OPEN_MAX] __attribute__((section(".bss.noinit"), aligned(4096)));
#define blk_buf virtio_buf	/* the shared 1 MiB data buffer */

/* ---- driver state ---- */
struct blkdev {
	struct vdev v;		/* v.index: position among the virtio_mmio.device= words */
	struct vq q;		/* queue 0 */
	u64 capacity;
	u32 nslots;
	int indirect, noirq, ro;
	volatile struct vq_mem *m;
};

static u64 timeout_ms;
static int want_noirq;

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

/* ---- discovery and set-up ---- */
static void blk_find(u32 index, struct blkdev *d)
{
	memset(d, 0, sizeof(*d));
	vio_find(&d->v, "blk", index, index);
}

/* read once the device's features are known, as before the transport was shared */
static u64 blk_want(void)
{
	u64 want = F_RO | F_BLK_SIZE | F_FLUSH | F_SEG_MAX;
	if (mg_arg_u64("evidx", 0))
		want |= F_EVENT_IDX;
	if (mg_arg_u64("indirect", 0))
		want |= F_INDIRECT_DESC;
	want_noirq = mg_arg_u64("noirq", 0) != 0;
	return want;
}

/*
 * Device initialisation (virtio 1.x, 3.1.1).  desc_override != 0 (the
 * badqueue case) gives the device that descriptor table address instead of
 * ours.  Errors end the VM with MG-ERROR.
 */
static void blk_open(struct blkdev *d, volatile struct vq_mem *m, u64 desc_override)
{
	d->m = m;
	vio_begin(&d->v, VIRTIO_ID_BLOCK, "block", blk_want);
	d->indirect = (d->v.accepted & F_INDIRECT_DESC) != 0;
	d->ro = (d->v.accepted & F_RO) != 0;
	d->noirq = want_noirq;

	vio_queue_size(&d->q, &d->v, 0, QDEFAULT, d->noirq);
	d->nslots = d->indirect ? d->q.qsize : d->q.qsize / 3;
	if (d->nslots == 0)
		mg_error("blk dev=%u: qsize %u too small for one request", d->v.index, d->q.qsize);
	vio_queue_setup(&d->q, &m->r, desc_override);

	d->capacity = vio_config64(&d->v, 0);
	vio_driver_ok(&d->v);
}

/* ---- requests ---- */
/*
 * Post one request in slot s: header, optional data buffer, status byte.
 * Direct: descriptors 3s..3s+2.  Indirect: descriptor s -> table ind[s].
 */
static void blk_post(struct blkdev *d, u32 s, u32 type, u64 sector, u64 buf, u32 len)
{
	volatile struct vq_mem *m = d->m;
	volatile struct vdesc *t = d->indirect ? m->ind[s] : &m->r.desc[3 * s];
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
		put_desc(&m->r.desc[s], (u64)(usize)t, n * sizeof(struct vdesc), D_INDIRECT, 0);
		vq_post_head(&d->q, (u16)s);
	} else {
		vq_post_head(&d->q, first);
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
	u32 st = vio_status(&d->v);
	mg_error("blk %s dev=%u %s used=%u avail=%u status=0x%x",
		 st & ST_NEEDS_RESET ? "needs-reset" : "timeout", d->v.index, what,
		 d->m->r.used.idx, d->q.avail_idx, st);
}

/* One request in slot 0, synchronously; returns its status byte. */
static u8 blk_sync(struct blkdev *d, u32 type, u64 sector, void *buf, u32 len)
{
	volatile struct vq_mem *m = d->m;
	blk_post(d, 0, type, sector, (u64)(usize)buf, len);
	vq_kick(&d->q, 0);
	if (!vq_wait_used(&d->q, timeout_ms, 4096))
		blk_timeout(d, type == T_IN ? "read" : type == T_OUT ? "write" :
			       type == T_FLUSH ? "flush" : "getid");
	while (d->q.last_used != m->r.used.idx) {
		u32 id = m->r.used.ring[d->q.last_used % d->q.qsize].id;
		d->q.last_used++;
		if (slot_of(d, id) != 0)
			mg_error("blk dev=%u: used id %u is not the head we posted", d->v.index, id);
	}
	vq_set_used_event(&d->q);
	if (!d->noirq)
		vio_ack(&d->v);
	return m->status[0];
}

/* ---- ops ---- */
static void print_info(const struct blkdev *d)
{
	mg_printf("MG-BLK dev=%u capacity=%llu features=0x%llx ro=%u qmax=%u\n", d->v.index,
		  d->capacity, d->v.accepted, d->ro, d->q.qmax);
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
		put_hex(fnv1a_update(FNV1A_INIT, blk_buf, len), 8);
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
		mg_error("blk qd=%llu: 1..%u for qsize %u%s", qd, d->nslots, d->q.qsize,
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
		vq_kick(&d->q, 0);
		if (!vq_wait_used(&d->q, timeout_ms, 4096))
			blk_timeout(d, "multi");
		u16 idx = m->r.used.idx;
		while (d->q.last_used != idx) {
			u32 id = m->r.used.ring[d->q.last_used % d->q.qsize].id;
			int s = slot_of(d, id);
			d->q.last_used++;
			if (s < 0 || s >= (int)qd)
				mg_error("blk dev=%u: used id %u is not a head we posted", d->v.index, id);
			if (m->status[s] == 0)
				ok++;
			else
				errors++;
			freel[nfree++] = (u32)s;
			done++;
		}
		MB->progress = done;
		vq_set_used_event(&d->q);
		if (!d->noirq)
			vio_ack(&d->v);
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
		put_desc(&m->r.desc[0], hdr, 16, D_NEXT, 1);
		put_desc(&m->r.desc[1], of ? 0xfffffffffffff000ULL : HOSTILE_ADDR,
			 of ? 0x2000 : SECTOR, D_NEXT | D_WRITE, 2);
		put_desc(&m->r.desc[2], status, 1, D_WRITE, 0);
		vq_post_head(&d->q, 0);
	} else if (mg_arg_is("case", "loop")) {
		put_desc(&m->r.desc[0], hdr, 16, D_NEXT, 0);	/* next = itself */
		vq_post_head(&d->q, 0);
	} else if (mg_arg_is("case", "longchain")) {
		for (u32 i = 0; i < d->q.qsize; i++)	/* a ring: qsize NEXT descriptors */
			put_desc(&m->r.desc[i], hdr, 16, D_NEXT, (u16)((i + 1) % d->q.qsize));
		vq_post_head(&d->q, 0);
	} else if (badqueue) {
		vq_post_head(&d->q, 0);	/* the table lives at HOSTILE_ADDR */
	} else if (mg_arg_is("case", "badhead")) {
		put_desc(&m->r.desc[0], hdr, 16, D_NEXT, 1);
		put_desc(&m->r.desc[1], status, 1, D_WRITE, 0);
		vq_post_head(&d->q, (u16)d->q.qsize);	/* head >= queue size */
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
		put_desc(&m->r.desc[0], (u64)(usize)t, nest ? 32 : 24, D_INDIRECT, 0);
		put_desc(&m->ind[1][0], status, 1, D_WRITE, 0);
		vq_post_head(&d->q, 0);
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
	vq_kick(&d->q, 1);
	moved = vq_wait_used(&d->q, ms, 64);
	st = vio_status(&d->v);
	used = m->r.used.idx;
	vio_ack(&d->v);
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
	vq_kick(&d->q, 0);
	moved = vq_wait_used(&d->q, ms, 64);
	st = vio_status(&d->v);
	vio_ack(&d->v);
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
