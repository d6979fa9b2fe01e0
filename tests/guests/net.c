/*
 * net.c - a minimal virtio-net driver for the micro-guest over the shared
 * virtio-mmio transport (virtio.c), and the mg=net mode.
 *
 * Queue 0 = RX, queue 1 = TX, polling only (interrupts stay off), no
 * offloads: the guest sends complete frames behind a zero header and looks
 * only at num_buffers on RX.  RX: descriptor i is buffer i for the whole
 * run (one device-writable descriptor, header at its start), so re-posting
 * a buffer is one avail entry.  TX: a chain of device-readable descriptors
 * from a free stack: the shared zero header, then the frame (echo: the RX
 * buffers themselves).  Every wait is bounded.  README.md ("mg=net") lists
 * the steps, the frame format, each op's output and the memory used.
 */
#include "virtio.h"

#define F_NET_MAC		(1ULL << 5)
#define F_NET_MRG_RXBUF		(1ULL << 15)
#define F_NET_STATUS		(1ULL << 16)

#define NET_HDR			12	/* virtio_net_hdr_v1: always 12 bytes with VERSION_1 */
#define HDR_NUM_BUFFERS		10	/* its u16 num_buffers */
#define FRAME_MIN		22	/* Ethernet header, seq, dev */
#define FRAME_MAX		1514
#define FRAME_DEFAULT		60
#define SLOT			1536	/* one TX frame buffer: FRAME_MAX + room for 8-byte copies */
#define TX_SLOTS		64	/* TX frame buffers per device (send, twodev, recover) */
#define BUF_DEFAULT		2048
#define BUF_MIN			64
#define BUF_MAX			65536
#define OPEN_MAX		2	/* devices open at once (twodev) */
#define PAT_SIZE		1760	/* 256 + FRAME_MAX - FRAME_MIN + 8, a multiple of 8 */

#define TAG_NONE		0xffff	/* a TX descriptor that owns nothing (the header) */
#define TAG_SLOT		0x8000	/* | slot: a TX frame buffer; below: an RX buffer (echo) */

typedef u32 u32u __attribute__((aligned(1), may_alias));
typedef u16 u16u __attribute__((aligned(1), may_alias));

/* ---- memory: rings per open device; frame buffers in virtio_buf ---- */
struct net_mem {
	struct vring rx;	/* +0x0000: queue 0 */
	struct vring tx;	/* +0x3000: queue 1 */
	u8 hdr[16] __attribute__((aligned(4096)));	/* +0x6000: every TX chain's zero header */
};

struct netdev {
	struct vdev v;		/* v.index: dev=, the n-th window whose DeviceID is 1 */
	struct vq rx, tx;
	volatile struct net_mem *m;
	u8 mac[6];
	int link;		/* config status, -1 when STATUS was not negotiated */
	int mrg;
	u32 bufsize, nrx;	/* RX buffers: descriptor i <-> buffer i, i < nrx */
	u32 txcap, nslots;	/* TX chains in flight at most (qsize/2); frame buffers */
	u8 *rxbuf, *txbuf;
	u32 inflight, nfree, nslot_free;
	u16 free_desc[VQ_MAX];	/* TX descriptors not in a chain */
	u16 tag[VQ_MAX];	/* per TX descriptor: what it points to (TAG_*) */
	u16 slot_free[TX_SLOTS];
	u8 busy[VQ_MAX];	/* TX heads in flight */
	u8 posted[VQ_MAX];	/* RX buffers the device owns */
};

/* one frame's RX buffers, as collected from the used ring */
struct rxframe {
	u32 nb, got, len;	/* buffers announced (num_buffers), collected; frame bytes */
	u16 id[VQ_MAX];
	u32 blen[VQ_MAX];	/* used len: the first buffer's includes the header */
};

/* Not zeroed at boot: net_open writes every field before it is used. */
static struct net_mem nvq[OPEN_MAX] __attribute__((section(".bss.noinit"), aligned(4096)));
static struct netdev nets[OPEN_MAX] __attribute__((section(".bss.noinit")));
static struct rxframe rxf[OPEN_MAX] __attribute__((section(".bss.noinit")));
static u8 pat[PAT_SIZE] __attribute__((section(".bss.noinit"), aligned(8)));
static u64 seg_addr[VQ_MAX] __attribute__((section(".bss.noinit")));
static u32 seg_len[VQ_MAX] __attribute__((section(".bss.noinit")));
static u16 seg_tag[VQ_MAX] __attribute__((section(".bss.noinit")));

static u8 dst_mac[6];
static u64 seed, timeout_ms;
static u32 bufsize, frame_size;

static u8 *rxbuf(const struct netdev *n, u32 id)
{
	return n->rxbuf + (u64)id * n->bufsize;
}

/* A queue never completed: a timeout, or the device stopped (NEEDS_RESET). */
MG_NORETURN static void net_stuck(const struct netdev *n, const struct vq *q, const char *what)
{
	u32 st = vio_status(&n->v);
	mg_error("net %s dev=%u %s queue=%u used=%u avail=%u status=0x%x",
		 st & ST_NEEDS_RESET ? "needs-reset" : "timeout", n->v.index, what, q->qi,
		 q->r->used.idx, q->avail_idx, st);
}

/* ---- frames: dst, src, 0x88b5, u32 seq, u32 dev, bytes (seed + seq + j) & 0xff ---- */
/* pat[x] = x & 0xff: a payload is the window at (seed + seq) & 0xff, copied 8 bytes at a time */
static void pat_fill(void)
{
	u64 *p = (u64 *)pat;
	for (u32 k = 0; k < PAT_SIZE / 8; k++)	/* no byte of a word wraps: no carries */
		p[k] = 0x0706050403020100ULL + (u64)(k & 31) * 0x0808080808080808ULL;
}

static void frame_head(const struct netdev *n, u8 *p)
{
	for (u32 i = 0; i < 6; i++) {
		p[i] = dst_mac[i];
		p[6 + i] = n->mac[i];
	}
	p[12] = 0x88;	/* ethertype 0x88b5 (local experimental), big endian */
	p[13] = 0xb5;
	*(u32u *)(p + 18) = n->v.index;
}

/* seq and payload; may write up to 7 bytes past the frame (the slot has room) */
static void frame_body(u8 *p, u32 seq, u32 size)
{
	const u8 *src = pat + ((seed + seq) & 0xff);
	*(u32u *)(p + 14) = seq;
	for (u32 j = 0; FRAME_MIN + j < size; j += 8)
		*(u64u *)(p + FRAME_MIN + j) = *(const u64u *)(src + j);
}

static void put_mac(const u8 *mac)
{
	for (u32 i = 0; i < 6; i++) {
		if (i)
			mg_putc(':');
		put_hex(mac[i], 2);
	}
}

/* dst=: 12 hex digits, ':' or '-' between them allowed */
static void parse_dst(void)
{
	usize len;
	const char *v = mg_arg("dst", &len);
	u8 mac[6] = { 0 };
	u32 nd = 0;

	for (u32 i = 0; i < 6; i++)
		dst_mac[i] = 0xff;
	if (!v)
		return;
	for (usize i = 0; i < len; i++) {
		char c = v[i];
		unsigned x = 16;
		if (c == ':' || c == '-')
			continue;
		if (c >= '0' && c <= '9')
			x = (unsigned)(c - '0');
		else if (c >= 'a' && c <= 'f')
			x = (unsigned)(c - 'a' + 10);
		else if (c >= 'A' && c <= 'F')
			x = (unsigned)(c - 'A' + 10);
		if (x > 15 || nd >= 12)
			mg_error("net dst=%.*s: want 12 hex digits", (int)len, v);
		mac[nd / 2] = (u8)(mac[nd / 2] << 4 | x);
		nd++;
	}
	if (nd != 12)
		mg_error("net dst=%.*s: want 12 hex digits", (int)len, v);
	for (u32 i = 0; i < 6; i++)
		dst_mac[i] = mac[i];
}

/* ---- discovery and set-up ---- */
/* The index-th window (cmdline order) whose Magic/Version/DeviceID say virtio-net. */
static void net_find(struct netdev *n, u32 index)
{
	u32 words = vio_count(), seen = 0;
	for (u32 w = 0; w < words; w++) {
		vio_find(&n->v, "net", index, w);
		if (vio_probe_id(&n->v) == VIRTIO_ID_NET && seen++ == index)
			return;
	}
	mg_error("net dev=%u: no such virtio-net device (%u virtio_mmio.device= words, %u net)",
		 index, words, seen);
}

static u64 net_want(void)
{
	u64 want = F_NET_MAC | F_NET_STATUS;
	if (mg_arg_u64("mrg", 0))
		want |= F_NET_MRG_RXBUF;
	if (mg_arg_u64("evidx", 0))
		want |= F_EVENT_IDX;
	return want;
}

/* MAC: six 8-bit reads at 0x100..0x105; status: one 16-bit read at 0x106 (4.2.2.2) */
static void net_config(struct netdev *n)
{
	const struct vdev *v = &n->v;
	/* no MAC feature: a fixed locally administered address, 02:6d:67:00:00:<dev> */
	static const u8 fallback[5] = { 0x02, 0x6d, 0x67, 0x00, 0x00 };

	for (u32 b = 0; b < 5; b++)
		n->mac[b] = fallback[b];
	n->mac[5] = (u8)v->index;
	n->link = -1;
	for (int i = 0; i < 10; i++) {	/* until ConfigGeneration is the same before and after */
		u32 gen = vio_rd(v, VIRTIO_MMIO_CONFIG_GENERATION);
		if (v->accepted & F_NET_MAC)
			for (u32 b = 0; b < 6; b++)
				n->mac[b] = vio_rd8(v, VIRTIO_MMIO_CONFIG + b);
		if (v->accepted & F_NET_STATUS)
			n->link = vio_rd16(v, VIRTIO_MMIO_CONFIG + 6);
		if (vio_rd(v, VIRTIO_MMIO_CONFIG_GENERATION) == gen)
			break;
	}
}

/* TX bookkeeping: every descriptor free, every frame buffer free, nothing in flight. */
static void tx_reset(struct netdev *n)
{
	n->inflight = 0;
	n->nfree = 0;
	for (u32 i = n->tx.qsize; i-- > 0;) {
		n->free_desc[n->nfree++] = (u16)i;
		n->busy[i] = 0;
	}
	n->nslots = n->txcap < TX_SLOTS ? n->txcap : TX_SLOTS;
	n->nslot_free = 0;
	for (u32 s = n->nslots; s-- > 0;)
		n->slot_free[n->nslot_free++] = (u16)s;
}

static void rx_repost(struct netdev *n, u32 id)
{
	n->posted[id] = 1;
	vq_push(&n->rx, (u16)id);
}

/*
 * Set up open slot k (its rings nvq[k]; its buffers: the k-th of ndev equal
 * shares of virtio_buf, TX frame buffers first) as net device dev=index.
 * post_rx = 0 (hostile rx cases) leaves the RX queue empty.
 */
static struct netdev *net_open(u32 k, u32 index, u32 ndev, int post_rx)
{
	struct netdev *n = &nets[k];
	volatile struct net_mem *m = &nvq[k];
	u32 share = VIRTIO_BUF_SIZE / ndev, room;
	int noirq = mg_arg_u64("noirq", 0) != 0;

	net_find(n, index);
	n->m = m;
	vio_begin(&n->v, VIRTIO_ID_NET, "net", net_want);
	n->mrg = (n->v.accepted & F_NET_MRG_RXBUF) != 0;

	vio_queue_size(&n->rx, &n->v, 0, VQ_MAX, noirq);
	vio_queue_setup(&n->rx, &m->rx, 0);
	vio_queue_size(&n->tx, &n->v, 1, VQ_MAX, noirq);
	n->txcap = n->tx.qsize / 2;
	if (n->txcap == 0)
		mg_error("net dev=%u: qsize %u too small for one TX chain", index, n->tx.qsize);
	vio_queue_setup(&n->tx, &m->tx, 0);
	net_config(n);

	n->txbuf = virtio_buf + (u64)k * share;
	n->rxbuf = n->txbuf + TX_SLOTS * SLOT;
	n->bufsize = bufsize;
	room = (share - TX_SLOTS * SLOT) / bufsize;
	n->nrx = n->rx.qsize < room ? n->rx.qsize : room;
	tx_reset(n);
	*(volatile u64 *)m->hdr = 0;	/* the TX header: no flags, no GSO, num_buffers 0 */
	*(volatile u32 *)(m->hdr + 8) = 0;
	rxf[k].got = 0;
	for (u32 i = 0; i < n->nrx; i++) {
		put_desc(&m->rx.desc[i], (u64)(usize)rxbuf(n, i), bufsize, D_WRITE, 0);
		n->posted[i] = 0;
		if (post_rx)
			rx_repost(n, i);
	}
	vq_publish(&n->rx);
	vio_driver_ok(&n->v);
	if (post_rx)
		vq_kick(&n->rx, 0);	/* not before DRIVER_OK (3.1.1) */
	return n;
}

/* ---- TX ---- */
/* Post a chain of k device-readable segments (seg_*); the caller checked nfree >= k. */
static void tx_chain(struct netdev *n, u32 k, const u64 *addr, const u32 *len, const u16 *tag)
{
	volatile struct vdesc *t = n->m->tx.desc;
	u16 d = n->free_desc[--n->nfree], head = d;

	for (u32 i = 0; i < k; i++) {
		u16 nx = i + 1 < k ? n->free_desc[--n->nfree] : 0;
		put_desc(&t[d], addr[i], len[i], i + 1 < k ? D_NEXT : 0, nx);
		n->tag[d] = tag[i];
		d = nx;
	}
	n->busy[head] = 1;
	n->inflight++;
	vq_push(&n->tx, head);
}

/* Completed chains: descriptors back to the free stack, buffers back to their owners. */
static u32 tx_reclaim(struct netdev *n)
{
	struct vq *q = &n->tx;
	volatile struct vring *r = q->r;
	u16 idx = r->used.idx;
	u32 done = 0;

	while (q->last_used != idx) {
		u32 id = r->used.ring[q->last_used % q->qsize].id;
		q->last_used++;
		if (id >= q->qsize || !n->busy[id])
			mg_error("net dev=%u: TX used id %u is not a head we posted", n->v.index, id);
		n->busy[id] = 0;
		n->inflight--;
		done++;
		for (u32 d = id, i = 0; i < q->qsize; i++) {	/* our own chain, bounded anyway */
			u16 tag = n->tag[d], flags = r->desc[d].flags, next = r->desc[d].next;
			n->free_desc[n->nfree++] = (u16)d;
			if (tag != TAG_NONE) {
				if (tag & TAG_SLOT)
					n->slot_free[n->nslot_free++] = tag & ~TAG_SLOT;
				else
					rx_repost(n, tag);
			}
			if (!(flags & D_NEXT))
				break;
			d = next;
		}
	}
	if (done)
		vq_set_used_event(q);
	return done;
}

/*
 * Send frames seq 0..count-1 of frame_size bytes: header + frame buffer,
 * at most min(qsize/2, TX_SLOTS) in flight.  Returns the frames completed;
 * a TX that does not complete within timeout_ms is an MG-ERROR unless soft.
 */
static u64 net_send(struct netdev *n, u64 count, int soft, u64 *t0, u64 *t1)
{
	u64 sent = 0, done = 0;
	u64 addr[2] = { (u64)(usize)n->m->hdr, 0 };
	u32 len[2] = { NET_HDR, frame_size };
	u16 tag[2] = { TAG_NONE, 0 };

	for (u32 s = 0; s < n->nslots; s++)
		frame_head(n, n->txbuf + s * SLOT);
	*t0 = rdtsc();
	while (done < count) {
		while (sent < count && n->nslot_free && n->inflight < n->txcap && n->nfree >= 2) {
			u16 s = n->slot_free[--n->nslot_free];
			u8 *p = n->txbuf + s * SLOT;
			frame_body(p, (u32)sent, frame_size);
			addr[1] = (u64)(usize)p;
			tag[1] = TAG_SLOT | s;
			tx_chain(n, 2, addr, len, tag);
			sent++;
		}
		vq_publish(&n->tx);
		vq_kick(&n->tx, 0);
		if (!vq_wait_used(&n->tx, timeout_ms, 4096)) {
			if (soft)
				break;
			net_stuck(n, &n->tx, "send");
		}
		done += tx_reclaim(n);
		MB->progress = done;
		if (!n->tx.noirq)
			vio_ack(&n->v);
	}
	*t1 = rdtsc();
	return done;
}

/* ---- RX ---- */
/* Collect the next frame's buffers into f: 1 = complete, 0 = the used ring ran dry first. */
static int rx_frame(struct netdev *n, struct rxframe *f)
{
	struct vq *q = &n->rx;
	volatile struct vring *r = q->r;

	while (q->last_used != r->used.idx) {
		volatile struct vused_elem *e = &r->used.ring[q->last_used % q->qsize];
		u32 id = e->id, len = e->len;
		q->last_used++;
		BARRIER();	/* the buffer is read after its used entry */
		if (id >= n->nrx || !n->posted[id])
			mg_error("net dev=%u: RX used id %u is not a buffer we posted", n->v.index, id);
		if (len > n->bufsize || (f->got == 0 && len < NET_HDR))
			mg_error("net dev=%u: RX used len %u for a %u-byte buffer", n->v.index, len,
				 n->bufsize);
		n->posted[id] = 0;
		if (f->got == 0) {
			f->nb = n->mrg ? *(volatile u16u *)(rxbuf(n, id) + HDR_NUM_BUFFERS) : 1;
			if (f->nb == 0 || f->nb > n->nrx)
				mg_error("net dev=%u: RX num_buffers %u with %u buffers posted",
					 n->v.index, f->nb, n->nrx);
			f->len = len - NET_HDR;
		} else {
			f->len += len;
		}
		f->id[f->got] = (u16)id;
		f->blen[f->got] = len;
		if (++f->got == f->nb)
			return 1;
	}
	return 0;
}

static void rx_release(struct netdev *n, struct rxframe *f)
{
	for (u32 i = 0; i < f->got; i++)
		rx_repost(n, f->id[i]);
	f->got = 0;
}

/* After a batch: buffers visible to the device, a kick if it wants one, interrupt acked. */
static void rx_batch_done(struct netdev *n)
{
	vq_publish(&n->rx);
	vq_set_used_event(&n->rx);
	vq_kick(&n->rx, 0);
	if (!n->rx.noirq)
		vio_ack(&n->v);
}

/* MG-NET-FRAME: length, buffers, FNV-1a of the frame (buffers joined, header left out), first 16 bytes */
static void print_frame(const struct netdev *n, const struct rxframe *f)
{
	u32 h = FNV1A_INIT, shown = 0;

	for (u32 i = 0; i < f->got; i++) {
		const u8 *p = rxbuf(n, f->id[i]) + (i ? 0 : NET_HDR);
		h = fnv1a_update(h, p, f->blen[i] - (i ? 0 : NET_HDR));
	}
	mg_printf("MG-NET-FRAME dev=%u len=%u bufs=%u sum=", n->v.index, f->len, f->got);
	put_hex(h, 8);
	mg_puts(" first=");
	for (u32 i = 0; i < f->got && shown < 16; i++) {
		const u8 *p = rxbuf(n, f->id[i]) + (i ? 0 : NET_HDR);
		u32 l = f->blen[i] - (i ? 0 : NET_HDR);
		for (u32 j = 0; j < l && shown < 16; j++, shown++)
			put_hex(p[j], 2);
	}
	mg_putc('\n');
}

static void print_ready(const struct netdev *n)
{
	mg_printf("MG-NET-READY dev=%u mac=", n->v.index);
	put_mac(n->mac);
	mg_putc('\n');
}

struct rxstats {
	u64 n, bytes, t0, t1;
	int timeout;
};

/*
 * Receive up to want frames, re-posting each frame's buffers at once.  The
 * wait restarts with every batch (timeout_ms is an idle timeout).  print:
 * an MG-NET-FRAME line per frame (checksummed).
 */
static void rx_run(struct netdev *n, u64 want, int print, struct rxstats *s)
{
	struct rxframe *f = &rxf[n - nets];
	struct wait w;
	u32 idle = 0;

	s->n = s->bytes = s->t0 = s->t1 = 0;
	s->timeout = 0;
	wait_init(&w, timeout_ms);
	while (s->n < want) {
		u32 batch = 0;
		while (s->n < want && rx_frame(n, f)) {
			s->t1 = rdtsc();
			if (s->n == 0)
				s->t0 = s->t1;
			if (print)
				print_frame(n, f);
			s->bytes += f->len;
			s->n++;
			batch++;
			rx_release(n, f);
		}
		if (batch) {
			rx_batch_done(n);
			MB->progress = s->n;
			wait_init(&w, timeout_ms);
			continue;
		}
		if (++idle % 4096 == 0 && (vio_status(&n->v) & ST_NEEDS_RESET))
			net_stuck(n, &n->rx, "recv");
		if (wait_expired(&w)) {
			s->timeout = 1;
			break;
		}
	}
}

/* ---- ops ---- */
static void op_info(struct netdev *n)
{
	mg_printf("MG-NET dev=%u mac=", n->v.index);
	put_mac(n->mac);
	if (n->link < 0)
		mg_puts(" status=none");
	else
		mg_printf(" status=%u", (u32)n->link);
	mg_printf(" features=0x%llx qmax=%u\n", n->v.accepted, n->rx.qmax);
}

static void op_send(struct netdev *n, u64 count, u64 khz)
{
	u64 t0, t1, done = net_send(n, count, 0, &t0, &t1);
	mg_printf("MG-NET-SEND dev=%u n=%llu bytes=%llu tsc=%llu khz=%llu\n", n->v.index, done,
		  done * frame_size, t1 - t0, khz);
}

/*
 * txflood: one frame (seq 0) built once; qsize/2 chains of two descriptors
 * (header, that frame) built once; then only avail entries, a kick per
 * batch and the used ring.
 */
static void op_txflood(struct netdev *n, u64 count, u64 khz)
{
	volatile struct net_mem *m = n->m;
	struct vq *q = &n->tx;
	u8 *frame = n->txbuf;
	u64 posted = 0, done = 0, t0, t1;
	u32 nfree = 0;

	frame_head(n, frame);
	frame_body(frame, 0, frame_size);
	for (u32 c = n->txcap; c-- > 0;) {
		put_desc(&m->tx.desc[2 * c], (u64)(usize)m->hdr, NET_HDR, D_NEXT, (u16)(2 * c + 1));
		put_desc(&m->tx.desc[2 * c + 1], (u64)(usize)frame, frame_size, 0, 0);
		n->free_desc[nfree++] = (u16)(2 * c);
	}
	t0 = rdtsc();
	while (done < count) {
		for (; posted < count && nfree; posted++) {
			u16 head = n->free_desc[--nfree];
			n->busy[head] = 1;
			vq_push(q, head);
		}
		vq_publish(q);
		vq_kick(q, 0);
		if (!vq_wait_used(q, timeout_ms, 4096))
			net_stuck(n, q, "txflood");
		u16 idx = q->r->used.idx;
		while (q->last_used != idx) {
			u32 id = q->r->used.ring[q->last_used % q->qsize].id;
			q->last_used++;
			if (id >= 2 * n->txcap || !n->busy[id])
				mg_error("net dev=%u: TX used id %u is not a head we posted",
					 n->v.index, id);
			n->busy[id] = 0;
			n->free_desc[nfree++] = (u16)id;
			done++;
		}
		MB->progress = done;
		vq_set_used_event(q);
		if (!q->noirq)
			vio_ack(&n->v);
	}
	t1 = rdtsc();
	mg_printf("MG-NET-TX dev=%u n=%llu bytes=%llu tsc=%llu khz=%llu kicks=%llu\n", n->v.index,
		  done, done * frame_size, t1 - t0, khz, q->kicks);
}

/*
 * remac=1 (echo): the MAC is read from config space again before each
 * frame, and a change printed: a VM restored from a snapshot with another
 * MAC (a clone) then answers with the MAC its device has now, where a
 * driver that read it once at probe would keep the snapshot's.
 */
static void net_remac(struct netdev *n)
{
	u8 mac[6];
	int same = 1;

	if (!(n->v.accepted & F_NET_MAC))
		return;
	for (int i = 0; i < 10; i++) {	/* until ConfigGeneration holds, as net_config */
		u32 gen = vio_rd(&n->v, VIRTIO_MMIO_CONFIG_GENERATION);
		for (u32 b = 0; b < 6; b++)
			mac[b] = vio_rd8(&n->v, VIRTIO_MMIO_CONFIG + b);
		if (vio_rd(&n->v, VIRTIO_MMIO_CONFIG_GENERATION) == gen)
			break;
	}
	for (u32 b = 0; b < 6; b++) {
		same &= mac[b] == n->mac[b];
		n->mac[b] = mac[b];
	}
	if (!same) {
		mg_printf("MG-NET-MAC dev=%u mac=", n->v.index);
		put_mac(n->mac);
		mg_putc('\n');
	}
}

/*
 * echo: each frame goes back from its own RX buffers (zero copy): the
 * header is zeroed, dst := src, src := our MAC, and the buffers form the
 * TX chain; they are re-posted to RX once the TX completes.
 */
static void op_echo(struct netdev *n, u64 want)
{
	struct rxframe *f = &rxf[n - nets];
	struct wait w;
	u64 echoed = 0;
	u32 idle = 0;
	int timeout = 0;
	int remac = mg_arg_u64("remac", 0) != 0;

	print_ready(n);
	wait_init(&w, timeout_ms);
	while (echoed < want) {
		int progress = 0;
		while (echoed < want && rx_frame(n, f)) {
			u8 *p = rxbuf(n, f->id[0]);
			if (remac)
				net_remac(n);
			if (f->got > n->tx.qsize)
				mg_error("net dev=%u: echo: a frame of %u buffers, TX queue of %u",
					 n->v.index, f->got, n->tx.qsize);
			while (n->inflight >= n->txcap || n->nfree < f->got) {
				vq_publish(&n->tx);
				vq_kick(&n->tx, 0);
				if (!vq_wait_used(&n->tx, timeout_ms, 4096))
					net_stuck(n, &n->tx, "echo");
				tx_reclaim(n);
			}
			*(u64u *)p = 0;		/* header: flags, gso, ..., num_buffers = 0 */
			*(u32u *)(p + 8) = 0;
			if (f->blen[0] >= NET_HDR + 12) {
				*(u32u *)(p + NET_HDR) = *(u32u *)(p + NET_HDR + 6);
				*(u16u *)(p + NET_HDR + 4) = *(u16u *)(p + NET_HDR + 10);
				*(u32u *)(p + NET_HDR + 6) = *(const u32u *)n->mac;
				*(u16u *)(p + NET_HDR + 10) = *(const u16u *)(n->mac + 4);
			}
			for (u32 i = 0; i < f->got; i++) {
				seg_addr[i] = (u64)(usize)rxbuf(n, f->id[i]);
				seg_len[i] = f->blen[i];
				seg_tag[i] = f->id[i];
			}
			tx_chain(n, f->got, seg_addr, seg_len, seg_tag);
			f->got = 0;
			echoed++;
			progress = 1;
		}
		if (progress) {
			vq_publish(&n->tx);
			vq_kick(&n->tx, 0);
			vq_set_used_event(&n->rx);
		}
		if (tx_reclaim(n)) {	/* their RX buffers go back */
			vq_publish(&n->rx);
			vq_kick(&n->rx, 0);
			progress = 1;
		}
		if (progress) {
			if (!n->rx.noirq)
				vio_ack(&n->v);
			MB->progress = echoed;
			wait_init(&w, timeout_ms);
			continue;
		}
		if (++idle % 4096 == 0 && (vio_status(&n->v) & ST_NEEDS_RESET))
			net_stuck(n, &n->rx, "echo");
		if (wait_expired(&w)) {
			timeout = 1;
			break;
		}
	}
	while (n->inflight) {	/* the last echoes leave before we report */
		if (!vq_wait_used(&n->tx, timeout_ms, 4096))
			net_stuck(n, &n->tx, "echo");
		tx_reclaim(n);
	}
	rx_batch_done(n);
	mg_printf("MG-NET-ECHO dev=%u n=%llu timeout=%u\n", n->v.index, echoed, timeout);
}

/* twodev: dev 0 and dev 1 each send frame seq 0, then one frame is awaited on each */
static void op_twodev(void)
{
	struct netdev *n[2];
	u64 t0, t1, sent[2];
	int got[2] = { 0, 0 }, timeout = 0;
	struct wait w;

	n[0] = net_open(0, 0, 2, 1);
	n[1] = net_open(1, 1, 2, 1);
	for (u32 k = 0; k < 2; k++)
		sent[k] = net_send(n[k], 1, 1, &t0, &t1);
	print_ready(n[0]);
	print_ready(n[1]);
	wait_init(&w, timeout_ms);
	while (!got[0] || !got[1]) {
		int progress = 0;
		for (u32 k = 0; k < 2; k++) {
			int batch = 0;
			while (rx_frame(n[k], &rxf[k])) {
				if (!got[k])
					print_frame(n[k], &rxf[k]);
				got[k] = 1;
				rx_release(n[k], &rxf[k]);
				batch = 1;
			}
			if (batch)
				rx_batch_done(n[k]);
			progress |= batch;
		}
		if (!progress && wait_expired(&w)) {
			timeout = 1;
			break;
		}
	}
	mg_printf("MG-NET-TWODEV sent=%llu,%llu got=%u,%u timeout=%u\n", sent[0], sent[1],
		  got[0], got[1], timeout);
}

/*
 * hostile: one malformed RX or TX chain, a notify, then observe the queue
 * concerned.  rx cases leave the RX queue otherwise empty (a device looks at
 * RX buffers only when a frame comes: READY tells the host to send one).
 */
static void op_hostile(u32 dev)
{
	usize clen;
	const char *c = mg_arg("case", &clen);
	int rx = mg_arg_is("case", "rxbadaddr") || mg_arg_is("case", "rxreadable") ||
		 mg_arg_is("case", "rxbadhead");
	struct netdev *n;
	volatile struct net_mem *m;
	struct vq *q;
	u64 t0, t1, sent;
	u32 st;
	u16 used;

	if (!c)
		mg_error("net op=hostile needs case=");
	if (!rx && !mg_arg_is("case", "txbadaddr") && !mg_arg_is("case", "txshort") &&
	    !mg_arg_is("case", "txloop"))
		mg_error("net unknown case=%.*s", (int)clen, c);
	n = net_open(0, dev, 1, !rx);
	m = n->m;
	q = rx ? &n->rx : &n->tx;
	if (mg_arg_is("case", "rxbadaddr")) {
		put_desc(&m->rx.desc[0], HOSTILE_ADDR, bufsize, D_WRITE, 0);
		vq_push(q, 0);
	} else if (mg_arg_is("case", "rxreadable")) {
		put_desc(&m->rx.desc[0], (u64)(usize)rxbuf(n, 0), bufsize, 0, 0);	/* no WRITE */
		vq_push(q, 0);
	} else if (mg_arg_is("case", "rxbadhead")) {
		vq_push(q, (u16)q->qsize);	/* a head outside the descriptor table */
	} else if (mg_arg_is("case", "txbadaddr")) {
		put_desc(&m->tx.desc[0], (u64)(usize)m->hdr, NET_HDR, D_NEXT, 1);
		put_desc(&m->tx.desc[1], HOSTILE_ADDR, frame_size, 0, 0);
		vq_push(q, 0);
	} else if (mg_arg_is("case", "txshort")) {
		frame_head(n, n->txbuf);
		put_desc(&m->tx.desc[0], (u64)(usize)n->txbuf, 4, 0, 0);	/* < the header */
		vq_push(q, 0);
	} else {	/* txloop */
		put_desc(&m->tx.desc[0], (u64)(usize)m->hdr, NET_HDR, D_NEXT, 0);	/* next = itself */
		vq_push(q, 0);
	}
	vq_publish(q);
	vq_kick(q, 1);
	if (rx)
		print_ready(n);
	vq_wait_used(q, timeout_ms, 64);
	st = vio_status(&n->v);
	used = q->r->used.idx;
	vio_ack(&n->v);
	mg_printf("MG-NET-HOSTILE case=%.*s status=0x%x used=%u\n", (int)clen, c, st, used);

	if (!mg_arg_u64("recover", 1))
		return;
	n = net_open(0, dev, 1, 1);	/* reset, set up again, send frame seq 0 */
	sent = net_send(n, 1, 1, &t0, &t1);
	st = vio_status(&n->v);
	vio_ack(&n->v);
	mg_printf("MG-NET-RECOVER status=0x%x sent=%llu\n", st, sent);
}

void mode_net(void)
{
	usize len;
	const char *op = mg_arg("op", &len), *src;
	u32 dev = (u32)mg_arg_u64("dev", 0);
	u64 count = mg_arg_u64("n", mg_arg_is("op", "txflood") || mg_arg_is("op", "rxflood") ?
				     10000 : 1);
	u64 khz, v;
	struct netdev *n;
	struct rxstats s;

	timeout_ms = mg_arg_u64("timeout_ms", mg_arg_is("op", "hostile") ? 500 : 5000);
	seed = mg_arg_u64("seed", 0);
	v = mg_arg_u64("bufsize", BUF_DEFAULT);
	if (v < BUF_MIN || v > BUF_MAX)
		mg_error("net bufsize=%llu: %u..%u", v, BUF_MIN, BUF_MAX);
	bufsize = (u32)v;
	v = mg_arg_u64("size", FRAME_DEFAULT);
	if (v < FRAME_MIN || v > FRAME_MAX)
		mg_error("net size=%llu: %u..%u", v, FRAME_MIN, FRAME_MAX);
	frame_size = (u32)v;
	parse_dst();
	pat_fill();
	/* waits last timeout_ms at the measured rate, not 3-5x that (the 10 GHz bound) */
	khz = mg_tsc_khz(&src);
	vio_wait_khz = src[0] == 'g' ? 0 : khz;	/* "guess": keep the bound */

	if (!op || mg_arg_is("op", "info")) {
		op_info(net_open(0, dev, 1, 1));
	} else if (mg_arg_is("op", "send")) {
		op_send(net_open(0, dev, 1, 1), count, khz);
	} else if (mg_arg_is("op", "recv") || mg_arg_is("op", "rxflood")) {
		int flood = mg_arg_is("op", "rxflood");
		n = net_open(0, dev, 1, 1);
		print_ready(n);
		rx_run(n, count, !flood && count <= 32, &s);
		if (flood)
			mg_printf("MG-NET-RX dev=%u n=%llu bytes=%llu timeout=%u tsc=%llu khz=%llu "
				  "kicks=%llu\n", n->v.index, s.n, s.bytes, s.timeout, s.t1 - s.t0,
				  khz, n->rx.kicks);
		else
			mg_printf("MG-NET-RECV dev=%u n=%llu bytes=%llu timeout=%u tsc=%llu khz=%llu\n",
				  n->v.index, s.n, s.bytes, s.timeout, s.t1 - s.t0, khz);
	} else if (mg_arg_is("op", "echo")) {
		op_echo(net_open(0, dev, 1, 1), count);
	} else if (mg_arg_is("op", "txflood")) {
		op_txflood(net_open(0, dev, 1, 1), count, khz);
	} else if (mg_arg_is("op", "twodev")) {
		op_twodev();
	} else if (mg_arg_is("op", "hostile")) {
		op_hostile(dev);
	} else {
		mg_error("net unknown op=%.*s", (int)len, op);
	}
	mg_puts("MG-DONE\n");
}
