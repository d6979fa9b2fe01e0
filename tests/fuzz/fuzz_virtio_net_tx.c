/*
 * fuzz_virtio_net_tx.c - virtio-net transmit (virtio_net.c, guest to tap)
 * driven by a hostile guest, over a SOCK_SEQPACKET pair for the tap.
 *
 * Feeds: the driver's set-up of both queues, the tap's max_frame, guest
 * ops (register accesses, notifies - mostly of TX, queue 1 -, RAM changes,
 * avail publishes, reset and init again) and guest RAM (TX chains: the
 * 12-byte vnet header then the frame, all device-readable).  A last TX
 * notify ends every run.
 *
 * Checks, after every op: the transport invariants (fuzz.h), the tap
 * polling state the device asked for matches its rx_blocked, and what
 * reached the tap: one whole frame per chain counted in tx_frames, none
 * shorter than the vnet header, and bytes_written = the frames' bytes less
 * their headers.  Guard pages catch any access outside guest RAM.
 *
 * Input: setup (fuzz.h), u16 max_frame, u8 nops, nops x 8 bytes of ops,
 * RAM image.
 */
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct input in = { data, size };
	struct setup s;
	setup_parse(&in, &s);
	uint32_t max_frame = in_u16(&in);
	uint8_t nops = in_u8(&in) % MAX_OPS;
	struct input ops = in_sub(&in, (size_t)OP_BYTES * nops);
	struct vmm_mem *mem = ram_load(in);
	int fds[2];
	struct polling poll;
	struct vmm_virtio *v = net_new(mem, max_frame, fds, &poll);
	uint64_t frames = 0, bytes = 0;

	if (s.flags & SETUP_INIT)
		driver_init(v, &s);
	while (ops.n) {
		struct op o = op_parse(&ops);
		if (!op_common(v, mem, &s, &o) && o.kind == OP_BACKEND)
			vmm_virtio_backend_ready(v);	/* nothing to read: must be harmless */
		drain(fds[1], &frames, &bytes);
		check_transport(v, 0);
		check_net(v, &poll);
	}
	wr(v, R_QUEUE_NOTIFY, VMM_NET_TXQ);
	drain(fds[1], &frames, &bytes);
	check_transport(v, 0);
	check_net(v, &poll);
	CHECK(frames == v->st.tx_frames, "%llu frames reached the tap, tx_frames %llu",
	      (unsigned long long)frames, (unsigned long long)v->st.tx_frames);
	CHECK(bytes - 12 * frames == v->st.bytes_written, "%llu bytes, bytes_written %llu",
	      (unsigned long long)bytes, (unsigned long long)v->st.bytes_written);

	debug_stats("virtio_net_tx", v);
	vmm_virtio_free(v);
	close(fds[0]);
	close(fds[1]);
	return 0;
}
