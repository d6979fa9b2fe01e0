/*
 * virtio_mmio_regs.h - the virtio-mmio (version 2) register layout, from the
 * virtio 1.x spec, 4.2.2, with the names of Linux's uapi virtio_mmio.h.
 *
 * Defines only, and no includes: the device (native/virtio_mmio.c) and the
 * test micro-guest's driver (tests/guests/, freestanding C) both include
 * it, so the two sides of every register access read one table.
 */
#ifndef VIRTIO_MMIO_REGS_H
#define VIRTIO_MMIO_REGS_H

/* Register offsets from the device's MMIO base. */
#define VIRTIO_MMIO_MAGIC_VALUE		0x000
#define VIRTIO_MMIO_VERSION		0x004
#define VIRTIO_MMIO_DEVICE_ID		0x008
#define VIRTIO_MMIO_VENDOR_ID		0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES	0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL	0x014
#define VIRTIO_MMIO_DRIVER_FEATURES	0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL	0x024
#define VIRTIO_MMIO_QUEUE_SEL		0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX	0x034
#define VIRTIO_MMIO_QUEUE_NUM		0x038
#define VIRTIO_MMIO_QUEUE_READY		0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY	0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS	0x060
#define VIRTIO_MMIO_INTERRUPT_ACK	0x064
#define VIRTIO_MMIO_STATUS		0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW	0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH	0x084
#define VIRTIO_MMIO_QUEUE_AVAIL_LOW	0x090
#define VIRTIO_MMIO_QUEUE_AVAIL_HIGH	0x094
#define VIRTIO_MMIO_QUEUE_USED_LOW	0x0a0
#define VIRTIO_MMIO_QUEUE_USED_HIGH	0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION	0x0fc
#define VIRTIO_MMIO_CONFIG		0x100	/* device-specific config from here */

/* What MagicValue and Version read. */
#define VIRTIO_MMIO_MAGIC_VIRT		0x74726976u	/* "virt", little-endian */
#define VIRTIO_MMIO_VERSION_2		2u		/* virtio 1.x (version 1 is legacy) */

/* InterruptStatus / InterruptACK bits. */
#define VIRTIO_MMIO_INT_VRING		0x1u	/* a used ring was updated */
#define VIRTIO_MMIO_INT_CONFIG		0x2u	/* the config space changed (or NEEDS_RESET) */

#endif
