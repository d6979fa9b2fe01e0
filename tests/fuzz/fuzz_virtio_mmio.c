/*
 * fuzz_virtio_mmio.c - the virtio-mmio register file (virtio_mmio.c) as a
 * vCPU reaches it: accesses on the MMIO bus (bus.c) to a virtio-blk slot
 * and the virtio-net slot after it, as a guest's MMIO exits make them.
 *
 * Feeds: for each device an optional driver set-up (fuzz.h), then a random
 * sequence of bus reads and writes (address anywhere in and past both
 * slots, unaligned included; length 1, 2, 4 or 8) or through
 * vmm_virtio_mmio_read / write as Python calls them (any offset and length
 * 0..8), the guest changing RAM or publishing avail entries, the tap
 * readable; guest RAM behind it all.
 *
 * Checks: the bus takes an access only when it lies wholly inside one
 * slot; an access touches no byte past its length; register reads other
 * than aligned 32-bit ones read 0, the magic reads "virt", and no read
 * changes the device (its saved state); after every op the transport
 * invariants (fuzz.h) hold for both devices.  Guard pages catch any
 * access outside guest RAM.
 *
 * Input: u8 flags (1 init blk, 2 init net), setup blk, setup net, u8 nops,
 * nops x 8 bytes of ops (kind, a, u16 off, u32 val; for reads and writes
 * a & 4 picks the API path, a >> 3 & 1 the device, a >> 4 the length),
 * RAM image.
 */
#include "fuzz.h"
#include "bus.h"

#define BASE 0xd0000000ull

enum { M_WRITE, M_READ, M_POKE, M_PUBLISH, M_BACKEND, M_KINDS };

static void bus_access(struct vmm_bus *bus, struct vmm_virtio *dev[2], int write, uint64_t off,
		       uint32_t len, uint32_t val)
{
	uint8_t buf[16];
	struct vmm_virtio_state before[2], after[2];
	memset(buf, 0xa5, sizeof(buf));
	if (write)
		memcpy(buf, &val, 4);
	for (int d = 0; d < 2; d++)
		vmm_virtio_save(dev[d], &before[d]);
	int r = write ? vmm_bus_write(bus, BASE + off, buf, len)
		      : vmm_bus_read(bus, BASE + off, buf, len);
	int inside = off / VMM_VIRTIO_MMIO_SIZE < 2 &&
		     off / VMM_VIRTIO_MMIO_SIZE == (off + len - 1) / VMM_VIRTIO_MMIO_SIZE;
	CHECK(r == (inside ? 0 : -ENOENT), "bus %s of %u at %#llx: %d", write ? "write" : "read",
	      len, (unsigned long long)off, r);
	for (uint32_t i = write ? 4 : len; i < sizeof(buf); i++)
		CHECK(buf[i] == 0xa5, "access of %u bytes at %#llx touched byte %u", len,
		      (unsigned long long)off, i);
	if (write || !inside)
		return;
	uint64_t reg = off % VMM_VIRTIO_MMIO_SIZE;
	uint32_t got = 0;
	memcpy(&got, buf, len < 4 ? len : 4);
	if (reg < R_CONFIG && (len != 4 || (reg & 3)))
		for (uint32_t i = 0; i < len; i++)
			CHECK(buf[i] == 0, "%u-byte register read at %#llx gave data", len,
			      (unsigned long long)reg);
	if (reg == R_MAGIC && len == 4)
		CHECK(got == 0x74726976, "magic %#x", got);
	for (int d = 0; d < 2; d++) {
		vmm_virtio_save(dev[d], &after[d]);
		CHECK(state_same(&before[d], &after[d]), "a read changed device %d", d);
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct input in = { data, size };
	uint8_t flags = in_u8(&in);
	struct setup s[2];
	setup_parse(&in, &s[0]);
	setup_parse(&in, &s[1]);
	uint8_t nops = in_u8(&in) % MAX_OPS;
	struct input ops = in_sub(&in, (size_t)OP_BYTES * nops);
	struct vmm_mem *mem = ram_load(in);
	int disk, fds[2];
	struct polling poll;
	struct vmm_virtio *dev[2];
	dev[0] = blk_new(mem, 0, "fuzz", &disk);
	dev[1] = net_new(mem, 1514, fds, &poll);
	struct vmm_bus bus = { 0 };
	for (int d = 0; d < 2; d++) {
		CHECK(vmm_bus_register(&bus, BASE + d * VMM_VIRTIO_MMIO_SIZE, VMM_VIRTIO_MMIO_SIZE,
				       &vmm_virtio_mmio_ops, dev[d]) == 0, "bus");
		if (flags & (1 << d))
			driver_init(dev[d], &s[d]);
	}
	while (ops.n) {
		uint8_t kind = in_u8(&ops) % M_KINDS, a = in_u8(&ops);
		uint16_t off = in_u16(&ops);
		uint32_t val = in_u32(&ops);
		switch (kind) {
		case M_WRITE:
		case M_READ:
			if (!(a & 4)) {
				bus_access(&bus, dev, kind == M_WRITE, off, 1u << (a & 3), val);
			} else {	/* the Python API's path: any offset, any length */
				struct vmm_virtio *v = dev[(a >> 3) & 1];
				uint32_t len = (a >> 4) % 9;
				if (kind == M_WRITE) {
					vmm_virtio_mmio_write(v, off, val, len);
				} else {
					uint32_t got = vmm_virtio_mmio_read(v, off, len);
					CHECK(len >= 4 || (got >> (8 * len)) == 0, "a %u-byte read gave %#x",
					      len, got);
				}
			}
			break;
		case M_POKE:
		case M_PUBLISH: {
			struct op o = { kind == M_POKE ? OP_POKE : OP_PUBLISH, a, off, val };
			op_common(dev[0], mem, &s[(a >> 1) & 1], &o);
			break;
		}
		case M_BACKEND:
			vmm_virtio_backend_ready(dev[1]);
			break;
		}
		for (int d = 0; d < 2; d++)
			check_transport(dev[d], 0);
		check_net(dev[1], &poll);
	}
	debug_stats("mmio blk", dev[0]);
	debug_stats("mmio net", dev[1]);
	for (int d = 0; d < 2; d++)
		vmm_virtio_free(dev[d]);
	close(disk);
	close(fds[0]);
	close(fds[1]);
	return 0;
}
