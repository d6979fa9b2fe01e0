/*
 * bus.c - sorted range table with binary-search dispatch.
 */
#include <errno.h>
#include <string.h>

#include "bus.h"

int vmm_bus_register(struct vmm_bus *bus, uint64_t base, uint64_t len,
		     const struct vmm_bus_ops *ops, void *priv)
{
	if (len == 0 || base + len < base || !ops)
		return -EINVAL;
	if (bus->n == VMM_BUS_MAX_DEVS)
		return -ENOSPC;
	int pos = 0;
	while (pos < bus->n && bus->devs[pos].base < base)
		pos++;
	if (pos > 0 && bus->devs[pos - 1].base + bus->devs[pos - 1].len > base)
		return -EEXIST;
	if (pos < bus->n && base + len > bus->devs[pos].base)
		return -EEXIST;
	memmove(&bus->devs[pos + 1], &bus->devs[pos], (bus->n - pos) * sizeof(bus->devs[0]));
	bus->devs[pos] = (struct vmm_bus_dev){ base, len, ops, priv };
	bus->n++;
	return 0;
}

/* addr and len come from a guest exit: the whole access must fit the range. */
static const struct vmm_bus_dev *find(const struct vmm_bus *bus, uint64_t addr, uint32_t len)
{
	int lo = 0, hi = bus->n - 1;
	while (lo <= hi) {
		int mid = (lo + hi) / 2;
		const struct vmm_bus_dev *d = &bus->devs[mid];
		if (addr < d->base)
			hi = mid - 1;
		else if (addr - d->base >= d->len)
			lo = mid + 1;
		else
			return (len <= d->len - (addr - d->base)) ? d : NULL;
	}
	return NULL;
}

int vmm_bus_read(const struct vmm_bus *bus, uint64_t addr, uint8_t *data, uint32_t len)
{
	const struct vmm_bus_dev *d = find(bus, addr, len);
	if (!d || !d->ops->read)
		return -ENOENT;
	d->ops->read(d->priv, addr - d->base, data, len);
	return 0;
}

int vmm_bus_write(const struct vmm_bus *bus, uint64_t addr, const uint8_t *data, uint32_t len)
{
	const struct vmm_bus_dev *d = find(bus, addr, len);
	if (!d || !d->ops->write)
		return -ENOENT;
	d->ops->write(d->priv, addr - d->base, data, len);
	return 0;
}
