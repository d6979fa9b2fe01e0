/*
 * virtio_vsock.c - virtio-vsock stream connections between the guest and
 * host Unix sockets (see virtio_vsock.h for the conventions and limits).
 *
 * Every chain comes from virtq.c, already checked against guest RAM; every
 * header field is the guest's and is checked here before use.  Host fds are
 * non-blocking; a connection's fd is in the device's epoll set only for
 * what the connection can take now (no credit or no RX buffer: no EPOLLIN),
 * so a stalled connection costs no wake-ups.
 */
#define _GNU_SOURCE	/* accept4, unshare */
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <unistd.h>

#include "guard.h"
#include "virtio_vsock.h"

enum {
	VIRTIO_ID_VSOCK = 19,
	HOST_CID = 2,
	HDR = 44,			/* struct virtio_vsock_hdr */
	MAX_PKT = 64 * 1024,		/* the payload of one packet */
	TYPE_STREAM = 1,
	OP_REQUEST = 1, OP_RESPONSE = 2, OP_RST = 3, OP_SHUTDOWN = 4, OP_RW = 5,
	OP_CREDIT_UPDATE = 6, OP_CREDIT_REQUEST = 7,
	SHUT_RCV = 1, SHUT_SEND = 2,
	EVENT_TRANSPORT_RESET = 0,
	ST_DRIVER_OK = 4,
	FIRST_HOST_PORT = 1u << 30,	/* host-initiated ports, as Firecracker picks them */
	ACCEPTS_PER_ROUND = 16,
};

/* Connection states. */
enum { C_FREE, C_LINE, C_REQUEST, C_OPEN, C_RESET };
/* Control packets owed to the guest, sent in this order. */
enum { P_REQUEST = 1, P_RESPONSE = 2, P_CREDIT_UPDATE = 4, P_CREDIT_REQUEST = 8,
       P_SHUTDOWN = 16, P_RST = 32 };
/* epoll tags: the listener, the wake eventfd, connections by index. */
enum { TAG_LISTEN = 0xffff0001u, TAG_WAKE = 0xffff0002u, TAG_TIMER = 0xffff0003u };
/* A host client gets this many ticks for its CONNECT line and the guest's
 * answer to the REQUEST, as Firecracker gives it 2 s: else it is dropped. */
enum { TICK_MS = 500, CONNECT_TICKS = 4 };

struct hdr {
	uint64_t src_cid, dst_cid;
	uint32_t src_port, dst_port, len;
	uint16_t type, op;
	uint32_t flags, buf_alloc, fwd_cnt;
} __attribute__((packed));
_Static_assert(sizeof(struct hdr) == HDR, "virtio_vsock_hdr");

static void config_read(void *priv, uint64_t off, uint8_t *data, uint32_t len)
{
	struct vmm_vsock *vs = priv;
	uint64_t cid = vs->guest_cid;
	/* off and len are guest-controlled */
	if (off < sizeof(cid))
		memcpy(data, (uint8_t *)&cid + off, len < sizeof(cid) - off ? len : sizeof(cid) - off);
}

static int device_ready(const struct vmm_virtio *v)
{
	return (v->status & ST_DRIVER_OK) && !(v->status & VMM_VIRTIO_STATUS_NEEDS_RESET);
}

static uint32_t buffered_free(const struct vmm_vsock_conn *c)
{
	return VMM_VSOCK_BUF - c->len;
}

/* What the guest lets us send it now (it may shrink buf_alloc under us). */
static uint32_t peer_credit(const struct vmm_vsock_conn *c)
{
	uint32_t in_flight = c->tx_cnt - c->peer_fwd_cnt;
	return in_flight >= c->peer_buf_alloc ? 0 : c->peer_buf_alloc - in_flight;
}

/* ---- the epoll set ---- */
static void set_events(struct vmm_vsock *vs, struct vmm_vsock_conn *c, uint32_t want)
{
	if (want == c->ev)
		return;
	struct epoll_event e = { .events = want, .data.u64 = (uint64_t)(c - vs->conn) };
	int op = !c->ev ? EPOLL_CTL_ADD : !want ? EPOLL_CTL_DEL : EPOLL_CTL_MOD;
	if (epoll_ctl(vs->ep_fd, op, c->fd, &e) == 0 || op == EPOLL_CTL_DEL)
		c->ev = want;
}

/* Out of the set when it can take nothing: a hung-up socket would
 * otherwise report EPOLLHUP whatever we ask. */
static void update_interest(struct vmm_vsock *vs, struct vmm_vsock_conn *c)
{
	uint32_t want = 0;
	if (c->state == C_LINE)
		want = EPOLLIN;
	if (c->state == C_OPEN) {
		if (!c->host_eof && !c->rx_wait && !(c->guest_shut & SHUT_RCV) &&
		    !(c->pending & (P_RESPONSE | P_RST)) && peer_credit(c))
			want |= EPOLLIN;
		if (c->len)
			want |= EPOLLOUT;
	}
	set_events(vs, c, want);
}

static void close_conn(struct vmm_vsock *vs, struct vmm_vsock_conn *c)
{
	set_events(vs, c, 0);
	if (c->fd >= 0)
		close(c->fd);
	free(c->buf);
	memset(c, 0, sizeof(*c));
	c->fd = -1;
}

/* Drop the host side now; the guest hears RST when an RX buffer comes. */
static void reset_conn(struct vmm_vsock *vs, struct vmm_vsock_conn *c)
{
	set_events(vs, c, 0);
	if (c->fd >= 0)
		close(c->fd);
	c->fd = -1;
	c->state = C_RESET;
	c->pending = P_RST;	/* nothing else matters any more */
}

static struct vmm_vsock_conn *find(struct vmm_vsock *vs, uint32_t host_port, uint32_t guest_port)
{
	for (int i = 0; i < VMM_VSOCK_MAX_CONNS; i++) {
		struct vmm_vsock_conn *c = &vs->conn[i];
		if (c->state >= C_REQUEST && c->host_port == host_port && c->guest_port == guest_port)
			return c;
	}
	return NULL;
}

static struct vmm_vsock_conn *alloc_conn(struct vmm_vsock *vs)
{
	for (int i = 0; i < VMM_VSOCK_MAX_CONNS; i++)
		if (vs->conn[i].state == C_FREE)
			return &vs->conn[i];
	return NULL;
}

/* ---- to the guest: the RX queue ---- */
/* Take an RX chain: 1, 0 when there is none (the device waits for
 * buffers), -1 for a bad one (the device failed). */
static int rx_chain(struct vmm_vsock *vs)
{
	struct vmm_virtio *v = &vs->transport;
	if (!device_ready(v))
		return 0;
	int r = vmm_virtq_pop(&v->q[VMM_VSOCK_RXQ], v->mem, &vs->chain);
	if (r == 0) {
		vs->rx_wait = 1;
		return 0;
	}
	if (r < 0 || vs->chain.readable_len || vs->chain.writable_len < HDR) {
		vmm_virtio_fail(v);
		return -1;
	}
	return 1;
}

static void rx_put_back(struct vmm_vsock *vs)
{
	vs->transport.q[VMM_VSOCK_RXQ].last_avail--;
}

/* Header and len payload bytes are in vs->chain: hand it to the guest. */
static void rx_complete(struct vmm_vsock *vs, struct vmm_vsock_conn *c, uint32_t src_port,
			uint32_t dst_port, uint16_t op, uint32_t flags, uint32_t len)
{
	struct vmm_virtio *v = &vs->transport;
	struct vmm_virtq *q = &v->q[VMM_VSOCK_RXQ];
	struct hdr h = {
		.src_cid = HOST_CID, .dst_cid = vs->guest_cid, .src_port = src_port,
		.dst_port = dst_port, .len = len, .type = TYPE_STREAM, .op = op, .flags = flags,
		.buf_alloc = VMM_VSOCK_BUF, .fwd_cnt = c ? c->fwd_cnt : 0,
	};
	if (c)
		c->fwd_told = c->fwd_cnt;
	vmm_chain_write(&vs->chain, 0, &h, HDR);
	vmm_chain_mark_written(q, &vs->chain);
	vmm_virtq_push(q, vs->chain.head, HDR + len);
	v->st.rx_frames++;
	v->st.requests++;
	if (op == OP_RST)
		v->st.resets++;
}

/* 1 sent, 0 no buffer (try again later), -1 device failed. */
static int send_ctl(struct vmm_vsock *vs, struct vmm_vsock_conn *c, uint32_t src_port,
		    uint32_t dst_port, uint16_t op, uint32_t flags)
{
	int r = rx_chain(vs);
	if (r > 0)
		rx_complete(vs, c, src_port, dst_port, op, flags, 0);
	return r;
}

static const struct { uint32_t bit; uint16_t op; } CTL_ORDER[] = {
	{ P_REQUEST, OP_REQUEST }, { P_RESPONSE, OP_RESPONSE },
	{ P_CREDIT_UPDATE, OP_CREDIT_UPDATE }, { P_CREDIT_REQUEST, OP_CREDIT_REQUEST },
	{ P_SHUTDOWN, OP_SHUTDOWN }, { P_RST, OP_RST },
};

/* Send what c owes the guest, in order; 0 when all went, else stop. */
static int flush_conn(struct vmm_vsock *vs, struct vmm_vsock_conn *c)
{
	for (unsigned i = 0; i < sizeof(CTL_ORDER) / sizeof(CTL_ORDER[0]) && c->pending; i++) {
		if (!(c->pending & CTL_ORDER[i].bit))
			continue;
		uint32_t flags = CTL_ORDER[i].op == OP_SHUTDOWN ? SHUT_SEND : 0;
		int r = send_ctl(vs, c, c->host_port, c->guest_port, CTL_ORDER[i].op, flags);
		if (r <= 0)
			return -1;
		c->pending &= ~CTL_ORDER[i].bit;
		if (CTL_ORDER[i].op == OP_RST) {
			close_conn(vs, c);
			return 0;
		}
	}
	update_interest(vs, c);
	return 0;
}

/* Everything owed: the transport reset event, RSTs for packets of no
 * connection, each connection's control packets. */
static void flush_all(struct vmm_vsock *vs)
{
	struct vmm_virtio *v = &vs->transport;
	if (vs->reset_event && device_ready(v)) {
		struct vmm_virtq *q = &v->q[VMM_VSOCK_EVQ];
		int r = vmm_virtq_pop(q, v->mem, &vs->chain);
		if (r < 0 || (r > 0 && (vs->chain.readable_len || vs->chain.writable_len < 4))) {
			vmm_virtio_fail(v);
		} else if (r > 0) {
			uint32_t id = EVENT_TRANSPORT_RESET;
			vmm_chain_write(&vs->chain, 0, &id, 4);
			vmm_chain_mark_written(q, &vs->chain);
			vmm_virtq_push(q, vs->chain.head, 4);
			vmm_virtio_signal_used(v, VMM_VSOCK_EVQ);
			vs->reset_event = 0;
		}
	}
	while (vs->nrst) {
		int i = vs->nrst - 1;
		if (send_ctl(vs, NULL, vs->rst[i].src, vs->rst[i].dst, OP_RST, 0) <= 0)
			break;
		vs->nrst--;
	}
	for (int i = 0; i < VMM_VSOCK_MAX_CONNS; i++)
		if (vs->conn[i].pending && flush_conn(vs, &vs->conn[i]))
			break;
}

/* ---- from the host: data into RX chains ---- */
/* iov for bytes [off, off + len) of vs->chain's writable part; count. */
static int chain_slice(const struct vmm_chain *ch, uint64_t off, uint64_t len, struct iovec *iov)
{
	int n = 0;
	for (int i = ch->nseg - ch->nwritable; i < ch->nseg && len; i++) {
		uint64_t sl = ch->seg[i].iov_len;
		if (off >= sl) {
			off -= sl;
			continue;
		}
		uint64_t take = sl - off < len ? sl - off : len;
		iov[n].iov_base = (uint8_t *)ch->seg[i].iov_base + off;
		iov[n].iov_len = take;
		n++;
		len -= take;
		off = 0;
	}
	return n;
}

/* One packet of host bytes to the guest, within its credit. */
static void host_readable(struct vmm_vsock *vs, struct vmm_vsock_conn *c)
{
	struct vmm_virtio *v = &vs->transport;
	uint32_t credit = peer_credit(c);
	if (!credit) {
		c->pending |= P_CREDIT_REQUEST;	/* the guest is slow: ask, stop reading */
		return;
	}
	int r = rx_chain(vs);
	if (r <= 0) {
		c->rx_wait = r == 0;
		return;
	}
	uint64_t room = vs->chain.writable_len - HDR;
	if (room == 0) {	/* a header-only buffer: tell the guest our credit in it */
		rx_complete(vs, c, c->host_port, c->guest_port, OP_CREDIT_UPDATE, 0, 0);
		return;
	}
	uint64_t want = room < credit ? room : credit;
	want = want < MAX_PKT ? want : MAX_PKT;
	int n = chain_slice(&vs->chain, HDR, want, vs->iov);
	ssize_t got;
	do {
		got = readv(c->fd, vs->iov, n);
	} while (got < 0 && errno == EINTR);
	if (got < 0 && errno == EFAULT)
		vmm_guard_probe(vs->iov, n);	/* a page vanished: faults, see guard.h */
	if (got <= 0) {
		rx_put_back(vs);
		if (got == 0) {
			c->host_eof = 1;	/* the host sends no more: tell the guest */
			c->pending |= P_SHUTDOWN;
		} else if (errno != EAGAIN) {
			v->st.io_errors++;
			reset_conn(vs, c);
		}
		return;
	}
	rx_complete(vs, c, c->host_port, c->guest_port, OP_RW, 0, (uint32_t)got);
	c->tx_cnt += (uint32_t)got;
	v->st.bytes_read += (uint64_t)got;
	if (!peer_credit(c))
		c->pending |= P_CREDIT_REQUEST;	/* used it all up: reading stops until it says */
}

/* ---- to the host: the guest's bytes ---- */
static ssize_t send_iov(int fd, struct iovec *iov, int n)
{
	struct msghdr m = { .msg_iov = iov, .msg_iovlen = (size_t)n };
	ssize_t w;
	do {
		w = sendmsg(fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
	} while (w < 0 && errno == EINTR);
	return w;
}

/* The guest took some credit back: tell it when it runs low on it. */
static void maybe_credit_update(struct vmm_vsock_conn *c)
{
	uint32_t guest_view_free = VMM_VSOCK_BUF - (c->rx_cnt - c->fwd_told);
	if (c->fwd_cnt != c->fwd_told && guest_view_free < VMM_VSOCK_BUF / 2)
		c->pending |= P_CREDIT_UPDATE;
}

/* The guest's SHUTDOWN takes effect once its bytes reached the host. */
static void apply_guest_shutdown(struct vmm_vsock *vs, struct vmm_vsock_conn *c)
{
	if (c->len)
		return;
	if (c->guest_shut == (SHUT_RCV | SHUT_SEND))
		reset_conn(vs, c);	/* both ways closed: RST ends it, as Linux peers do */
	else if (c->guest_shut & SHUT_SEND)
		shutdown(c->fd, SHUT_WR);
}

static void host_writable(struct vmm_vsock *vs, struct vmm_vsock_conn *c)
{
	while (c->len) {
		struct iovec iov[2];
		uint32_t first = VMM_VSOCK_BUF - c->head < c->len ? VMM_VSOCK_BUF - c->head : c->len;
		iov[0] = (struct iovec){ c->buf + c->head, first };
		iov[1] = (struct iovec){ c->buf, c->len - first };
		ssize_t w = send_iov(c->fd, iov, c->len > first ? 2 : 1);
		if (w < 0 && errno == EAGAIN)
			break;
		if (w <= 0) {
			vs->transport.st.io_errors++;
			reset_conn(vs, c);	/* the host went away */
			return;
		}
		c->head = (c->head + (uint32_t)w) % VMM_VSOCK_BUF;
		c->len -= (uint32_t)w;
		c->fwd_cnt += (uint32_t)w;
	}
	maybe_credit_update(c);
	apply_guest_shutdown(vs, c);
}

/* An RW packet's payload: straight to the host while nothing waits before
 * it, the rest into the connection's ring (the credit check made room). */
static void guest_data(struct vmm_vsock *vs, struct vmm_vsock_conn *c, uint32_t len)
{
	struct vmm_chain *ch = &vs->chain;
	uint32_t done = 0;
	c->rx_cnt += len;
	vs->transport.st.bytes_written += len;
	if (!c->len) {
		/* the payload is readable bytes [HDR, HDR + len) */
		int n = 0;
		uint64_t off = HDR, left = len;
		for (int i = 0; i < ch->nseg - ch->nwritable && left; i++) {
			uint64_t sl = ch->seg[i].iov_len;
			if (off >= sl) {
				off -= sl;
				continue;
			}
			uint64_t take = sl - off < left ? sl - off : left;
			vs->iov[n++] = (struct iovec){ (uint8_t *)ch->seg[i].iov_base + off, take };
			left -= take;
			off = 0;
		}
		ssize_t w = send_iov(c->fd, vs->iov, n);
		if (w < 0 && errno == EFAULT)
			vmm_guard_probe(vs->iov, n);
		if (w < 0 && errno != EAGAIN) {
			vs->transport.st.io_errors++;
			reset_conn(vs, c);
			return;
		}
		done = w > 0 ? (uint32_t)w : 0;
		c->fwd_cnt += done;
	}
	if (done < len) {
		if (!c->buf && !(c->buf = malloc(VMM_VSOCK_BUF))) {
			vs->transport.st.io_errors++;
			reset_conn(vs, c);
			return;
		}
		uint32_t tail = (c->head + c->len) % VMM_VSOCK_BUF, rest = len - done;
		uint32_t first = VMM_VSOCK_BUF - tail < rest ? VMM_VSOCK_BUF - tail : rest;
		vmm_chain_read(ch, HDR + done, c->buf + tail, first);
		vmm_chain_read(ch, HDR + done + first, c->buf, rest - first);
		c->len += rest;
	}
	maybe_credit_update(c);
}

/* ---- from the guest: the TX queue ---- */
/* A guest connect to host port p: "<name>_<p>" in the directory.  The
 * working directory is per thread after unshare(CLONE_FS) (a no-op when
 * already unshared), so this works in a cell's jail, avoids the path's
 * other components (symlinks) and sun_path's 108 bytes. */
static int connect_host(struct vmm_vsock *vs, uint32_t port)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	snprintf(a.sun_path, sizeof(a.sun_path), "%s_%u", vs->name, port);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (unshare(CLONE_FS) < 0 || fchdir(vs->dir_fd) < 0 ||
	    connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
		int e = -errno;
		close(fd);
		return e;
	}
	return fd;
}

static void owe_rst(struct vmm_vsock *vs, const struct hdr *h)
{
	if (h->op == OP_RST)
		return;	/* never answer an RST */
	if (vs->nrst < VMM_VSOCK_MAX_RST)
		vs->rst[vs->nrst++] = (typeof(vs->rst[0])){ h->dst_port, h->src_port };
	/* else: the guest floods us with strays; it gets no answer to the rest */
}

static void bad_packet(struct vmm_vsock *vs, struct vmm_vsock_conn *c, const struct hdr *h)
{
	vs->transport.st.bad_packets++;
	if (c)
		reset_conn(vs, c);
	else
		owe_rst(vs, h);
}

static void guest_request(struct vmm_vsock *vs, const struct hdr *h)
{
	struct vmm_vsock_conn *c = alloc_conn(vs);
	int fd = c ? connect_host(vs, h->dst_port) : -ENOSPC;
	if (fd < 0) {
		vs->transport.st.io_errors++;
		owe_rst(vs, h);	/* nobody listens (or no room): the guest's connect fails */
		return;
	}
	/* Counters are free-running: ours start where the guest's fwd_cnt does,
	 * so nothing is in flight (a REQUEST's fwd_cnt is the guest's to pick). */
	*c = (struct vmm_vsock_conn){
		.state = C_OPEN, .fd = fd, .host_port = h->dst_port, .guest_port = h->src_port,
		.pending = P_RESPONSE, .peer_buf_alloc = h->buf_alloc, .peer_fwd_cnt = h->fwd_cnt,
		.tx_cnt = h->fwd_cnt,
	};
	vs->transport.st.connections++;
}

/* The guest accepted a host client's connection: tell the client. */
static void guest_response(struct vmm_vsock *vs, struct vmm_vsock_conn *c)
{
	char ok[24];
	int n = snprintf(ok, sizeof(ok), "OK %u\n", c->host_port);
	struct iovec iov = { ok, (size_t)n };
	if (send_iov(c->fd, &iov, 1) != n) {	/* a fresh socket takes a line */
		vs->transport.st.io_errors++;
		reset_conn(vs, c);
		return;
	}
	c->state = C_OPEN;
	vs->transport.st.connections++;
}

static void guest_packet(struct vmm_vsock *vs, const struct hdr *h, uint64_t payload_room)
{
	struct vmm_vsock_conn *c = find(vs, h->dst_port, h->src_port);
	if (c && c->state == C_RESET)
		c = NULL;	/* its RST is on the way: strays get one of their own */
	if (h->src_cid != vs->guest_cid || h->dst_cid != HOST_CID || h->type != TYPE_STREAM ||
	    h->len > payload_room || h->len > MAX_PKT || (h->op != OP_RW && h->len)) {
		bad_packet(vs, c, h);
		return;
	}
	if (h->op == OP_REQUEST) {
		if (c)
			bad_packet(vs, c, h);	/* a second REQUEST on an open connection */
		else
			guest_request(vs, h);
		return;
	}
	if (!c) {
		owe_rst(vs, h);	/* no such connection (any more): RST, as Linux does */
		return;
	}
	if (h->op == OP_RST) {
		close_conn(vs, c);
		return;
	}
	/* The guest cannot have forwarded more than we sent it. */
	if ((uint32_t)(h->fwd_cnt - c->peer_fwd_cnt) > (uint32_t)(c->tx_cnt - c->peer_fwd_cnt)) {
		bad_packet(vs, c, h);
		return;
	}
	c->peer_buf_alloc = h->buf_alloc;
	c->peer_fwd_cnt = h->fwd_cnt;
	switch (h->op) {
	case OP_RESPONSE:
		if (c->state != C_REQUEST || (c->pending & P_REQUEST))
			bad_packet(vs, c, h);
		else
			guest_response(vs, c);
		break;
	case OP_RW:
		if (c->state != C_OPEN || (c->guest_shut & SHUT_SEND) || h->len > buffered_free(c))
			bad_packet(vs, c, h);	/* data before open, after SHUTDOWN, or over credit */
		else
			guest_data(vs, c, h->len);
		break;
	case OP_SHUTDOWN:
		if (c->state != C_OPEN || (h->flags & ~(uint32_t)(SHUT_RCV | SHUT_SEND))) {
			bad_packet(vs, c, h);
			return;
		}
		c->guest_shut |= h->flags;
		apply_guest_shutdown(vs, c);
		break;
	case OP_CREDIT_UPDATE:
		break;	/* the credit fields above are the update */
	case OP_CREDIT_REQUEST:
		c->pending |= P_CREDIT_UPDATE;
		break;
	default:
		bad_packet(vs, c, h);
		return;
	}
	if (c->state != C_RESET)
		update_interest(vs, c);
}

static void tx(struct vmm_vsock *vs)
{
	struct vmm_virtio *v = &vs->transport;
	struct vmm_virtq *q = &v->q[VMM_VSOCK_TXQ];
	int any = 0;
	for (;;) {
		int r = vmm_virtq_pop(q, v->mem, &vs->chain);
		if (r == 0)
			break;
		/* A TX chain is header + payload, all device-readable. */
		if (r < 0 || vs->chain.nwritable || vs->chain.readable_len < HDR) {
			vmm_virtio_fail(v);
			break;
		}
		struct hdr h;
		vmm_chain_read(&vs->chain, 0, &h, HDR);	/* one copy: the guest may race us */
		v->st.tx_frames++;
		v->st.requests++;
		guest_packet(vs, &h, vs->chain.readable_len - HDR);
		vmm_virtq_push(q, vs->chain.head, 0);
		any = 1;
	}
	if (any)
		vmm_virtio_signal_used(v, VMM_VSOCK_TXQ);
}

/* ---- host clients: accept, then the CONNECT line, within CONNECT_TICKS ---- */
static void set_timer(struct vmm_vsock *vs, int on)
{
	if (vs->timer_on == on)
		return;
	struct itimerspec its = { 0 };
	if (on)
		its.it_value = its.it_interval = (struct timespec){ 0, TICK_MS * 1000000L };
	if (timerfd_settime(vs->timer_fd, 0, &its, NULL) == 0)
		vs->timer_on = on;
}

/* A tick: clients still waiting (their line, or the guest's answer) age;
 * too old, they go (a REQUEST the guest never answered is cancelled by
 * RST).  The timer runs only while someone waits. */
static void tick(struct vmm_vsock *vs)
{
	uint64_t n;
	int waiting = 0;
	if (read(vs->timer_fd, &n, sizeof(n)) < 0) {
		/* spurious */
	}
	for (int i = 0; i < VMM_VSOCK_MAX_CONNS; i++) {
		struct vmm_vsock_conn *c = &vs->conn[i];
		if (c->state != C_LINE && c->state != C_REQUEST)
			continue;
		if (++c->age < CONNECT_TICKS) {
			waiting = 1;
			continue;
		}
		vs->transport.st.io_errors++;
		if (c->state == C_LINE || (c->pending & P_REQUEST))
			close_conn(vs, c);	/* the guest never heard of it */
		else
			reset_conn(vs, c);
	}
	set_timer(vs, waiting);
}

static void accept_clients(struct vmm_vsock *vs)
{
	for (int i = 0; i < ACCEPTS_PER_ROUND; i++) {
		int fd = accept4(vs->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0)
			return;
		struct vmm_vsock_conn *c = alloc_conn(vs);
		if (!c) {
			vs->transport.st.io_errors++;
			close(fd);	/* full: the client sees EOF */
			continue;
		}
		*c = (struct vmm_vsock_conn){ .state = C_LINE, .fd = fd };
		update_interest(vs, c);
		set_timer(vs, 1);
	}
}

/* "CONNECT <port>\n": decimal, 1 to 10 digits, at most 2^32 - 1. */
static int parse_connect(const char *s, int len, uint32_t *port)
{
	static const char word[] = "CONNECT ";
	int w = (int)sizeof(word) - 1, digits = len - w - 1;
	if (len < w + 2 || memcmp(s, word, (size_t)w) || s[len - 1] != '\n' || digits > 10)
		return -1;
	uint64_t p = 0;
	for (int i = w; i < len - 1; i++) {
		if (s[i] < '0' || s[i] > '9')
			return -1;
		p = p * 10 + (uint64_t)(s[i] - '0');
	}
	if (p > 0xffffffffu)
		return -1;
	*port = (uint32_t)p;
	return 0;
}

static uint32_t fresh_port(struct vmm_vsock *vs, uint32_t guest_port)
{
	for (;;) {
		uint32_t p = vs->next_port++;
		if (vs->next_port < FIRST_HOST_PORT)
			vs->next_port = FIRST_HOST_PORT;
		if (!find(vs, p, guest_port))
			return p;	/* at most MAX_CONNS ports are taken: this ends */
	}
}

/* Read the line up to its newline only: what follows is the stream's. */
static void client_line(struct vmm_vsock *vs, struct vmm_vsock_conn *c)
{
	char peek[VMM_VSOCK_LINE_MAX];
	int room = VMM_VSOCK_LINE_MAX - c->line_len;
	ssize_t n = recv(c->fd, peek, (size_t)room, MSG_PEEK);
	if (n < 0 && errno == EAGAIN)
		return;
	char *nl = n > 0 ? memchr(peek, '\n', (size_t)n) : NULL;
	ssize_t take = nl ? nl - peek + 1 : n;
	if (n <= 0 || (!nl && n == room) || recv(c->fd, c->line + c->line_len, (size_t)take, 0) != take) {
		close_conn(vs, c);	/* gone, or no line: the client gets EOF */
		return;
	}
	c->line_len += (int)take;
	if (!nl)
		return;
	uint32_t port;
	if (parse_connect(c->line, c->line_len, &port)) {
		close_conn(vs, c);
		return;
	}
	c->guest_port = port;
	c->host_port = fresh_port(vs, port);
	c->state = C_REQUEST;
	c->pending = P_REQUEST;
	c->peer_buf_alloc = 0;	/* no credit until the guest's RESPONSE says */
	update_interest(vs, c);
}

static void conn_event(struct vmm_vsock *vs, struct vmm_vsock_conn *c, uint32_t events)
{
	if (c->state == C_LINE) {
		client_line(vs, c);
		return;
	}
	if (c->state != C_OPEN)
		return;
	if (events & EPOLLOUT)
		host_writable(vs, c);
	if (c->state == C_OPEN && (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && (c->ev & EPOLLIN))
		host_readable(vs, c);
	if (c->state == C_OPEN)
		update_interest(vs, c);
}

/* Connections that waited for RX buffers may go on. */
static void rx_resume(struct vmm_vsock *vs)
{
	if (!vs->rx_wait)
		return;
	vs->rx_wait = 0;
	for (int i = 0; i < VMM_VSOCK_MAX_CONNS; i++) {
		struct vmm_vsock_conn *c = &vs->conn[i];
		if (c->rx_wait) {
			c->rx_wait = 0;
			update_interest(vs, c);
		}
	}
}

static void finish(struct vmm_vsock *vs)
{
	flush_all(vs);
	vmm_virtio_signal_used(&vs->transport, VMM_VSOCK_RXQ);
}

static void backend_ready(struct vmm_virtio *v)
{
	struct vmm_vsock *vs = (struct vmm_vsock *)v;
	struct epoll_event evs[64];
	int n = epoll_wait(vs->ep_fd, evs, 64, 0);
	for (int i = 0; i < n; i++) {
		uint64_t tag = evs[i].data.u64;
		if (tag == TAG_LISTEN) {
			accept_clients(vs);
		} else if (tag == TAG_WAKE) {
			uint64_t cnt;
			if (read(vs->wake_fd, &cnt, sizeof(cnt)) < 0) {
				/* already drained */
			}
		} else if (tag == TAG_TIMER) {
			tick(vs);
		} else if (tag < VMM_VSOCK_MAX_CONNS) {
			conn_event(vs, &vs->conn[tag], evs[i].events);
		}
	}
	finish(vs);
}

static void queue_notify(struct vmm_virtio *v, uint32_t qi)
{
	struct vmm_vsock *vs = (struct vmm_vsock *)v;
	if (qi == VMM_VSOCK_TXQ)
		tx(vs);
	else if (qi == VMM_VSOCK_RXQ)
		rx_resume(vs);
	finish(vs);	/* RX buffers or event buffers may be what was owed */
}

static void close_all(struct vmm_vsock *vs)
{
	for (int i = 0; i < VMM_VSOCK_MAX_CONNS; i++)
		if (vs->conn[i].state != C_FREE)
			close_conn(vs, &vs->conn[i]);
	vs->nrst = 0;
	vs->rx_wait = 0;
}

/* A device reset forgets every connection (the driver's sockets are gone). */
static void vsock_reset(void *priv)
{
	struct vmm_vsock *vs = priv;
	close_all(vs);
	vs->reset_event = 0;
}

static void driver_ok(struct vmm_virtio *v)
{
	finish((struct vmm_vsock *)v);	/* host clients that came early get their REQUEST */
}

/* From a snapshot: no connection survives (the fds are not in it); the
 * guest hears TRANSPORT_RESET once it runs - the wake fd makes the I/O
 * thread call backend_ready then.  No guest memory touched here. */
static void restored(struct vmm_virtio *v)
{
	struct vmm_vsock *vs = (struct vmm_vsock *)v;
	uint64_t one = 1;
	close_all(vs);
	vs->reset_event = 1;
	if (write(vs->wake_fd, &one, sizeof(one)) < 0) {
		/* counter full: it is readable anyway */
	}
}

static void vsock_destroy(struct vmm_virtio *v)
{
	vmm_vsock_destroy((struct vmm_vsock *)v);
}

static const struct vmm_virtio_ops vsock_ops = {
	.device_id = VIRTIO_ID_VSOCK, .num_queues = 3, .features = 0,
	.config_read = config_read, .queue_notify = queue_notify, .reset = vsock_reset,
	.driver_ok = driver_ok, .destroy = vsock_destroy, .backend_ready = backend_ready,
	.restored = restored,
};

static int watch(int ep, int fd, uint64_t tag)
{
	struct epoll_event e = { .events = EPOLLIN, .data.u64 = tag };
	return epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e) < 0 ? -errno : 0;
}

int vmm_vsock_create(const struct vmm_mem *mem, uint64_t guest_cid, int listen_fd, int dir_fd,
		     const char *name, struct vmm_vsock **out)
{
	if (listen_fd < 0 || dir_fd < 0)
		return -EBADF;
	size_t nl = name ? strnlen(name, VMM_VSOCK_NAME_MAX + 1) : 0;
	if (guest_cid <= HOST_CID || guest_cid > 0xfffffffeull || nl == 0 ||
	    nl > VMM_VSOCK_NAME_MAX || memchr(name, '/', nl) || !strcmp(name, ".") ||
	    !strcmp(name, ".."))
		return -EINVAL;
	struct vmm_vsock *vs = calloc(1, sizeof(*vs));
	if (!vs)
		return -ENOMEM;
	vs->guest_cid = guest_cid;
	memcpy(vs->name, name, nl);
	vs->next_port = FIRST_HOST_PORT;
	for (int i = 0; i < VMM_VSOCK_MAX_CONNS; i++)
		vs->conn[i].fd = -1;
	vs->listen_fd = fcntl(listen_fd, F_DUPFD_CLOEXEC, 0);
	vs->dir_fd = fcntl(dir_fd, F_DUPFD_CLOEXEC, 0);
	vs->ep_fd = epoll_create1(EPOLL_CLOEXEC);
	vs->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	vs->timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
	int r = vs->listen_fd < 0 || vs->dir_fd < 0 || vs->ep_fd < 0 || vs->wake_fd < 0 ||
		vs->timer_fd < 0 ? -errno : 0;
	/* accept4 must not block: the listener is the broker's, make ours sure */
	if (!r && fcntl(vs->listen_fd, F_SETFL, fcntl(vs->listen_fd, F_GETFL) | O_NONBLOCK) < 0)
		r = -errno;
	if (!r)
		r = watch(vs->ep_fd, vs->listen_fd, TAG_LISTEN);
	if (!r)
		r = watch(vs->ep_fd, vs->wake_fd, TAG_WAKE);
	if (!r)
		r = watch(vs->ep_fd, vs->timer_fd, TAG_TIMER);
	vmm_virtio_init(&vs->transport, &vsock_ops, vs, mem);
	if (r) {
		vmm_vsock_destroy(vs);
		return r;
	}
	vs->transport.backend_fd = vs->ep_fd;
	*out = vs;
	return 0;
}

void vmm_vsock_destroy(struct vmm_vsock *vs)
{
	if (!vs)
		return;
	close_all(vs);
	int fds[] = { vs->listen_fd, vs->dir_fd, vs->ep_fd, vs->wake_fd, vs->timer_fd };
	for (unsigned i = 0; i < sizeof(fds) / sizeof(fds[0]); i++)
		if (fds[i] >= 0)
			close(fds[i]);
	pthread_mutex_destroy(&vs->transport.lock);
	free(vs);
}

int vmm_virtio_vsock_new(struct vmm_mem *mem, uint64_t guest_cid, int listen_fd, int dir_fd,
			 const char *name, struct vmm_virtio **out)
{
	struct vmm_vsock *vs;
	int r = vmm_vsock_create(mem, guest_cid, listen_fd, dir_fd, name, &vs);
	if (!r)
		*out = &vs->transport;
	return r;
}

int vmm_virtio_backend_fd(struct vmm_virtio *v)
{
	return v->backend_fd;
}
