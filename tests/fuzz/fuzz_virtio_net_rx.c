/*
 * fuzz_virtio_net_rx.c - virtio-net receive (virtio_net.c, tap to guest)
 * driven by a hostile guest and hostile frames, over a SOCK_SEQPACKET
 * pair for the tap.
 *
 * Feeds: the driver's set-up of both queues (MRG_RXBUF or not), the tap's
 * max_frame, frames (any length, zero included) written into the tap's
 * peer before the ops, guest ops (register accesses, notifies, RAM
 * changes, avail publishes, "the tap is readable", one more frame, reset
 * and init again) and guest RAM (RX chains, device-writable).  A last
 * "tap readable" ends every run.
 *
 * Checks, after every op: the transport invariants (fuzz.h), the tap
 * polling state matches rx_blocked, the device never delivered more
 * frames or bytes than the tap got.  Guard pages catch any access outside
 * guest RAM.
 *
 * Input: setup (fuzz.h), u16 max_frame, u8 nops, nops x 8 bytes of ops,
 * u8 nframes, then per frame u16 length and its bytes (length capped by
 * what is left), then the RAM image.
 */
#include "fuzz.h"

#define MAX_FRAMES 16

struct frame {
	const uint8_t *p;
	size_t n;
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct input in = { data, size };
	struct setup s;
	setup_parse(&in, &s);
	uint32_t max_frame = in_u16(&in);
	uint8_t nops = in_u8(&in) % MAX_OPS;
	struct input ops = in_sub(&in, (size_t)OP_BYTES * nops);
	struct frame fr[MAX_FRAMES];
	int nframes = in_u8(&in) % (MAX_FRAMES + 1);
	for (int i = 0; i < nframes; i++) {
		struct input f = in_sub(&in, in_u16(&in) % 2048);
		fr[i] = (struct frame){ f.p, f.n };
	}
	struct vmm_mem *mem = ram_load(in);
	int fds[2];
	struct polling poll;
	struct vmm_virtio *v = net_new(mem, max_frame, fds, &poll);
	uint64_t sent = 0, sent_bytes = 0;

	for (int i = 0; i < nframes; i++)
		if (send(fds[1], fr[i].p, fr[i].n, MSG_DONTWAIT) >= 0) {
			sent++;
			sent_bytes += fr[i].n;
		}
	if (s.flags & SETUP_INIT)
		driver_init(v, &s);
	while (ops.n) {
		struct op o = op_parse(&ops);
		if (op_common(v, mem, &s, &o)) {
		} else if (o.kind == OP_BACKEND) {
			vmm_virtio_backend_ready(v);
		} else if (o.kind == OP_FRAME && nframes) {
			const struct frame *f = &fr[o.a % nframes];
			if (send(fds[1], f->p, f->n, MSG_DONTWAIT) >= 0) {
				sent++;
				sent_bytes += f->n;
			}
		}
		check_transport(v, 0);
		check_net(v, &poll);
	}
	vmm_virtio_backend_ready(v);
	check_transport(v, 0);
	check_net(v, &poll);
	CHECK(v->st.rx_frames <= sent, "%llu frames delivered of %llu",
	      (unsigned long long)v->st.rx_frames, (unsigned long long)sent);
	/* bytes_read counts frame bytes less the header, what the tap had at most */
	CHECK(v->st.bytes_read <= sent_bytes, "%llu bytes delivered of %llu",
	      (unsigned long long)v->st.bytes_read, (unsigned long long)sent_bytes);

	debug_stats("virtio_net_rx", v);
	vmm_virtio_free(v);
	close(fds[0]);
	close(fds[1]);
	return 0;
}
