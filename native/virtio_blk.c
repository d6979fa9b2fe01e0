/*
 * virtio_blk.c - virtio-blk requests: IN, OUT, FLUSH, GET_ID.
 *
 * A request is a chain: a 16-byte header (type, reserved, sector) the
 * device reads, data buffers, and one status byte the device writes last.
 * Every field of it is guest-controlled: the sector range is checked
 * against the capacity without overflow, lengths against the chain.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "guard.h"
#include "virtio_blk.h"

enum {
	VIRTIO_ID_BLOCK = 2,
	T_IN = 0, T_OUT = 1, T_FLUSH = 4, T_GET_ID = 8,
	S_OK = 0, S_IOERR = 1, S_UNSUPP = 2,
	F_SEG_MAX = 2, F_RO = 5, F_BLK_SIZE = 6, F_FLUSH = 9,
	SECTOR = 512, HDR = 16,
};

struct blk_config {		/* the leading fields of struct virtio_blk_config */
	uint64_t capacity;
	uint32_t size_max;
	uint32_t seg_max;
	uint8_t geometry[4];
	uint32_t blk_size;
} __attribute__((packed));

static void config_read(void *priv, uint64_t off, uint8_t *data, uint32_t len)
{
	struct vmm_blk *b = priv;
	struct blk_config cfg = {
		.capacity = b->capacity,
		.seg_max = VMM_CHAIN_MAX_SEGS - 2,	/* header and status take two */
		.blk_size = SECTOR,
	};
	/* off and len are guest-controlled: copy only what lies inside. */
	if (off < sizeof(cfg))
		memcpy(data, (uint8_t *)&cfg + off, len < sizeof(cfg) - off ? len : sizeof(cfg) - off);
}

/* Data segments: the chain minus the header (first HDR readable bytes) and
 * the status byte (last writable byte).  Fills iov; returns the count. */
static int data_iov(const struct vmm_chain *c, int writable, struct iovec *iov, uint64_t *total)
{
	int n = 0;
	uint64_t skip = writable ? 0 : HDR;
	uint64_t keep = writable ? c->writable_len - 1 : c->readable_len - HDR;
	int first = writable ? c->nseg - c->nwritable : 0;
	int last = writable ? c->nseg : c->nseg - c->nwritable;
	*total = 0;
	for (int i = first; i < last && *total < keep; i++) {
		uint64_t l = c->seg[i].iov_len;
		if (skip >= l) {
			skip -= l;
			continue;
		}
		uint64_t take = l - skip < keep - *total ? l - skip : keep - *total;
		iov[n].iov_base = (uint8_t *)c->seg[i].iov_base + skip;
		iov[n].iov_len = take;
		*total += take;
		skip = 0;
		n++;
	}
	return n;
}

static int in_range(const struct vmm_blk *b, uint64_t sector, uint64_t bytes)
{
	uint64_t sectors = bytes / SECTOR;
	return bytes % SECTOR == 0 && sector <= b->capacity && sectors <= b->capacity - sector;
}

static int full_io(int fd, struct iovec *iov, int n, uint64_t off, uint64_t total, int write)
{
	uint64_t done = 0;
	while (done < total) {
		ssize_t r = write ? pwritev(fd, iov, n, (off_t)(off + done))
				  : preadv(fd, iov, n, (off_t)(off + done));
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		done += (uint64_t)r;
		/* Advance the iovec array past what was transferred. */
		uint64_t adv = (uint64_t)r;
		while (n && adv >= iov->iov_len) {
			adv -= iov->iov_len;
			iov++;
			n--;
		}
		if (n) {
			iov->iov_base = (uint8_t *)iov->iov_base + adv;
			iov->iov_len -= adv;
		}
	}
	return 0;
}

/* The transfer failed.  EFAULT on buffers inside guest RAM means a page of
 * it vanished (its file shrank): touching them faults inside the caller's
 * guard, and the VM stops.  Else it is an I/O error for the guest. */
static uint8_t io_error(const struct vmm_chain *c)
{
	if (errno == EFAULT)
		vmm_guard_probe(c->seg, c->nseg);
	return S_IOERR;
}

/* Serve one request; returns the status byte and bytes written to the guest. */
static uint8_t serve(struct vmm_blk *b, const struct vmm_chain *c, uint32_t *written)
{
	struct { uint32_t type, reserved; uint64_t sector; } hdr;
	struct iovec iov[VMM_CHAIN_MAX_SEGS];
	uint64_t total;
	struct vmm_virtio_stats *st = &b->transport.st;
	vmm_chain_read(c, 0, &hdr, HDR);
	switch (hdr.type) {
	case T_IN: {
		int n = data_iov(c, 1, iov, &total);
		if (!in_range(b, hdr.sector, total))
			return S_IOERR;
		if (full_io(b->fd, iov, n, hdr.sector * SECTOR, total, 0))
			return io_error(c);
		st->bytes_read += total;
		*written = (uint32_t)total;
		return S_OK;
	}
	case T_OUT: {
		int n = data_iov(c, 0, iov, &total);
		if (b->read_only || !in_range(b, hdr.sector, total))
			return S_IOERR;
		if (full_io(b->fd, iov, n, hdr.sector * SECTOR, total, 1))
			return io_error(c);
		st->bytes_written += total;
		return S_OK;
	}
	case T_FLUSH:
		return (b->read_only || fdatasync(b->fd) == 0) ? S_OK : S_IOERR;
	case T_GET_ID: {
		uint64_t room = c->writable_len - 1;
		uint64_t n = room < VMM_BLK_ID_BYTES ? room : VMM_BLK_ID_BYTES;
		*written = (uint32_t)vmm_chain_write(c, 0, b->serial, n);
		return S_OK;
	}
	default:
		return S_UNSUPP;
	}
}

static void queue_notify(struct vmm_virtio *v, uint32_t qi)
{
	struct vmm_blk *b = (struct vmm_blk *)v;
	struct vmm_virtq *q = &v->q[qi];
	struct vmm_chain c;
	for (;;) {
		int r = vmm_virtq_pop(q, v->mem, &c);
		if (r == 0)
			break;
		/* A request needs a header to read and a status byte to write. */
		if (r < 0 || c.readable_len < HDR || c.writable_len < 1) {
			vmm_virtio_fail(v);
			break;
		}
		uint32_t written = 0;
		uint8_t status = serve(b, &c, &written);
		if (status != S_OK)
			v->st.io_errors++;
		vmm_chain_write(&c, c.writable_len - 1, &status, 1);
		vmm_chain_mark_written(q, &c);
		vmm_virtq_push(q, c.head, written + 1);
		v->st.requests++;
	}
	vmm_virtio_signal_used(v, qi);
}

static void blk_destroy(struct vmm_virtio *v)
{
	vmm_blk_destroy((struct vmm_blk *)v);
}

static const struct vmm_virtio_ops blk_ops_rw = {
	.device_id = VIRTIO_ID_BLOCK, .num_queues = 1,
	.features = (1ull << F_SEG_MAX) | (1ull << F_BLK_SIZE) | (1ull << F_FLUSH),
	.config_read = config_read, .queue_notify = queue_notify, .destroy = blk_destroy,
};

static const struct vmm_virtio_ops blk_ops_ro = {
	.device_id = VIRTIO_ID_BLOCK, .num_queues = 1,
	.features = (1ull << F_SEG_MAX) | (1ull << F_BLK_SIZE) | (1ull << F_FLUSH) | (1ull << F_RO),
	.config_read = config_read, .queue_notify = queue_notify, .destroy = blk_destroy,
};

int vmm_blk_create(const struct vmm_mem *mem, int image_fd, int read_only,
		   const char *serial, struct vmm_blk **out)
{
	struct vmm_blk *b = calloc(1, sizeof(*b));
	if (!b)
		return -ENOMEM;
	/* Our own fd on the same open file: the image checked (and locked) by
	 * the caller is the one served, and no path is opened twice. */
	b->fd = fcntl(image_fd, F_DUPFD_CLOEXEC, 0);
	struct stat st;
	int r = b->fd < 0 ? -errno : fstat(b->fd, &st) < 0 ? -errno : 0;
	if (!r && !S_ISREG(st.st_mode))
		r = -EINVAL;
	if (r) {
		if (b->fd >= 0)
			close(b->fd);
		free(b);
		return r;
	}
	b->read_only = read_only;
	b->capacity = (uint64_t)st.st_size / SECTOR;
	if (serial)	/* NUL padded (calloc), not terminated when 20 long: as virtio wants */
		memcpy(b->serial, serial, strnlen(serial, VMM_BLK_ID_BYTES));
	vmm_virtio_init(&b->transport, read_only ? &blk_ops_ro : &blk_ops_rw, b, mem);
	*out = b;
	return 0;
}

void vmm_blk_destroy(struct vmm_blk *b)
{
	if (!b)
		return;
	close(b->fd);
	pthread_mutex_destroy(&b->transport.lock);
	free(b);
}

int vmm_virtio_blk_new(struct vmm_mem *mem, int image_fd, int read_only,
		       const char *serial, struct vmm_virtio **out)
{
	struct vmm_blk *b;
	int r = vmm_blk_create(mem, image_fd, read_only, serial, &b);
	if (!r)
		*out = &b->transport;
	return r;
}

