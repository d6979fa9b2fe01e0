/*
 * virtio_net.h - virtio-net device over a tap fd (IFF_TAP | IFF_NO_PI |
 * IFF_VNET_HDR, vnet header size 12, non-blocking): the virtio-net header
 * passes straight through, TX is one writev per frame from the guest's
 * buffers, RX one readv per frame straight into the guest's (mergeable)
 * buffers.  A frame the guest has no buffers for stays in the tap queue:
 * the device stops polling the tap until the driver posts buffers.
 * Offloads the guest accepts are mirrored to the tap (TUNSETOFFLOAD) when
 * the driver sets DRIVER_OK, so the tap never sends what the guest cannot
 * take.
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
	int rx_blocked;			/* the tap is not polled (no buffers, not ready) */
	uint64_t rx_need;		/* room one RX frame may need (header included) */
	uint64_t rx_need_plain;		/* the same without GSO: from the tap's MTU */
	uint32_t tap_offloads;		/* TUN_F_* in force */
	struct vmm_chain rx[VMM_NET_MAX_RX_CHAINS];	/* scratch for one frame */
	struct iovec rx_iov[1024];
};

/* max_frame: the largest frame the tap passes without GSO (MTU + Ethernet
 * and VLAN headers); 0 when unknown. */
int vmm_net_create(const struct vmm_mem *mem, int tap_fd, const uint8_t mac[6],
		   uint32_t max_frame, struct vmm_net **out);
void vmm_net_destroy(struct vmm_net *n);

#endif
