/*
 * virtq.h - a split virtqueue seen from the device side.
 *
 * The driver (the guest) owns every byte of the rings and descriptors, so
 * everything read from them is guest-controlled: indexes are checked
 * against the queue size, buffers translated through vmm_mem (whole range
 * inside RAM or refused), chains bounded in length and free of loops.  A
 * bad chain is reported as an error for the caller to turn into
 * DEVICE_NEEDS_RESET; nothing outside guest RAM is ever touched.
 */
#ifndef VMM_VIRTQ_H
#define VMM_VIRTQ_H
#include <sys/uio.h>
#include "memory.h"

#define VMM_VIRTQ_MAX_SIZE 1024
#define VMM_CHAIN_MAX_SEGS 256	/* iovecs per request, after splitting */

struct vmm_virtq {
	uint16_t size;		/* QueueNum, a power of two <= max */
	int ready;
	uint64_t desc_gpa, avail_gpa, used_gpa;
	/* Host views, resolved and bounds-checked once at QueueReady. */
	uint8_t *desc, *avail, *used;
	uint16_t last_avail;	/* next avail entry we consume */
	uint16_t used_idx;	/* next used entry we fill */
	uint16_t signalled_used;	/* used_idx at the last interrupt (EVENT_IDX) */
	int event_idx, indirect;	/* negotiated features */
	const struct vmm_mem *mem;	/* set at activation: dirty marking */
};

struct vmm_chain {
	uint16_t head;
	int nseg, nwritable;	/* readable segments come first */
	uint64_t readable_len, writable_len;
	struct iovec seg[VMM_CHAIN_MAX_SEGS];
};

/* Resolve ring addresses; -EFAULT when any ring is not wholly in RAM,
 * -EINVAL when misaligned or the used ring overlaps the others. */
int vmm_virtq_activate(struct vmm_virtq *q, const struct vmm_mem *mem);
void vmm_virtq_reset(struct vmm_virtq *q);
/* 1: a chain was taken, 0: queue empty, -EINVAL/-EFAULT/-ELOOP/-E2BIG: bad chain. */
int vmm_virtq_pop(struct vmm_virtq *q, const struct vmm_mem *mem, struct vmm_chain *c);
void vmm_virtq_push(struct vmm_virtq *q, uint16_t head, uint32_t written);
/* After pushes: should the driver be interrupted (flags / EVENT_IDX)? */
int vmm_virtq_need_interrupt(struct vmm_virtq *q);

/* The device wrote into c's writable buffers: note them for dirty tracking. */
void vmm_chain_mark_written(const struct vmm_virtq *q, const struct vmm_chain *c);
/* Copy helpers across a chain's segments (from = first readable byte). */
uint64_t vmm_chain_read(const struct vmm_chain *c, uint64_t off, void *buf, uint64_t len);
uint64_t vmm_chain_write(const struct vmm_chain *c, uint64_t off, const void *buf, uint64_t len);

#endif
