/*
 * bus.h - address ranges owned by emulated devices (one bus for PIO, one
 * for MMIO).  A device is an ops table plus its private data.  Ranges are
 * registered before the vCPUs start and never change while they run, so
 * lookups take no lock.
 */
#ifndef VMM_BUS_H
#define VMM_BUS_H
#include "vmmcore.h"

#define VMM_BUS_MAX_DEVS 64

struct vmm_bus_ops {
	/* off is relative to the range base; len is 1, 2, 4 or 8. */
	void (*read)(void *priv, uint64_t off, uint8_t *data, uint32_t len);
	void (*write)(void *priv, uint64_t off, const uint8_t *data, uint32_t len);
};

struct vmm_bus_dev {
	uint64_t base, len;
	const struct vmm_bus_ops *ops;
	void *priv;
};

struct vmm_bus {
	int n;
	struct vmm_bus_dev devs[VMM_BUS_MAX_DEVS];	/* sorted by base */
};

int vmm_bus_register(struct vmm_bus *bus, uint64_t base, uint64_t len,
		     const struct vmm_bus_ops *ops, void *priv);
/* Both return 0 when a device took the access, -ENOENT when none owns it. */
int vmm_bus_read(const struct vmm_bus *bus, uint64_t addr, uint8_t *data, uint32_t len);
int vmm_bus_write(const struct vmm_bus *bus, uint64_t addr, const uint8_t *data, uint32_t len);

#endif
