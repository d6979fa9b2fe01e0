/*
 * virtio.c - the micro-guest's minimal virtio-mmio (version 2) transport,
 * shared by blk.c and net.c.
 *
 * Devices come from the cmdline words virtio_mmio.device=<size>@<base>:<irq>
 * (in cmdline order).  Split virtqueues live in guest memory the driver
 * hands in (the image's .bss.noinit: not zeroed at boot, so the driver
 * initialises what the device reads).  Polling only: the guest watches
 * used->idx and acknowledges InterruptStatus after completions.  Every wait
 * is bounded (iterations and TSC).
 */
#include "virtio.h"

/* Not zeroed at boot: each mode writes what it uses before the device reads it. */
u8 virtio_buf[VIRTIO_BUF_SIZE] __attribute__((section(".bss.noinit"), aligned(4096)));

/* ---- bounded waits ---- */
u64 vio_wait_khz;	/* 0: bound by 10 GHz (at least ms on any TSC); else the measured rate */

void wait_init(struct wait *w, u64 ms)
{
	w->start = rdtsc();
	w->limit = ms * (vio_wait_khz ? vio_wait_khz : 10000000ULL);	/* TSC ticks */
	w->iters = 0;
	w->max_iters = ms * 1000000ULL;	/* no iteration takes less than 1 ns */
}

int wait_expired(struct wait *w)
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

/* ---- output and checksums ---- */
void put_hex(u64 v, int digits)
{
	while (digits-- > 0)
		mg_putc("0123456789abcdef"[(v >> (4 * digits)) & 0xf]);
}

/* 32-bit FNV-1a, continued from h; one load per 8 bytes (~0.7 us an instruction on PVM) */
u32 fnv1a_update(u32 h, const u8 *p, u64 n)
{
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

u32 vio_count(void)
{
	u32 n = 0;
	while (mg_arg_nth("virtio_mmio.device", n, NULL))
		n++;
	return n;
}

/* Parse the word-th device word into d; errors name the device as "<name> dev=<index>". */
void vio_find(struct vdev *d, const char *name, u32 index, u32 word)
{
	usize len;
	const char *w = mg_arg_nth("virtio_mmio.device", word, &len);
	const char *p = w, *end = w + len;
	u64 size, base, irq;

	if (!w)
		mg_error("%s dev=%u: no such virtio_mmio.device= word (%u found)", name, index,
			 vio_count());
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
		mg_error("%s dev=%u: virtio_mmio.device=%.*s: too small, or not below 4 GiB",
			 name, index, (int)len, w);
	memset(d, 0, sizeof(*d));
	d->name = name;
	d->index = index;
	d->word = word;
	d->size = size;
	d->base = base;
	d->irq = (u32)irq;
	return;
bad:
	mg_error("%s dev=%u: bad virtio_mmio.device=%.*s", name, index, (int)len, w);
}

/* Magic, Version, DeviceID: the DeviceID, or -1 when the window is no virtio-mmio device. */
int vio_probe_id(const struct vdev *d)
{
	if (vio_rd(d, VIRTIO_MMIO_MAGIC_VALUE) != VIRTIO_MMIO_MAGIC_VIRT ||
	    vio_rd(d, VIRTIO_MMIO_VERSION) == 0)
		return -1;
	return (int)vio_rd(d, VIRTIO_MMIO_DEVICE_ID);
}

/* ---- transport ---- */
void vio_reset(const struct vdev *d)
{
	struct wait w;
	vio_wr(d, VIRTIO_MMIO_STATUS, 0);
	wait_init(&w, 100);
	while (vio_rd(d, VIRTIO_MMIO_STATUS) != 0)	/* the device may take a while */
		if (wait_expired(&w))
			mg_error("%s dev=%u: status stays 0x%x after reset", d->name, d->index,
				 vio_rd(d, VIRTIO_MMIO_STATUS));
}

void vio_ack(const struct vdev *d)
{
	u32 s = vio_rd(d, VIRTIO_MMIO_INTERRUPT_STATUS);
	if (s)
		vio_wr(d, VIRTIO_MMIO_INTERRUPT_ACK, s);
}

/*
 * Device initialisation (virtio 1.x, 3.1.1) up to FEATURES_OK: check the
 * window, reset, ACKNOWLEDGE|DRIVER, accept offered & want() (VERSION_1
 * must be offered).  want() runs once the features are read: it may read
 * cmdline words, whose errors then come at the same point for every driver.
 * Errors end the VM with MG-ERROR.
 */
void vio_begin(struct vdev *d, u32 device_id, const char *id_name, u64 (*want)(void))
{
	u32 v, lo, hi;

	if ((v = vio_rd(d, VIRTIO_MMIO_MAGIC_VALUE)) != VIRTIO_MMIO_MAGIC_VIRT)
		mg_error("%s dev=%u: bad magic 0x%x at 0x%llx", d->name, d->index, v, d->base);
	if ((v = vio_rd(d, VIRTIO_MMIO_VERSION)) != VIRTIO_MMIO_VERSION_2)
		mg_error("%s dev=%u: virtio-mmio version %u, want 2", d->name, d->index, v);
	if ((v = vio_rd(d, VIRTIO_MMIO_DEVICE_ID)) != device_id)
		mg_error("%s dev=%u: device id %u, want %u (%s)", d->name, d->index, v, device_id,
			 id_name);

	vio_reset(d);
	vio_wr(d, VIRTIO_MMIO_STATUS, ST_ACKNOWLEDGE);
	vio_wr(d, VIRTIO_MMIO_STATUS, ST_ACKNOWLEDGE | ST_DRIVER);

	vio_wr(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	lo = vio_rd(d, VIRTIO_MMIO_DEVICE_FEATURES);
	vio_wr(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	hi = vio_rd(d, VIRTIO_MMIO_DEVICE_FEATURES);
	d->offered = ((u64)hi << 32) | lo;
	if (!(d->offered & F_VERSION_1))
		mg_error("%s dev=%u: VIRTIO_F_VERSION_1 not offered (features 0x%llx)",
			 d->name, d->index, d->offered);
	d->accepted = d->offered & (want() | F_VERSION_1);
	vio_wr(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	vio_wr(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)d->accepted);
	vio_wr(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	vio_wr(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)(d->accepted >> 32));
	vio_wr(d, VIRTIO_MMIO_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK);
	if (!((v = vio_status(d)) & ST_FEATURES_OK))
		mg_error("%s dev=%u: FEATURES_OK did not stick (status 0x%x, features 0x%llx)",
			 d->name, d->index, v, d->accepted);
}

/*
 * QueueSel = qi, check it is free, read QueueNumMax and choose the size:
 * qsize= as given (no power-of-two or QueueNumMax check, so a test can
 * probe the VMM), default min(QueueNumMax, qdefault).  Above the guest's
 * ring memory is an MG-ERROR.  noirq: ask for no interrupts (NO_INTERRUPT,
 * or a far used_event).  QueueSel stays on qi for vio_queue_setup.
 */
u32 vio_queue_size(struct vq *q, const struct vdev *d, u32 qi, u32 qdefault, int noirq)
{
	u64 qsize_arg;

	q->dev = d;
	q->qi = qi;
	q->evidx = (d->accepted & F_EVENT_IDX) != 0;
	q->noirq = noirq;
	vio_wr(d, VIRTIO_MMIO_QUEUE_SEL, qi);
	if (vio_rd(d, VIRTIO_MMIO_QUEUE_READY))
		mg_error("%s dev=%u: queue %u ready before set-up", d->name, d->index, qi);
	q->qmax = vio_rd(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
	if (!q->qmax)
		mg_error("%s dev=%u: queue %u not available (QueueNumMax 0)", d->name, d->index, qi);
	qsize_arg = mg_arg_u64("qsize", 0);
	q->qsize = qsize_arg ? (u32)qsize_arg : (q->qmax < qdefault ? q->qmax : qdefault);
	if (qsize_arg > VQ_MAX || (!qsize_arg && q->qsize > VQ_MAX))
		mg_error("%s dev=%u: qsize %u above the guest's %u", d->name, d->index, q->qsize,
			 VQ_MAX);
	return q->qsize;
}

/* used->ring[qsize], as a u16: the device's avail_event (EVENT_IDX) */
static volatile u16 *avail_event(const struct vq *q)
{
	return (volatile u16 *)((usize)&q->r->used.ring[q->qsize]);
}

void vq_set_used_event(struct vq *q)
{
	if (q->evidx)	/* interrupt after the next completion, or (noirq) practically never */
		q->r->avail.ring[q->qsize] = (u16)(q->last_used + (q->noirq ? 0x8000 : 0));
}

/*
 * QueueNum, the ring fields the device reads first, the ring addresses,
 * QueueReady = 1.  desc_override != 0 (a hostile case) gives the device
 * that descriptor table address instead of ours.
 */
void vio_queue_setup(struct vq *q, volatile struct vring *r, u64 desc_override)
{
	const struct vdev *d = q->dev;
	volatile struct vavail *av = &r->avail;
	volatile struct vused *us = &r->used;

	q->r = r;
	vio_wr(d, VIRTIO_MMIO_QUEUE_NUM, q->qsize);

	/* what the device reads before we post anything */
	av->flags = q->noirq ? AVAIL_F_NO_INTERRUPT : 0;
	av->idx = 0;
	us->flags = 0;
	us->idx = 0;
	*avail_event(q) = 0;
	q->avail_idx = q->kicked = q->last_used = 0;
	q->kicks = 0;
	vq_set_used_event(q);
	BARRIER();

	u64 desc = desc_override ? desc_override : (u64)(usize)r->desc;
	vio_wr(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)desc);
	vio_wr(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (u32)(desc >> 32));
	vio_wr(d, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (u32)(usize)av);
	vio_wr(d, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, (u32)((u64)(usize)av >> 32));
	vio_wr(d, VIRTIO_MMIO_QUEUE_USED_LOW, (u32)(usize)us);
	vio_wr(d, VIRTIO_MMIO_QUEUE_USED_HIGH, (u32)((u64)(usize)us >> 32));
	vio_wr(d, VIRTIO_MMIO_QUEUE_READY, 1);
}

void vio_driver_ok(const struct vdev *d)
{
	vio_wr(d, VIRTIO_MMIO_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
}

/* A 64-bit config field: two 32-bit reads between two equal ConfigGeneration reads. */
u64 vio_config64(const struct vdev *d, u32 off)
{
	u32 gen, lo, hi;
	for (int i = 0; i < 10; i++) {
		gen = vio_rd(d, VIRTIO_MMIO_CONFIG_GENERATION);
		lo = vio_rd(d, VIRTIO_MMIO_CONFIG + off);
		hi = vio_rd(d, VIRTIO_MMIO_CONFIG + off + 4);
		if (vio_rd(d, VIRTIO_MMIO_CONFIG_GENERATION) == gen)
			break;
	}
	return ((u64)hi << 32) | lo;
}

/* ---- virtqueue ---- */
void vq_post_head(struct vq *q, u16 head)
{
	volatile struct vring *r = q->r;
	r->avail.ring[q->avail_idx % q->qsize] = head;
	BARRIER();	/* x86 keeps stores in order; the compiler must too */
	q->avail_idx++;
	r->avail.idx = q->avail_idx;
}

/* Notify unless the device said it does not need it (EVENT_IDX or NO_NOTIFY). */
void vq_kick(struct vq *q, int always)
{
	volatile struct vring *r = q->r;
	u16 nw = q->avail_idx, old = q->kicked;
	int need;

	if (nw == old && !always)
		return;
	FENCE();	/* avail->idx visible before we read the device's hint */
	if (q->evidx) {
		u16 ev = *avail_event(q);
		need = (u16)(nw - ev - 1) < (u16)(nw - old);
	} else {
		need = !(r->used.flags & USED_F_NO_NOTIFY);
	}
	q->kicked = nw;
	if (need || always) {
		vio_wr(q->dev, VIRTIO_MMIO_QUEUE_NOTIFY, q->qi);
		q->kicks++;
	}
}

/*
 * Wait until used->idx moves past last_used: 1 = it did, 0 = timeout or
 * NEEDS_RESET (Status read every status_every iterations).
 */
int vq_wait_used(struct vq *q, u64 ms, u32 status_every)
{
	volatile struct vring *r = q->r;
	struct wait w;
	wait_init(&w, ms);
	for (u32 i = 1;; i++) {
		if (r->used.idx != q->last_used)
			return 1;
		if (i % status_every == 0 && (vio_status(q->dev) & ST_NEEDS_RESET))
			return r->used.idx != q->last_used;
		if (wait_expired(&w))
			return 0;
	}
}
