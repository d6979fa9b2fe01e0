/*
 * virtio_net.c - virtio-net RX/TX between a tap fd and guest buffers.
 *
 * Every buffer comes from a chain the virtqueue code already checked
 * against guest RAM; lengths written back are what the tap gave us.  The
 * guest's virtio-net header (flags, GSO type and sizes) goes to the tap
 * as it is: the tap validates it and refuses a bad one (counted as a TX
 * drop), so a hostile header costs the guest its frame, nothing more.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/if_tun.h>

#include "guard.h"
#include "virtio_net.h"

enum {
	VIRTIO_ID_NET = 1,
	F_CSUM = 0, F_GUEST_CSUM = 1, F_MAC = 5, F_GUEST_TSO4 = 7, F_GUEST_TSO6 = 8,
	F_GUEST_ECN = 9, F_GUEST_UFO = 10, F_HOST_TSO4 = 11, F_HOST_TSO6 = 12,
	F_HOST_ECN = 13, F_HOST_UFO = 14, F_MRG_RXBUF = 15, F_STATUS = 16,
	HDR = 12,		/* struct virtio_net_hdr_v1 */
	NUM_BUFFERS_OFF = 10,	/* its num_buffers field */
	LINK_UP = 1,
	MAX_FRAME = 65550 + HDR,	/* a GSO frame plus the header */
	ST_DRIVER_OK = 4,
};

#define BIT(f) (1ull << (f))
#define OFFERED (BIT(F_CSUM) | BIT(F_GUEST_CSUM) | BIT(F_MAC) | BIT(F_GUEST_TSO4) | \
		 BIT(F_GUEST_TSO6) | BIT(F_GUEST_ECN) | BIT(F_GUEST_UFO) | BIT(F_HOST_TSO4) | \
		 BIT(F_HOST_TSO6) | BIT(F_HOST_ECN) | BIT(F_HOST_UFO) | BIT(F_MRG_RXBUF) | \
		 BIT(F_STATUS))

static void config_read(void *priv, uint64_t off, uint8_t *data, uint32_t len)
{
	struct vmm_net *n = priv;
	struct { uint8_t mac[6]; uint16_t status; uint16_t max_pairs; } __attribute__((packed)) cfg;
	memcpy(cfg.mac, n->mac, 6);
	cfg.status = LINK_UP;
	cfg.max_pairs = 1;
	/* off and len are guest-controlled */
	if (off < sizeof(cfg))
		memcpy(data, (uint8_t *)&cfg + off, len < sizeof(cfg) - off ? len : sizeof(cfg) - off);
}

static void tx(struct vmm_virtio *v)
{
	struct vmm_net *n = (struct vmm_net *)v;
	struct vmm_virtq *q = &v->q[VMM_NET_TXQ];
	struct vmm_chain c;
	for (;;) {
		int r = vmm_virtq_pop(q, v->mem, &c);
		if (r == 0)
			break;
		/* A TX chain is header + frame, all device-readable. */
		if (r < 0 || c.readable_len < HDR || c.nwritable) {
			vmm_virtio_fail(v);
			break;
		}
		/* The chain is exactly what IFF_VNET_HDR takes: one writev. */
		ssize_t w;
		do {
			w = writev(n->tap_fd, c.seg, c.nseg);
		} while (w < 0 && errno == EINTR);
		if (w < 0 && errno == EFAULT)
			vmm_guard_probe(c.seg, c.nseg);	/* a page vanished: faults, see guard.h */
		if (w < 0) {
			v->st.io_errors++;	/* tap full, gone or header refused: dropped */
		} else {
			v->st.bytes_written += c.readable_len - HDR;
			v->st.tx_frames++;
		}
		v->st.requests++;
		vmm_virtq_push(q, c.head, 0);
	}
	vmm_virtio_signal_used(v, VMM_NET_TXQ);
}

/* Stop or restart reading the tap; a stopped tap keeps its frames queued. */
static void set_polling(struct vmm_net *n, int on)
{
	if (n->rx_blocked != !on) {
		n->rx_blocked = !on;
		vmm_virtio_poll_backend(&n->transport, on);
	}
}

/* Take chains until one frame of any size fits (one chain without
 * MRG_RXBUF); returns how many, 0 when the guest has no buffers, -1 for a
 * bad chain (the device then needs reset). */
static int gather(struct vmm_net *n, int *niov, uint64_t *room)
{
	struct vmm_virtio *v = &n->transport;
	struct vmm_virtq *q = &v->q[VMM_NET_RXQ];
	int mergeable = !!(v->driver_features & BIT(F_MRG_RXBUF));
	int k = 0;
	*niov = 0;
	*room = 0;
	while (k < VMM_NET_MAX_RX_CHAINS && *room < n->rx_need && (k == 0 || mergeable)) {
		struct vmm_chain *c = &n->rx[k];
		int r = vmm_virtq_pop(q, v->mem, c);
		if (r == 0)
			break;
		if (r < 0 || c->readable_len || c->writable_len < (k == 0 ? HDR : 1) ||
		    *niov + c->nwritable > (int)(sizeof(n->rx_iov) / sizeof(n->rx_iov[0]))) {
			vmm_virtio_fail(v);
			return -1;
		}
		memcpy(&n->rx_iov[*niov], c->seg, sizeof(struct iovec) * (size_t)c->nwritable);
		*niov += c->nwritable;
		*room += c->writable_len;
		k++;
	}
	return k;
}

/* Move frames from the tap to the guest until either runs dry. */
static void rx(struct vmm_net *n)
{
	struct vmm_virtio *v = &n->transport;
	struct vmm_virtq *q = &v->q[VMM_NET_RXQ];
	int delivered = 0;
	if (!(v->status & ST_DRIVER_OK) || (v->status & VMM_VIRTIO_STATUS_NEEDS_RESET) ||
	    !q->ready) {
		set_polling(n, 0);	/* DRIVER_OK or an RX notify starts it again */
		return;
	}
	for (;;) {
		int niov;
		uint64_t room;
		int k = gather(n, &niov, &room);
		if (k <= 0) {
			set_polling(n, 0);	/* no buffers (or a bad chain): frames wait */
			break;
		}
		ssize_t got;
		do {
			got = readv(n->tap_fd, n->rx_iov, niov);
		} while (got < 0 && errno == EINTR);
		if (got < 0 && errno == EFAULT)
			vmm_guard_probe(n->rx_iov, niov);	/* a page vanished: faults, see guard.h */
		if (got <= 0) {
			q->last_avail -= (uint16_t)k;	/* tap empty: give the chains back */
			break;
		}
		/* Fill chains in order; the header's num_buffers says how many. */
		uint64_t left = (uint64_t)got;
		uint16_t used = 0;
		for (int i = 0; i < k && left; i++) {
			uint64_t take = left < n->rx[i].writable_len ? left : n->rx[i].writable_len;
			vmm_chain_mark_written(q, &n->rx[i]);
			vmm_virtq_push(q, n->rx[i].head, (uint32_t)take);
			left -= take;
			used++;
		}
		q->last_avail -= (uint16_t)(k - used);	/* unused chains go back to the ring */
		vmm_chain_write(&n->rx[0], NUM_BUFFERS_OFF, &used, 2);
		v->st.requests++;
		v->st.rx_frames++;
		v->st.bytes_read += (uint64_t)got > HDR ? (uint64_t)got - HDR : 0;
		delivered = 1;
	}
	if (delivered)
		vmm_virtio_signal_used(v, VMM_NET_RXQ);
}

static void queue_notify(struct vmm_virtio *v, uint32_t qi)
{
	struct vmm_net *n = (struct vmm_net *)v;
	if (qi == VMM_NET_TXQ) {
		tx(v);
		return;
	}
	/* New RX buffers matter only to a device that ran out: while the tap
	 * is polled, its next frame finds them anyway (no readv for nothing). */
	if (n->rx_blocked) {
		set_polling(n, 1);
		rx(n);
	}
}

/* What the tap may send us: only the offloads the guest accepted.  Without
 * GSO a frame is at most the tap's MTU (plus Ethernet and VLAN headers). */
static void apply_offloads(struct vmm_virtio *v)
{
	struct vmm_net *n = (struct vmm_net *)v;
	uint64_t f = v->driver_features;
	uint32_t off = 0;
	if (f & BIT(F_GUEST_CSUM)) {
		off |= TUN_F_CSUM;
		off |= (f & BIT(F_GUEST_TSO4)) ? TUN_F_TSO4 : 0;
		off |= (f & BIT(F_GUEST_TSO6)) ? TUN_F_TSO6 : 0;
		off |= (f & BIT(F_GUEST_ECN)) ? TUN_F_TSO_ECN : 0;
		off |= (f & BIT(F_GUEST_UFO)) ? TUN_F_UFO : 0;
	}
	/* Fails only on a non-tap fd (tests); a tap then keeps its defaults:
	 * no offloads, which every guest can take. */
	if (ioctl(n->tap_fd, TUNSETOFFLOAD, (unsigned long)off) == 0)
		n->tap_offloads = off;
	n->rx_need = (n->tap_offloads & (TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO)) ? MAX_FRAME
		     : n->rx_need_plain;
}

static void driver_ok(struct vmm_virtio *v)
{
	struct vmm_net *n = (struct vmm_net *)v;
	apply_offloads(v);
	set_polling(n, 1);
	rx(n);
}

static void backend_ready(struct vmm_virtio *v)
{
	rx((struct vmm_net *)v);
}

static void net_reset(void *priv)
{
	set_polling(priv, 0);	/* nothing to deliver to until DRIVER_OK again */
}

static void net_destroy(struct vmm_virtio *v)
{
	vmm_net_destroy((struct vmm_net *)v);
}

static const struct vmm_virtio_ops net_ops = {
	.device_id = VIRTIO_ID_NET, .num_queues = 2, .features = OFFERED,
	.config_read = config_read, .queue_notify = queue_notify, .reset = net_reset,
	.driver_ok = driver_ok, .destroy = net_destroy, .backend_ready = backend_ready,
	.restored = apply_offloads,	/* the tap is polled again once the VM runs */
};

int vmm_net_create(const struct vmm_mem *mem, int tap_fd, const uint8_t mac[6],
		   uint32_t max_frame, struct vmm_net **out)
{
	if (tap_fd < 0)
		return -EBADF;
	struct vmm_net *n = calloc(1, sizeof(*n));
	if (!n)
		return -ENOMEM;
	n->tap_fd = tap_fd;
	memcpy(n->mac, mac, 6);
	/* max_frame 0: unknown (not a tap): assume the worst. */
	n->rx_need_plain = max_frame && max_frame + HDR < MAX_FRAME ? max_frame + HDR : MAX_FRAME;
	n->rx_need = n->rx_need_plain;
	vmm_virtio_init(&n->transport, &net_ops, n, mem);
	n->transport.backend_fd = tap_fd;
	*out = n;
	return 0;
}

void vmm_net_destroy(struct vmm_net *n)
{
	if (!n)
		return;
	pthread_mutex_destroy(&n->transport.lock);
	free(n);	/* the tap fd belongs to whoever opened it */
}

int vmm_virtio_net_new(struct vmm_mem *mem, int tap_fd, const uint8_t *mac,
		       uint32_t max_frame, struct vmm_virtio **out)
{
	struct vmm_net *n;
	int r = vmm_net_create(mem, tap_fd, mac, max_frame, &n);
	if (!r)
		*out = &n->transport;
	return r;
}
