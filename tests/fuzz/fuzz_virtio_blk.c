/*
 * fuzz_virtio_blk.c - a virtio-blk device (virtio_blk.c over virtio_mmio.c
 * and virtq.c) driven by a hostile guest, its disk a small memfd.
 *
 * Feeds: the driver's set-up (features, queue size and rings; the init
 * sequence run or not), the drive's read-only flag and serial, a list of
 * guest ops (register writes and reads of any length at any offset,
 * notifies, the guest changing RAM or publishing avail entries, a reset
 * and init again), and guest RAM (rings, requests, data buffers).  A last
 * notify ends every run.
 *
 * Checks, after every op: the transport invariants (fuzz.h:
 * check_transport: FEATURES_OK only for offered features with VERSION_1,
 * NEEDS_RESET only after a bad chain, ready rings wholly in RAM); at the
 * end the disk keeps its size, and a read-only disk every byte.  Guard
 * pages catch any access outside guest RAM.
 *
 * Input: setup (fuzz.h: setup_parse), u8 flags (1 read-only), 20 bytes of
 * serial, u8 nops, nops x 8 bytes of ops (fuzz.h: op_parse), RAM image.
 */
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct input in = { data, size };
	struct setup s;
	setup_parse(&in, &s);
	int read_only = in_u8(&in) & 1;
	char serial[VMM_BLK_ID_BYTES + 1] = { 0 };
	in_bytes(&in, serial, VMM_BLK_ID_BYTES);
	uint8_t nops = in_u8(&in) % MAX_OPS;
	struct input ops = in_sub(&in, (size_t)OP_BYTES * nops);
	struct vmm_mem *mem = ram_load(in);
	int disk;
	struct vmm_virtio *v = blk_new(mem, read_only, serial, &disk);

	if (s.flags & SETUP_INIT)
		driver_init(v, &s);
	check_transport(v, 0);
	while (ops.n) {
		struct op o = op_parse(&ops);
		op_common(v, mem, &s, &o);	/* no backend, no frames: the rest are no-ops */
		check_transport(v, 0);
	}
	wr(v, R_QUEUE_NOTIFY, 0);
	check_transport(v, 0);
	check_disk(disk, read_only);

	debug_stats("virtio_blk", v);
	vmm_virtio_free(v);
	close(disk);
	return 0;
}
