/*
 * virtio_rng.c - virtio entropy device requests.
 *
 * A request is a chain of device-writable buffers; the device fills them
 * with random bytes and returns the chain with the count written.  The
 * driver decides the sizes, so a request is bounded (max_request, at most
 * VMM_RNG_MAX_REQUEST), the rest of its buffers left as they were.  getrandom() never blocks
 * here (GRND_NONBLOCK): before the host's pool is ready (only ever early
 * in the host's boot) it fails with EAGAIN and the request gets what was
 * written so far, perhaps nothing, for the driver to ask again.  A chain
 * with a device-readable buffer breaks the spec (drivers must offer only
 * writable ones): the device then needs reset, as for any bad chain.
 */
#include <errno.h>
#include <stdlib.h>
#include <sys/random.h>

#include "guard.h"
#include "virtio_rng.h"

enum { VIRTIO_ID_RNG = 4 };

/* Fill up to `want` bytes of buf from getrandom(); returns bytes filled. */
static uint64_t fill(const struct vmm_chain *c, uint8_t *buf, uint64_t want)
{
	uint64_t done = 0;
	while (done < want) {
		ssize_t n = getrandom(buf + done, want - done, GRND_NONBLOCK);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EFAULT) {
			/* The kernel's write into guest RAM failed: a page of it vanished
			 * (its file shrank).  Touching the chain faults inside the caller's
			 * guard, and the VM stops; if nothing faults, stop filling. */
			vmm_guard_probe(c->seg, c->nseg);
			break;
		}
		if (n <= 0)
			break;	/* EAGAIN: the host's pool is not ready; the driver asks again */
		done += (uint64_t)n;
	}
	return done;
}

/* Serve one request: random bytes into its writable buffers, up to the
 * bound; only what was written is marked dirty.  Returns bytes written. */
static uint32_t serve(struct vmm_rng *r, const struct vmm_chain *c)
{
	uint64_t written = 0;
	for (int i = c->nseg - c->nwritable; i < c->nseg && written < r->max_request; i++) {
		uint64_t room = r->max_request - written;
		uint64_t want = c->seg[i].iov_len < room ? c->seg[i].iov_len : room;
		uint64_t n = fill(c, c->seg[i].iov_base, want);
		vmm_mem_mark_dirty(r->transport.mem, c->seg[i].iov_base, n);
		written += n;
		if (n < want)
			break;
	}
	return (uint32_t)written;
}

static void queue_notify(struct vmm_virtio *v, uint32_t qi)
{
	struct vmm_rng *r = (struct vmm_rng *)v;
	struct vmm_virtq *q = &v->q[qi];
	struct vmm_chain c;
	for (;;) {
		int p = vmm_virtq_pop(q, v->mem, &c);
		if (p == 0)
			break;
		if (p < 0 || c.readable_len) {
			vmm_virtio_fail(v);
			break;
		}
		uint32_t written = serve(r, &c);
		if (written < c.writable_len && written < r->max_request)
			v->st.io_errors++;	/* the host's pool was not ready: a short fill */
		v->st.bytes_read += written;
		v->st.requests++;
		vmm_virtq_push(q, c.head, written);
	}
	vmm_virtio_signal_used(v, qi);
}

static void rng_destroy(struct vmm_virtio *v)
{
	vmm_rng_destroy((struct vmm_rng *)v);
}

/* No feature bits and no config space of its own (virtio 1.x, 5.4). */
static const struct vmm_virtio_ops rng_ops = {
	.device_id = VIRTIO_ID_RNG, .num_queues = 1,
	.queue_notify = queue_notify, .destroy = rng_destroy,
};

int vmm_rng_create(const struct vmm_mem *mem, uint32_t max_request, struct vmm_rng **out)
{
	if (max_request > VMM_RNG_MAX_REQUEST)
		return -EINVAL;
	struct vmm_rng *r = calloc(1, sizeof(*r));
	if (!r)
		return -ENOMEM;
	r->max_request = max_request ? max_request : VMM_RNG_MAX_REQUEST;
	vmm_virtio_init(&r->transport, &rng_ops, r, mem);
	*out = r;
	return 0;
}

void vmm_rng_destroy(struct vmm_rng *r)
{
	if (!r)
		return;
	pthread_mutex_destroy(&r->transport.lock);
	free(r);
}

int vmm_virtio_rng_new(struct vmm_mem *mem, uint32_t max_request, struct vmm_virtio **out)
{
	struct vmm_rng *r;
	int e = vmm_rng_create(mem, max_request, &r);
	if (!e)
		*out = &r->transport;
	return e;
}
