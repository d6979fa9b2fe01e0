/*
 * virtio_net.h - virtio-net device over a tap fd (IFF_TAP | IFF_NO_PI |
 * IFF_VNET_HDR, vnet header size 12): the virtio-net header passes straight
 * through, TX is one writev per frame from the guest's buffers, RX one readv
 * per frame straight into the guest's (mergeable) buffers.  A frame the
 * guest has no buffers for stays in the tap queue: the device stops polling
 * the tap until the driver posts buffers.
 */
#ifndef VMM_VIRTIO_NET_H
#define VMM_VIRTIO_NET_H
#include "virtio_mmio.h"

#define VMM_NET_RXQ 0
#define VMM_NET_TXQ 1
#define VMM_NET_MAX_RX_CHAINS 64

struct vmm_net {
	struct vmm_virtio transport;	/* first: the device is its transport */
	int tap_fd;
	uint8_t mac[6];
	int rx_blocked;			/* no RX buffers: the tap is not polled */
	/* The I/O thread's hook to start/stop polling the tap (NULL in tests). */
	void (*poll_tap)(void *ctx, int on);
	void *poll_ctx;
	struct vmm_chain rx[VMM_NET_MAX_RX_CHAINS];	/* scratch for one frame */
	struct iovec rx_iov[1024];
};

int vmm_net_create(const struct vmm_mem *mem, int tap_fd, const uint8_t mac[6],
		   struct vmm_net **out);
/* The tap is readable (or RX buffers arrived): move frames to the guest. */
void vmm_net_rx(struct vmm_net *n);

#endif
