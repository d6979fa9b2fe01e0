/*
 * virtio_blk.h - virtio block device over a raw image file.  Requests are
 * served on the I/O thread straight between the file and guest memory
 * (preadv/pwritev on the chain's iovecs, no bounce copy).
 */
#ifndef VMM_VIRTIO_BLK_H
#define VMM_VIRTIO_BLK_H
#include "virtio_mmio.h"

#define VMM_BLK_ID_BYTES 20

struct vmm_blk {
	struct vmm_virtio transport;	/* first: the device is its transport */
	int fd;
	int read_only;
	uint64_t capacity;		/* 512-byte sectors */
	char serial[VMM_BLK_ID_BYTES];
};

/* The device keeps its own duplicate of image_fd (a regular file the
 * caller opened, checked and locked); the caller's fd stays the caller's. */
int vmm_blk_create(const struct vmm_mem *mem, int image_fd, int read_only,
		   const char *serial, struct vmm_blk **out);
void vmm_blk_destroy(struct vmm_blk *b);

#endif
