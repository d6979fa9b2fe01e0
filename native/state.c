/*
 * state.c - snapshots of a paused VM, composed: the VM-wide KVM state
 * (irqchips, PIT, kvmclock) is done here, each device's state by the
 * device (virtio_mmio.c, serial.c, i8042.c; vCPUs in vcpu.c), and guest RAM
 * is written to a file here (full, or only the pages dirtied since the
 * last write: vm.c's dirty tracking).  Everything restored comes from a
 * file: what this file restores itself it checks before KVM sees it; the
 * devices check their own.
 */
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>
#include <linux/kvm.h>

#include "common.h"
#include "guard.h"
#include "lifecycle.h"
#include "vm.h"

#define PAGE 4096ull

_Static_assert(sizeof(((struct vmm_machine_state *)0)->pit) == sizeof(struct kvm_pit_state2), "pit");
_Static_assert(sizeof(((struct vmm_machine_state *)0)->ioapic) ==
	       sizeof(((struct kvm_irqchip *)0)->chip), "irqchip");

/* ---- the VM: PIC master and slave, IOAPIC, PIT, kvmclock ---- */
static uint64_t realtime_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static size_t chip_off(int chip)
{
	return chip == KVM_IRQCHIP_PIC_MASTER ? offsetof(struct vmm_machine_state, pic_master) :
	       chip == KVM_IRQCHIP_PIC_SLAVE ? offsetof(struct vmm_machine_state, pic_slave) :
	       offsetof(struct vmm_machine_state, ioapic);
}

int vmm_vm_save_machine(struct vmm_vm *vm, struct vmm_machine_state *out)
{
	int r = vmm_lifecycle_paused(vm);
	memset(out, 0, sizeof(*out));
	for (int chip = 0; !r && chip < 3; chip++) {
		struct kvm_irqchip c = { .chip_id = (uint32_t)chip };
		r = vmm_ioctl(vm->vm_fd, KVM_GET_IRQCHIP, &c);
		memcpy((uint8_t *)out + chip_off(chip), &c.chip, sizeof(c.chip));
	}
	if (!r)
		r = vmm_ioctl(vm->vm_fd, KVM_GET_PIT2, out->pit);
	struct kvm_clock_data clock = { 0 };
	if (!r)
		r = vmm_ioctl(vm->vm_fd, KVM_GET_CLOCK, &clock);
	out->clock = clock.clock;
	/* The host wall clock at that reading, for a restore that moves the clock
	 * on by the time in between.  KVM reads both in one step when the host
	 * clock is the TSC; else our own reading right after is microseconds off. */
	out->realtime = !r && (clock.flags & KVM_CLOCK_REALTIME) ? clock.realtime : realtime_ns();
	return r;
}

static int clock_flags(int vm_fd)
{
	int r = ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_ADJUST_CLOCK);
	return r < 0 ? -errno : r;
}

int vmm_kvm_clock_flags(const char *kvm_path)
{
	struct vmm_vm *vm;
	int r = vmm_vm_create(kvm_path, &vm);
	if (r)
		return r;
	r = clock_flags(vm->vm_fd);
	vmm_vm_destroy(vm);
	return r;
}

/* kvmclock from a saved state.  Moving it to the host's wall clock: where
 * KVM takes KVM_CLOCK_REALTIME, it adds the host time elapsed since
 * in->realtime itself, reading the host clock inside the ioctl (nothing of
 * ours runs between reading and setting); else we add it, reading the host
 * clock just before the ioctl.  A realtime of 0 (unknown) or in the future
 * (a host clock stepped back) leaves the saved clock as it is. */
static int set_clock(struct vmm_vm *vm, const struct vmm_machine_state *in, uint32_t flags)
{
	struct kvm_clock_data c = { .clock = in->clock };
	vm->tsc_advance_ns = 0;
	if ((flags & VMM_RESTORE_CLOCK_REALTIME) && in->realtime) {
		int caps = clock_flags(vm->vm_fd);
		uint64_t now = realtime_ns();
		if (now > in->realtime) {
			/* A guest whose clocksource is the TSC (Linux prefers it to
			 * kvmclock when the TSC is invariant) sees only the TSC move. */
			vm->tsc_advance_ns = now - in->realtime;
			if (caps > 0 && (caps & KVM_CLOCK_REALTIME)) {
				c.flags = KVM_CLOCK_REALTIME;
				c.realtime = in->realtime;
			} else {
				c.clock += now - in->realtime;
			}
		}
	}
	return vmm_ioctl(vm->vm_fd, KVM_SET_CLOCK, &c);
}

int vmm_vm_restore_machine(struct vmm_vm *vm, const struct vmm_machine_state *in, uint32_t flags)
{
	int r = vmm_lifecycle_created(vm);
	for (int chip = 0; !r && chip < 3; chip++) {
		/* The chip id is ours, not the file's. */
		struct kvm_irqchip c = { .chip_id = (uint32_t)chip };
		memcpy(&c.chip, (const uint8_t *)in + chip_off(chip), sizeof(c.chip));
		r = vmm_ioctl(vm->vm_fd, KVM_SET_IRQCHIP, &c);
	}
	if (!r) {
		struct kvm_pit_state2 pit;
		memcpy(&pit, in->pit, sizeof(pit));
		pit.flags &= KVM_PIT_FLAGS_HPET_LEGACY | KVM_PIT_FLAGS_SPEAKER_DATA_ON;
		r = vmm_ioctl(vm->vm_fd, KVM_SET_PIT2, &pit);
	}
	return r ? r : set_clock(vm, in, flags);
}

/* ---- devices ---- */
int vmm_vm_virtio_save(struct vmm_vm *vm, int idx, struct vmm_virtio_state *out)
{
	if (idx < 0 || idx >= vm->nvirtio)
		return -EINVAL;
	int r = vmm_lifecycle_paused(vm);
	if (!r)
		vmm_virtio_save(vm->virtio[idx], out);
	return r;
}

int vmm_vm_virtio_restore(struct vmm_vm *vm, int idx, const struct vmm_virtio_state *in)
{
	if (idx < 0 || idx >= vm->nvirtio)
		return -EINVAL;
	int r = vmm_lifecycle_created(vm);
	return r ? r : vmm_virtio_restore(vm->virtio[idx], in);
}

int vmm_vm_legacy_save(struct vmm_vm *vm, struct vmm_legacy_state *o)
{
	int r = vmm_lifecycle_paused(vm);
	if (r)
		return r;
	memset(o, 0, sizeof(*o));
	vmm_serial_save(&vm->serial, o);
	vmm_i8042_save(&vm->i8042, o);
	o->console_head = vmm_console_get_head(&vm->console);
	return 0;
}

/* Both devices check the file's state before either takes it: a refused
 * state leaves the UART and the i8042 as they were. */
int vmm_vm_legacy_restore(struct vmm_vm *vm, const struct vmm_legacy_state *in)
{
	int r = vmm_lifecycle_created(vm);
	if (!r)
		r = vmm_serial_check_state(in);
	if (!r)
		r = vmm_i8042_check_state(in);
	if (!r)
		r = vmm_serial_restore(&vm->serial, in);
	if (!r)
		r = vmm_i8042_restore(&vm->i8042, in);
	if (!r)
		vmm_console_set_head(&vm->console, in->console_head);
	return r;
}

/* ---- guest RAM to a file ---- */
static int page_is_zero(const uint8_t *p)
{
	const uint64_t *w = (const uint64_t *)p;
	for (unsigned i = 0; i < PAGE / 8; i++)
		if (w[i])
			return 0;
	return 1;
}

static int write_all(int fd, const uint8_t *buf, uint64_t len, uint64_t off)
{
	while (len) {
		ssize_t n = pwrite(fd, buf, len, (off_t)off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return n < 0 ? -errno : -EIO;
		buf += n, off += (uint64_t)n, len -= (uint64_t)n;
	}
	return 0;
}

/* Full: runs of non-zero pages at their place (zero pages stay holes).
 * Diff: dirty pages packed at *pos, their bits set from page `first` on.
 * The caller runs it under a guard: the zero-page check reads guest RAM. */
static int64_t write_pages(const struct vmm_mem *mem, const struct vmm_mem_region *reg,
			   const uint64_t *bits, int fd, uint64_t *pos, int diff, uint8_t *bitmap,
			   uint64_t first)
{
	uint64_t pages = reg->size / PAGE, written = 0;
	int r = 0;
	for (uint64_t pg = 0; pg < pages && !r;) {
		int want = diff ? (int)((bits[pg / 64] >> (pg % 64)) & 1) : !page_is_zero(reg->hva + pg * PAGE);
		if (!want) {
			pg++;
			continue;
		}
		uint64_t end = pg + 1;	/* extend the run: one pwrite for many pages */
		while (end < pages && (diff ? (int)((bits[end / 64] >> (end % 64)) & 1)
				       : !page_is_zero(reg->hva + end * PAGE)))
			end++;
		uint64_t len = (end - pg) * PAGE;
		r = write_all(fd, reg->hva + pg * PAGE, len, diff ? *pos : *pos + pg * PAGE);
		if (r == -EFAULT) {
			/* The kernel's read of our RAM failed: a page is gone.  Touch
			 * them, so the guard says which; if none faults now, say the run. */
			struct iovec run = { reg->hva + pg * PAGE, len };
			vmm_guard_probe(&run, 1);
			vmm_mem_fault(mem, run.iov_base);
			return -EFAULT;
		}
		if (diff) {
			for (uint64_t p = pg; p < end; p++)
				bitmap[(first + p) / 8] |= (uint8_t)(1u << ((first + p) % 8));
			*pos += len;
		}
		written += len;
		pg = end;
	}
	if (!diff)
		*pos += reg->size;
	return r ? r : (int64_t)written;
}

/* write_pages under a guard: RAM whose file shrank fails it, and stops the VM. */
static int64_t write_guarded(struct vmm_vm *vm, const struct vmm_mem_region *reg,
			     const uint64_t *bits, int fd, uint64_t *pos, int diff,
			     uint8_t *bitmap, uint64_t first)
{
	struct vmm_guard g;
	int64_t n;
	if (VMM_GUARD_ENTER(&g, vm->mem) == 0) {
		n = write_pages(vm->mem, reg, bits, fd, pos, diff, bitmap, first);
	} else {
		vmm_mem_fault(vm->mem, g.fault_addr);
		n = -EFAULT;
	}
	vmm_guard_leave(&g);
	return n;
}

static int64_t write_region(struct vmm_vm *vm, int slot, int fd, uint64_t *pos, int diff,
			    uint8_t *bitmap, uint64_t first)
{
	struct vmm_mem_region *reg = &vm->mem->r[slot];
	uint64_t words = (reg->size / PAGE + 63) / 64;
	uint64_t *bits = NULL;
	if (vm->track_dirty) {
		if (!(bits = calloc(words, 8)))
			return -ENOMEM;
		int r = vmm_vm_take_dirty(vm, slot, bits, words);
		if (r) {
			free(bits);
			return r;
		}
	}
	int64_t n = write_guarded(vm, reg, bits, fd, pos, diff, bitmap, first);
	free(bits);
	return n;
}

int64_t vmm_vm_write_memory(struct vmm_vm *vm, int fd, uint64_t offset, int diff,
			    uint8_t *bitmap, uint64_t bitmap_len)
{
	uint64_t pages = 0, pos = offset;
	int64_t total = 0;
	int r = vmm_lifecycle_paused(vm);
	for (int i = 0; i < vm->mem->n; i++)
		pages += vm->mem->r[i].size / PAGE;
	if (!r && diff && (!vm->track_dirty || !bitmap || bitmap_len < (pages + 7) / 8))
		r = -EINVAL;
	if (r)
		return r;
	if (diff)
		memset(bitmap, 0, (pages + 7) / 8);
	uint64_t first = 0;
	for (int i = 0; i < vm->mem->n; i++) {
		int64_t n = write_region(vm, i, fd, &pos, diff, bitmap, first);
		if (n < 0)
			return n;
		total += n;
		first += vm->mem->r[i].size / PAGE;
	}
	return total;
}
