/*
 * vsock.c - a minimal virtio-vsock driver for the micro-guest over the
 * shared virtio-mmio transport (virtio.c), and the mg=vsock-* modes.
 *
 * Queue 0 = RX, 1 = TX, 2 = event; polling only (interrupts off).  The
 * guest never touches payload bytes (guest kernel code is emulated one
 * instruction at a time on PVM hosts, docs/platform.md): RX descriptor i is
 * buffer i for the whole run; echo sends a buffer's payload straight from
 * it (TX chain: a header slot, then the RX buffer) and gives the buffer back
 * once that TX completed; connect sends from a pattern buffer filled once.
 * TX chain k is descriptors 2k, 2k+1 and header slot k.  Credit: a
 * connection's buf_alloc is its share of the RX buffers; the guest sends
 * within the host's grant; a device that sends more than granted is an
 * MG-ERROR.
 *
 * Modes (README.md, "virtio-vsock"):
 *   mg=vsock-echo port=P [conns=N]   serve P, echo every byte back; prints
 *       VSOCK-ACCEPT / VSOCK-CLOSE per connection; a TRANSPORT_RESET event
 *       prints VSOCK-RESET, drops every connection and serving goes on.
 *   mg=vsock-connect port=P bytes=N [echo=1]  connect to host port P, send
 *       N pattern bytes; with echo=1 also read N bytes back (counted: the
 *       host checks what it got, the echo test checks the other way).
 *   mg=vsock-flood port=P bytes=N    the same with echo=0.
 * The pattern: byte i of a stream is (i + (i >> 8)) & 0xff.
 */
#include "virtio.h"

#define VIRTIO_ID_VSOCK		19
#define HOST_CID		2
#define HDR			44
#define TYPE_STREAM		1
#define OP_REQUEST		1
#define OP_RESPONSE		2
#define OP_RST			3
#define OP_SHUTDOWN		4
#define OP_RW			5
#define OP_CREDIT_UPDATE	6
#define OP_CREDIT_REQUEST	7
#define SHUT_BOTH		3
#define EVENT_TRANSPORT_RESET	0

#define QSIZE			64
#define NRX			24
#define RXBUF			(32u << 10)
#define RESERVE			4	/* RX buffers never granted as credit: control packets */
#define NTX			(QSIZE / 2)	/* chains of two descriptors */
#define NEV			4
#define MAX_CONNS		128
#define PATBUF			(64u << 10)	/* the pattern's period */
#define PAT_OFF			(NRX * RXBUF)
#define FIRST_LOCAL_PORT	1024
#define NONE			0xffff

_Static_assert(PAT_OFF + PATBUF <= VIRTIO_BUF_SIZE, "virtio_buf layout");

struct hdr {
	u64 src_cid, dst_cid;
	u32 src_port, dst_port, len;
	u16 type, op;
	u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));
_Static_assert(sizeof(struct hdr) == HDR, "virtio_vsock_hdr");

enum { S_FREE, S_CONNECTING, S_OPEN };

struct vconn {
	u32 state, lport, pport;
	u32 peer_alloc, peer_fwd, tx_cnt;	/* the host's grant; bytes we sent */
	u32 fwd_cnt, fwd_told;			/* bytes we consumed; last told */
	u16 q_head, q_tail;			/* RX buffers to echo, in order (NONE: empty) */
	u32 q_off;				/* bytes of the first one already echoed */
	u64 rx_bytes;
	int peer_shut;
	u64 sent, got;				/* connect mode */
};

struct vs_mem {
	struct vring rx, tx, ev;
	struct hdr slot[NTX] __attribute__((aligned(64)));
};

static struct vs_mem vsm __attribute__((section(".bss.noinit"), aligned(4096)));
static struct vconn conns[MAX_CONNS] __attribute__((section(".bss.noinit")));
static u32 ev_buf[NEV] __attribute__((section(".bss.noinit")));
static u16 q_next[NRX] __attribute__((section(".bss.noinit")));	/* echo queues, linked */
static u32 rx_len[NRX] __attribute__((section(".bss.noinit")));	/* payload bytes held */
static u16 tx_frees[NTX] __attribute__((section(".bss.noinit")));	/* per chain: RX buffer to repost */

static struct vdev dev;
static struct vq rxq, txq, evq;
static u64 guest_cid;
static u32 grant, nconns_max, listen_port;
static u16 tx_free[NTX];
static u32 ntx_free;
static u64 accepted, resets;

static u8 *rxbuf(u32 i) { return virtio_buf + (u64)i * RXBUF; }

MG_NORETURN static void stuck(const char *what)
{
	mg_error("vsock %s: status=0x%x rx used=%u tx used=%u", what, vio_status(&dev),
		 rxq.r->used.idx, txq.r->used.idx);
}

static u64 vsock_want(void)
{
	return 0;
}

/* pattern byte i: (i + (i >> 8)) & 0xff, written 8 bytes at a time */
static void pat_fill(void)
{
	u64 *p = (u64 *)(virtio_buf + PAT_OFF);
	for (u32 k = 0; k < PATBUF / 8; k++) {
		u64 hi = (k * 8) >> 8, w = 0;
		for (u32 b = 8; b-- > 0;)
			w = w << 8 | (u8)(k * 8 + b + hi);
		p[k] = w;
	}
}

static void vsock_open(void)
{
	u32 words = vio_count(), seen = 0;
	for (u32 w = 0; w < words; w++) {
		vio_find(&dev, "vsock", 0, w);
		if (vio_probe_id(&dev) == VIRTIO_ID_VSOCK && seen++ == 0)
			break;
	}
	if (!seen)
		mg_error("vsock: no virtio-vsock device (%u virtio_mmio.device= words)", words);
	vio_begin(&dev, VIRTIO_ID_VSOCK, "vsock", vsock_want);
	vio_queue_size(&rxq, &dev, 0, QSIZE, 1);
	vio_queue_setup(&rxq, &vsm.rx, 0);
	vio_queue_size(&txq, &dev, 1, QSIZE, 1);
	vio_queue_setup(&txq, &vsm.tx, 0);
	vio_queue_size(&evq, &dev, 2, NEV, 1);
	vio_queue_setup(&evq, &vsm.ev, 0);
	if (rxq.qsize < NRX || txq.qsize < QSIZE || evq.qsize < NEV)
		mg_error("vsock: queues too small (%u %u %u)", rxq.qsize, txq.qsize, evq.qsize);
	guest_cid = vio_config64(&dev, 0);
	for (u32 i = 0; i < NRX; i++) {
		put_desc(&vsm.rx.desc[i], (u64)(usize)rxbuf(i), RXBUF, D_WRITE, 0);
		vq_push(&rxq, (u16)i);
	}
	vq_publish(&rxq);
	for (u32 i = 0; i < NEV; i++) {
		put_desc(&vsm.ev.desc[i], (u64)(usize)&ev_buf[i], 4, D_WRITE, 0);
		vq_push(&evq, (u16)i);
	}
	vq_publish(&evq);
	ntx_free = 0;
	for (u32 i = NTX; i-- > 0;)
		tx_free[ntx_free++] = (u16)i;
	vio_driver_ok(&dev);
	vq_kick(&rxq, 1);
	vq_kick(&evq, 1);
	mg_printf("VSOCK-CID %llu\n", guest_cid);
}

static void rx_repost(u32 id)
{
	vq_post_head(&rxq, (u16)id);
	vq_kick(&rxq, 1);
}

/* ---- TX ---- */
static void tx_reclaim(void)
{
	volatile struct vring *r = txq.r;
	while (txq.last_used != r->used.idx) {
		u32 id = r->used.ring[txq.last_used % txq.qsize].id;
		txq.last_used++;
		if (id >= QSIZE || id % 2)
			mg_error("vsock: TX used id %u is not a head of ours", id);
		u32 k = id / 2;
		if (tx_frees[k] != NONE)
			rx_repost(tx_frees[k]);	/* its payload went out: the buffer is free */
		tx_frees[k] = NONE;
		tx_free[ntx_free++] = (u16)k;
	}
}

static u32 tx_chain(void)
{
	struct wait w;
	wait_init(&w, 10000);
	while (!ntx_free) {
		tx_reclaim();
		if (!ntx_free && wait_expired(&w))
			stuck("TX never completes");
	}
	return tx_free[--ntx_free];
}

/* One packet: header slot k, then len payload bytes at data (not copied);
 * frees: the RX buffer to repost once the device took it (NONE: none). */
static void send_pkt(struct vconn *c, u32 lport, u32 pport, u16 op, u32 flags, const u8 *data,
		     u32 len, u16 frees)
{
	u32 k = tx_chain();
	volatile struct hdr *h = &vsm.slot[k];
	h->src_cid = guest_cid;
	h->dst_cid = HOST_CID;
	h->src_port = lport;
	h->dst_port = pport;
	h->len = len;
	h->type = TYPE_STREAM;
	h->op = op;
	h->flags = flags;
	h->buf_alloc = c ? grant : 0;
	h->fwd_cnt = c ? c->fwd_cnt : 0;
	if (c) {
		c->fwd_told = c->fwd_cnt;
		c->tx_cnt += len;
	}
	tx_frees[k] = frees;
	put_desc(&vsm.tx.desc[2 * k], (u64)(usize)h, HDR, len ? D_NEXT : 0, (u16)(2 * k + 1));
	if (len)
		put_desc(&vsm.tx.desc[2 * k + 1], (u64)(usize)data, len, 0, 0);
	vq_post_head(&txq, (u16)(2 * k));
	vq_kick(&txq, 1);
}

static void ctl(struct vconn *c, u16 op, u32 flags)
{
	send_pkt(c, c->lport, c->pport, op, flags, 0, 0, NONE);
}

static u32 peer_credit(const struct vconn *c)
{
	u32 inflight = c->tx_cnt - c->peer_fwd;
	return inflight >= c->peer_alloc ? 0 : c->peer_alloc - inflight;
}

/* ---- connections ---- */
static struct vconn *find(u32 lport, u32 pport)
{
	for (u32 i = 0; i < nconns_max; i++)
		if (conns[i].state != S_FREE && conns[i].lport == lport && conns[i].pport == pport)
			return &conns[i];
	return 0;
}

static struct vconn *conn_new(u32 lport, u32 pport)
{
	for (u32 i = 0; i < nconns_max; i++) {
		struct vconn *c = &conns[i];
		if (c->state == S_FREE) {
			memset(c, 0, sizeof(*c));
			c->lport = lport;
			c->pport = pport;
			c->q_head = c->q_tail = NONE;
			return c;
		}
	}
	return 0;
}

/* A connection ends: the buffers it held go back to the device. */
static void conn_close(struct vconn *c, const char *why)
{
	for (u16 b = c->q_head; b != NONE; b = q_next[b])
		rx_repost(b);
	if (listen_port)
		mg_printf("VSOCK-CLOSE port=%u bytes=%llu %s\n", c->pport, c->rx_bytes, why);
	c->state = S_FREE;
}

/* Tell the host it may send more once we consumed half of what we grant. */
static void maybe_credit(struct vconn *c)
{
	if (c->fwd_cnt - c->fwd_told >= grant / 2)
		ctl(c, OP_CREDIT_UPDATE, 0);
}

/* Echo: send the held buffers' payload back, within the host's credit. */
static void echo_flush(struct vconn *c)
{
	while (c->q_head != NONE && c->state == S_OPEN) {
		u16 b = c->q_head;
		u32 n = rx_len[b] - c->q_off, cr = peer_credit(c);
		n = n < cr ? n : cr;
		if (!n) {
			tx_reclaim();
			return;
		}
		int last = c->q_off + n == rx_len[b];
		if (last) {
			c->q_head = q_next[b];
			if (c->q_head == NONE)
				c->q_tail = NONE;
		}
		c->fwd_cnt += n;	/* consumed: it leaves our hands with this packet */
		send_pkt(c, c->lport, c->pport, OP_RW, 0, rxbuf(b) + HDR + c->q_off, n,
			 last ? b : NONE);
		c->q_off = last ? 0 : c->q_off + n;
	}
	if (c->state == S_OPEN && c->q_head == NONE && c->peer_shut) {
		ctl(c, OP_SHUTDOWN, SHUT_BOTH);	/* the host hears RST from the device */
		c->peer_shut = 0;
	}
}

/* RX buffer id carries len payload bytes for c: held to echo, or counted. */
static int on_data(struct vconn *c, u32 id, u32 len)
{
	c->rx_bytes += len;
	if (listen_port) {
		rx_len[id] = len;
		q_next[id] = NONE;
		if (c->q_tail == NONE)
			c->q_head = (u16)id;
		else
			q_next[c->q_tail] = (u16)id;
		c->q_tail = (u16)id;
		return 1;	/* held */
	}
	c->got += len;
	c->fwd_cnt += len;
	maybe_credit(c);
	return 0;
}

static void poll_ev(void);

/* One packet in RX buffer id; 1 if the buffer is held (not reposted yet). */
static int on_packet(const struct hdr *h, u32 id)
{
	/* After a restore the device posts TRANSPORT_RESET (with the new CID in
	 * its config) and may then carry a host CONNECT to that CID at once: a
	 * packet for another CID first takes the events, then is checked. */
	if (h->dst_cid != guest_cid)
		poll_ev();
	if (h->dst_cid != guest_cid || h->src_cid != HOST_CID || h->type != TYPE_STREAM)
		mg_error("vsock: packet cid %llu -> %llu type %u", h->src_cid, h->dst_cid, h->type);
	struct vconn *c = find(h->dst_port, h->src_port);
	if (h->op == OP_REQUEST) {
		if (c || h->dst_port != listen_port || !(c = conn_new(h->dst_port, h->src_port))) {
			struct vconn tmp = { .lport = h->dst_port, .pport = h->src_port };
			ctl(&tmp, OP_RST, 0);
			return 0;
		}
		c->state = S_OPEN;
		c->peer_alloc = h->buf_alloc;
		c->peer_fwd = h->fwd_cnt;
		accepted++;
		ctl(c, OP_RESPONSE, 0);
		mg_printf("VSOCK-ACCEPT port=%u n=%llu\n", c->pport, accepted);
		return 0;
	}
	if (!c)
		return 0;	/* a stray (an RST for a connection we dropped) */
	c->peer_alloc = h->buf_alloc;
	c->peer_fwd = h->fwd_cnt;
	switch (h->op) {
	case OP_RESPONSE:
		if (c->state == S_CONNECTING)
			c->state = S_OPEN;
		break;
	case OP_RW:
		/* the device may not send more than we grant: what we hold plus this */
		if (c->rx_bytes + h->len - c->fwd_cnt > grant)
			mg_error("vsock: the device sent %llu bytes over the %u granted (port %u)",
				 c->rx_bytes + h->len - c->fwd_cnt - grant, grant, c->pport);
		return on_data(c, id, h->len);
	case OP_CREDIT_REQUEST:
		ctl(c, OP_CREDIT_UPDATE, 0);
		break;
	case OP_SHUTDOWN:
		c->peer_shut = 1;
		break;
	case OP_RST:
		conn_close(c, c->state == S_CONNECTING ? "refused" : "reset");
		break;
	default:
		break;
	}
	return 0;
}

/* Take every RX packet; buffers not held go back at once.  1 if any came. */
static int poll_rx(void)
{
	volatile struct vring *r = rxq.r;
	int any = 0;
	while (rxq.last_used != r->used.idx) {
		u32 id = r->used.ring[rxq.last_used % rxq.qsize].id;
		u32 len = r->used.ring[rxq.last_used % rxq.qsize].len;
		rxq.last_used++;
		if (id >= NRX || len < HDR || len > RXBUF)
			mg_error("vsock: RX used id %u len %u", id, len);
		struct hdr h;
		memcpy(&h, rxbuf(id), HDR);
		if (h.len != len - HDR)
			mg_error("vsock: header len %u, used len %u", h.len, len);
		if (!on_packet(&h, id))
			vq_push(&rxq, (u16)id);
		any = 1;
	}
	if (any) {
		vq_publish(&rxq);
		vq_kick(&rxq, 1);
	}
	return any;
}

/* TRANSPORT_RESET: every connection is gone; the CID may have changed. */
static void poll_ev(void)
{
	volatile struct vring *r = evq.r;
	while (evq.last_used != r->used.idx) {
		u32 id = r->used.ring[evq.last_used % evq.qsize].id;
		evq.last_used++;
		if (id >= NEV)
			mg_error("vsock: event used id %u", id);
		if (ev_buf[id] == EVENT_TRANSPORT_RESET) {
			for (u32 i = 0; i < nconns_max; i++)
				if (conns[i].state != S_FREE) {
					for (u16 b = conns[i].q_head; b != NONE; b = q_next[b])
						vq_push(&rxq, b);
					conns[i].state = S_FREE;
				}
			vq_publish(&rxq);
			vq_kick(&rxq, 1);
			guest_cid = vio_config64(&dev, 0);
			resets++;
			mg_printf("VSOCK-RESET n=%llu cid=%llu\n", resets, guest_cid);
		}
		vq_post_head(&evq, (u16)id);
		vq_kick(&evq, 1);
	}
}

static void set_conns(u32 n)
{
	nconns_max = n;
	grant = (NRX - RESERVE) * (RXBUF - HDR) / n;
	for (u32 i = 0; i < MAX_CONNS; i++)
		conns[i].state = S_FREE;
	for (u32 k = 0; k < NTX; k++)
		tx_frees[k] = NONE;
}

void mode_vsock_echo(void)
{
	u64 n = mg_arg_u64("conns", MAX_CONNS);
	listen_port = (u32)mg_arg_u64("port", 1234);
	if (!n || n > MAX_CONNS)
		mg_error("vsock conns=%llu: 1..%u", n, MAX_CONNS);
	set_conns((u32)n);
	vsock_open();
	mg_printf("VSOCK-LISTEN port=%u\n", listen_port);
	for (u64 round = 1;; round++) {
		poll_rx();
		poll_ev();
		tx_reclaim();
		for (u32 i = 0; i < nconns_max; i++)
			if (conns[i].state == S_OPEN)
				echo_flush(&conns[i]);
		if (round % 1024 == 0 && (vio_status(&dev) & ST_NEEDS_RESET))
			stuck("needs reset");
	}
}

static void connect_run(int echo)
{
	u32 port = (u32)mg_arg_u64("port", 1234);
	u64 bytes = mg_arg_u64("bytes", 4096);
	const u8 *patbuf = virtio_buf + PAT_OFF;
	struct wait w;
	set_conns(1);
	pat_fill();
	vsock_open();
	struct vconn *c = conn_new(FIRST_LOCAL_PORT, port);
	c->state = S_CONNECTING;
	ctl(c, OP_REQUEST, 0);
	wait_init(&w, 10000);
	while (c->state == S_CONNECTING) {
		poll_rx();
		if (wait_expired(&w))
			stuck("no RESPONSE");
	}
	if (c->state == S_FREE)
		mg_error("vsock: connect to port %u refused", port);
	mg_printf("VSOCK-CONNECTED port=%u\n", port);
	u64 idle = 0;
	while (c->sent < bytes || (echo && c->got < bytes)) {
		int moved = poll_rx();
		if (c->state != S_OPEN)
			mg_error("vsock: reset after %llu bytes sent, %llu got", c->sent, c->got);
		tx_reclaim();
		if (c->sent < bytes && ntx_free) {
			u32 off = (u32)(c->sent % PATBUF), cr = peer_credit(c);
			u64 left = bytes - c->sent;
			u32 n = left < PATBUF - off ? (u32)left : PATBUF - off;
			n = n < cr ? n : cr;
			if (n) {
				send_pkt(c, c->lport, c->pport, OP_RW, 0, patbuf + off, n, NONE);
				c->sent += n;
				moved = 1;
			}
		}
		idle = moved ? 0 : idle + 1;
		if (idle == 1)
			wait_init(&w, 20000);
		if (idle && wait_expired(&w))
			stuck("transfer stalled");
	}
	ctl(c, OP_SHUTDOWN, SHUT_BOTH);
	wait_init(&w, 10000);
	while (c->state == S_OPEN) {	/* the device answers a full shutdown with RST */
		poll_rx();
		if (wait_expired(&w))
			stuck("no RST after SHUTDOWN");
	}
	mg_printf("VSOCK-DONE sent=%llu got=%llu\n", c->sent, c->got);
	mg_end_default();
}

void mode_vsock_connect(void)
{
	connect_run(mg_arg_u64("echo", 1) != 0);
}

void mode_vsock_flood(void)
{
	connect_run(0);
}
