/*
 * virtio_net.c - virtio-net RX/TX between a tap fd and guest buffers.
 *
 * Every buffer comes from a chain the virtqueue code already checked
 * against guest RAM; lengths written back are what the tap gave us.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "virtio_net.h"

enum {
	VIRTIO_ID_NET = 1,
	F_CSUM = 0, F_GUEST_CSUM = 1, F_MAC = 5, F_GUEST_TSO4 = 7, F_GUEST_TSO6 = 8,
	F_GUEST_ECN = 9, F_GUEST_UFO = 10, F_HOST_TSO4 = 11, F_HOST_TSO6 = 12,
	F_HOST_ECN = 13, F_HOST_UFO = 14, F_MRG_RXBUF = 15, F_STATUS = 16,
	HDR = 12,		/* struct virtio_net_hdr_v1 */
	LINK_UP = 1,
	MAX_FRAME = 65550 + HDR,	/* a TSO frame plus the header */
};

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
		if (r < 0 || c.readable_len < HDR) {
			vmm_virtio_fail(v);
			break;
		}
		/* The chain is header + frame, exactly what IFF_VNET_HDR takes. */
		ssize_t w;
		do {
			w = writev(n->tap_fd, c.seg, c.nseg - c.nwritable);
		} while (w < 0 && errno == EINTR);
		if (w < 0)
			v->st.io_errors++;	/* tap full or gone: the frame is dropped, counted */
		else
			v->st.bytes_written += c.readable_len - HDR;
		v->st.requests++;
		vmm_virtq_push(q, c.head, 0);
	}
	vmm_virtio_signal_used(v, VMM_NET_TXQ);
}

/* Take chains until one frame of any size fits (one chain without
 * MRG_RXBUF); returns how many, 0 when the guest has no buffers. */
static int gather(struct vmm_net *n, int *niov, uint64_t *room)
{
	struct vmm_virtio *v = &n->transport;
	struct vmm_virtq *q = &v->q[VMM_NET_RXQ];
	int mergeable = !!(v->driver_features & (1ull << F_MRG_RXBUF));
	int k = 0;
	*niov = 0;
	*room = 0;
	while (k < VMM_NET_MAX_RX_CHAINS && *room < MAX_FRAME && (k == 0 || mergeable)) {
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

void vmm_net_rx(struct vmm_net *n)
{
	struct vmm_virtio *v = &n->transport;
	struct vmm_virtq *q = &v->q[VMM_NET_RXQ];
	int delivered = 0;
	if (!(v->status & 4) || (v->status & VMM_VIRTIO_STATUS_NEEDS_RESET) || !q->ready)
		return;
	for (;;) {
		int niov;
		uint64_t room;
		int k = gather(n, &niov, &room);
		if (k < 0)
			break;
		if (k == 0) {
			/* No buffers: leave frames in the tap until the driver posts some. */
			if (!n->rx_blocked && n->poll_tap)
				n->poll_tap(n->poll_ctx, 0);
			n->rx_blocked = 1;
			break;
		}
		ssize_t got;
		do {
			got = readv(n->tap_fd, n->rx_iov, niov);
		} while (got < 0 && errno == EINTR);
		if (got <= 0) {
			q->last_avail -= (uint16_t)k;	/* nothing to deliver: give the chains back */
			break;
		}
		/* Fill chains in order; the header's num_buffers says how many. */
		uint64_t left = (uint64_t)got;
		uint16_t used = 0;
		for (int i = 0; i < k && left; i++) {
			uint64_t take = left < n->rx[i].writable_len ? left : n->rx[i].writable_len;
			vmm_virtq_push(q, n->rx[i].head, (uint32_t)take);
			left -= take;
			used++;
		}
		q->last_avail -= (uint16_t)(k - used);	/* unused chains go back to the ring */
		vmm_chain_write(&n->rx[0], 10, &used, 2);
		v->st.requests++;
		v->st.bytes_read += (uint64_t)got - HDR;
		delivered = 1;
	}
	if (delivered)
		vmm_virtio_signal_used(v, VMM_NET_RXQ);
}

static void queue_notify(struct vmm_virtio *v, uint32_t qi)
{
	struct vmm_net *n = (struct vmm_net *)v;
	v->st.notifies++;
	if (v->status & VMM_VIRTIO_STATUS_NEEDS_RESET)
		return;
	if (qi == VMM_NET_TXQ) {
		tx(v);
		return;
	}
	/* New RX buffers: poll the tap again and take what waits there. */
	if (n->rx_blocked) {
		n->rx_blocked = 0;
		if (n->poll_tap)
			n->poll_tap(n->poll_ctx, 1);
	}
	vmm_net_rx(n);
}

static void net_reset(void *priv)
{
	struct vmm_net *n = priv;
	n->rx_blocked = 0;
}

static void net_destroy(struct vmm_virtio *v)
{
	struct vmm_net *n = (struct vmm_net *)v;
	pthread_mutex_destroy(&v->lock);
	free(n);	/* the tap fd belongs to whoever opened it */
}

static const struct vmm_virtio_ops net_ops = {
	.device_id = VIRTIO_ID_NET, .num_queues = 2,
	.features = (1ull << F_MAC) | (1ull << F_STATUS) | (1ull << F_MRG_RXBUF),
	.config_read = config_read, .queue_notify = queue_notify, .reset = net_reset,
	.destroy = net_destroy,
};

int vmm_net_create(const struct vmm_mem *mem, int tap_fd, const uint8_t mac[6],
		   struct vmm_net **out)
{
	struct vmm_net *n = calloc(1, sizeof(*n));
	if (!n)
		return -ENOMEM;
	n->tap_fd = tap_fd;
	memcpy(n->mac, mac, 6);
	vmm_virtio_init(&n->transport, &net_ops, n, mem);
	*out = n;
	return 0;
}

int vmm_virtio_net_new(struct vmm_mem *mem, int tap_fd, const uint8_t *mac,
		       struct vmm_virtio **out)
{
	struct vmm_net *n;
	int r = vmm_net_create(mem, tap_fd, mac, &n);
	if (!r)
		*out = &n->transport;
	return r;
}

void vmm_virtio_net_rx(struct vmm_virtio *v)
{
	pthread_mutex_lock(&v->lock);
	vmm_net_rx((struct vmm_net *)v);
	pthread_mutex_unlock(&v->lock);
}
