/*
 * fuzz_virtio_rng.c - the entropy device (virtio_rng.c over virtio_mmio.c
 * and virtq.c) driven by a hostile guest.
 *
 * Feeds: the driver's set-up, the device's per-request bound (any u32:
 * above VMM_RNG_MAX_REQUEST must be refused), a list of guest ops
 * (fuzz.h: register accesses, notifies, RAM changes, avail entries, a
 * reset and init again) and guest RAM (rings, chains, buffers).  A last
 * notify ends every run.
 *
 * Checks, after every op: the transport invariants (fuzz.h:
 * check_transport); the device never gave more than its bound per request
 * (bytes_read <= requests x bound) and never wrote into a chain with a
 * device-readable buffer (such a chain is a bad chain, not a request).
 * Guard pages catch any access outside guest RAM.
 *
 * Input: setup (fuzz.h: setup_parse), u32 bound, u8 nops, nops x 8 bytes
 * of ops (fuzz.h: op_parse), RAM image.
 */
#include "fuzz.h"
#include "virtio_rng.h"

static void check_rng(const struct vmm_virtio *v, uint32_t bound)
{
	uint64_t per = bound ? bound : VMM_RNG_MAX_REQUEST;
	CHECK(v->st.bytes_read <= v->st.requests * per, "%llu bytes for %llu requests of %llu",
	      (unsigned long long)v->st.bytes_read, (unsigned long long)v->st.requests,
	      (unsigned long long)per);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct input in = { data, size };
	struct setup s;
	setup_parse(&in, &s);
	uint32_t bound = in_u32(&in);
	uint8_t nops = in_u8(&in) % MAX_OPS;
	struct input ops = in_sub(&in, (size_t)OP_BYTES * nops);
	struct vmm_mem *mem = ram_load(in);
	struct vmm_virtio *v = NULL;

	int r = vmm_virtio_rng_new(mem, bound, &v);
	if (bound > VMM_RNG_MAX_REQUEST) {
		CHECK(r == -EINVAL && !v, "bound %u: %d", bound, r);
		return 0;
	}
	CHECK(r == 0, "vmm_virtio_rng_new: %d", r);
	if (s.flags & SETUP_INIT)
		driver_init(v, &s);
	check_transport(v, 0);
	while (ops.n) {
		struct op o = op_parse(&ops);
		op_common(v, mem, &s, &o);	/* no backend, no frames: those are no-ops */
		check_transport(v, 0);
		check_rng(v, bound);
	}
	wr(v, R_QUEUE_NOTIFY, 0);
	check_transport(v, 0);
	check_rng(v, bound);

	debug_stats("virtio_rng", v);
	vmm_virtio_free(v);
	return 0;
}
