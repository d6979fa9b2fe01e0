/*
 * fuzz_state_restore.c - vmm_virtio_restore (virtio_mmio.c) with any
 * struct vmm_virtio_state, as a snapshot file could hold it, into a fresh
 * virtio-blk or virtio-net device on fake RAM; then the guest goes on.
 *
 * Feeds: which device, the raw state bytes, guest ops run after an
 * accepted restore (notifies, register accesses, RAM changes, avail
 * publishes, the tap readable, frames) and guest RAM.
 *
 * Checks: a refused state (-EINVAL only) changes nothing (the device saves
 * the same state before and after); an accepted one saves back as it came
 * (every field the device has) and meets the transport invariants (fuzz.h;
 * NEEDS_RESET may come from the file), ready rings wholly in RAM; the ops
 * after it keep them, and a restored queue never touches anything outside
 * guest RAM (guard pages).
 *
 * Input: u8 device (bit 0: net, else blk), sizeof(struct vmm_virtio_state)
 * bytes of state, u8 nops, nops x 8 bytes of ops (fuzz.h), RAM image.
 */
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct input in = { data, size };
	int is_net = in_u8(&in) & 1;
	struct vmm_virtio_state st, before, after;
	in_bytes(&in, &st, sizeof(st));
	uint8_t nops = in_u8(&in) % MAX_OPS;
	struct input ops = in_sub(&in, (size_t)OP_BYTES * nops);
	struct vmm_mem *mem = ram_load(in);
	int disk = -1, fds[2] = { -1, -1 };
	struct polling poll = { 1 };
	struct vmm_virtio *v = is_net ? net_new(mem, 1514, fds, &poll) : blk_new(mem, 0, "", &disk);
	static const uint8_t frame[64] = { 0 };

	vmm_virtio_save(v, &before);
	int r = vmm_virtio_restore(v, &st);
	vmm_virtio_save(v, &after);
	if (r) {
		CHECK(r == -EINVAL, "restore returned %d", r);
		CHECK(state_same(&before, &after), "a refused restore changed the device");
	} else {
		/* What the file said, for every field the device has. */
		CHECK(state_same(&st, &after), "restored state does not save back the same");
		check_transport(v, 1);
		/* What the guest's driver would do next, with the rings it had. */
		struct setup s = { 0 };
		for (int q = 0; q < VMM_VIRTIO_MAX_QUEUES; q++)
			s.avail[q] = (uint32_t)st.q[q].avail;
		if (is_net)
			for (int i = 0; i < 3; i++)
				send(fds[1], frame, sizeof(frame) - 16 * i, MSG_DONTWAIT);
		for (uint32_t q = 0; q < v->ops->num_queues; q++) {
			wr(v, R_QUEUE_NOTIFY, q);
			check_transport(v, 1);
		}
		while (ops.n) {
			struct op o = op_parse(&ops);
			if (!op_common(v, mem, &s, &o) && is_net) {
				if (o.kind == OP_BACKEND)
					vmm_virtio_backend_ready(v);
				else
					send(fds[1], frame, o.a % sizeof(frame), MSG_DONTWAIT);
			}
			check_transport(v, 1);
		}
		if (is_net)
			vmm_virtio_backend_ready(v);
		check_transport(v, 1);
	}

	debug_stats("state_restore", v);
	vmm_virtio_free(v);
	if (disk >= 0)
		close(disk);
	if (is_net) {
		close(fds[0]);
		close(fds[1]);
	}
	return 0;
}
