/*
 * virtio_rng.h - the virtio entropy device (virtio-rng): one queue of
 * device-writable buffers, filled from the host's getrandom() on the I/O
 * thread, straight into guest memory.
 */
#ifndef VMM_VIRTIO_RNG_H
#define VMM_VIRTIO_RNG_H
#include "virtio_mmio.h"

/* At most this many bytes per request chain: one request cannot keep the
 * I/O thread in getrandom() for long; the used length says what came. */
#define VMM_RNG_MAX_REQUEST (64u << 10)

struct vmm_rng {
	struct vmm_virtio transport;	/* first: the device is its transport */
	uint32_t max_request;		/* 1..VMM_RNG_MAX_REQUEST bytes per request */
};

/* max_request: bytes per request, 0 for VMM_RNG_MAX_REQUEST; -EINVAL above it. */
int vmm_rng_create(const struct vmm_mem *mem, uint32_t max_request, struct vmm_rng **out);
void vmm_rng_destroy(struct vmm_rng *r);

#endif
