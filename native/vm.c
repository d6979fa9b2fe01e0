/*
 * vm.c - a VM's construction and teardown: create (KVM VM, irqchip, PIT,
 * devices), RAM and its KVM slots, vCPUs, virtio devices, destroy; stats,
 * events and console access.  Running it is lifecycle.c's.
 *
 * Construction order follows Firecracker: TSS and identity map, irqchip,
 * PIT2, memory, then vCPUs (CPUID depends on the final vCPU count).
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/kvm.h>

#include "common.h"
#include "lifecycle.h"
#include "vcpu.h"
#include "virtio_blk.h"
#include "virtio_net.h"
#include "virtio_rng.h"
#include "virtio_vsock.h"
#include "vm.h"

#define TSS_ADDR 0xfffbd000ull
#define IDENTITY_MAP_ADDR 0xfffbc000ull

/* 0 if fd is /dev/kvm speaking the API this core was written for. */
static int check_kvm(int fd)
{
	int v = ioctl(fd, KVM_GET_API_VERSION, 0);
	if (v < 0)
		return -errno;	/* ENOTTY: some other file */
	return v == KVM_API_VERSION ? 0 : -EPROTO;
}

static int open_kvm(const char *path)
{
	int fd = open(path ? path : "/dev/kvm", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	int r = check_kvm(fd);
	if (r) {
		close(fd);
		return r;
	}
	return fd;
}

/* A VM's own duplicate of the caller's /dev/kvm fd: destroy closes the VM's
 * fd whichever way it was made, and the caller keeps and closes its own. */
static int dup_kvm(int kvm_fd)
{
	int r = check_kvm(kvm_fd);
	if (r)
		return r;
	int fd = fcntl(kvm_fd, F_DUPFD_CLOEXEC, 0);
	return fd < 0 ? -errno : fd;
}

int vmm_kvm_api_version(const char *kvm_path)
{
	int fd = open_kvm(kvm_path);
	if (fd < 0)
		return fd;
	close(fd);
	return KVM_API_VERSION;
}

int vmm_core_version(void)
{
	return VMM_CORE_VERSION;
}

static void on_i8042_reset(void *ctx)
{
	struct vmm_event ev = { .type = VMM_EVENT_STOPPED, .reason = VMM_STOP_RESET, .vcpu = -1 };
	vmm_vm_request_stop(ctx, VMM_STOP_RESET, &ev);
}

/* A guard caught guest RAM gone under the VMM (guard.h): whichever thread
 * it was - the I/O thread, a vCPU, Python writing a snapshot - only this VM
 * stops, with the guest physical address. */
static void on_memory_fault(void *ctx, uint64_t gpa)
{
	struct vmm_event ev = { .type = VMM_EVENT_STOPPED, .reason = VMM_STOP_MEMORY_FAULT,
				.vcpu = -1, .code = gpa };
	vmm_vm_request_stop(ctx, VMM_STOP_MEMORY_FAULT, &ev);
}

static int create_machine(struct vmm_vm *vm)
{
	uint64_t idmap = IDENTITY_MAP_ADDR;
	int r = vmm_ioctl(vm->vm_fd, KVM_SET_TSS_ADDR, (void *)(uintptr_t)TSS_ADDR);
	if (r >= 0)
		r = vmm_ioctl(vm->vm_fd, KVM_SET_IDENTITY_MAP_ADDR, &idmap);
	if (r >= 0)
		r = vm->run_size = vmm_ioctl(vm->kvm_fd, KVM_GET_VCPU_MMAP_SIZE, NULL);
	return r < 0 ? r : 0;
}

/* The in-kernel irqchip and PIT, and the interrupt lines that need them.
 * After the RAM, not at create: once an irqchip exists, every memory slot
 * change waits for an SRCU grace period - measured 5-7 ms per slot on our
 * hosts, against 0.1 ms before it (Firecracker's order too: memory, then
 * irqchip).  Before the first device or vCPU. */
static int setup_irqchip(struct vmm_vm *vm)
{
	struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
	if (vm->irqchip)
		return 0;
	int r = vmm_ioctl(vm->vm_fd, KVM_CREATE_IRQCHIP, NULL);
	if (!r)
		r = vmm_ioctl(vm->vm_fd, KVM_CREATE_PIT2, &pit);
	if (!r)
		r = vmm_irq_init(&vm->serial_irq, vm->vm_fd, VMM_SERIAL_IRQ);
	if (!r)
		r = vmm_irq_init(&vm->kbd_irq, vm->vm_fd, VMM_I8042_IRQ);
	vm->irqchip = !r;
	return r;
}

static int create_devices(struct vmm_vm *vm)
{
	int r = vmm_events_init(&vm->events);
	if (!r)
		r = vmm_console_init(&vm->console);
	if (r)
		return r;
	vmm_serial_init(&vm->serial, &vm->console, &vm->serial_irq);
	vmm_i8042_init(&vm->i8042, &vm->kbd_irq, on_i8042_reset, vm);
	r = vmm_bus_register(&vm->pio, VMM_SERIAL_PORT, 8, &vmm_serial_ops, &vm->serial);
	if (!r)
		r = vmm_bus_register(&vm->pio, VMM_I8042_DATA, 5, &vmm_i8042_ops, &vm->i8042);
	return r;
}

/* The VM on kvm_fd (or -errno from getting one), which it then owns. */
static int create_on(int kvm_fd, struct vmm_vm **out)
{
	if (kvm_fd < 0)
		return kvm_fd;
	struct vmm_vm *vm = calloc(1, sizeof(*vm));
	if (!vm) {
		close(kvm_fd);
		return -ENOMEM;
	}
	vm->kvm_fd = kvm_fd;
	vm->vm_fd = -1;
	vm->events.efd = vm->serial_irq.efd = vm->kbd_irq.efd = -1;
	vmm_lifecycle_init(vm);

	int r = vm->vm_fd = vmm_ioctl(vm->kvm_fd, KVM_CREATE_VM, NULL);
	if (r >= 0)
		r = create_machine(vm);
	if (r >= 0) {
		vm->mem = vmm_mem_new();
		r = vm->mem ? 0 : -ENOMEM;
	}
	if (r >= 0) {
		vm->mem->on_fault = on_memory_fault;
		vm->mem->fault_ctx = vm;
	}
	if (r >= 0)
		r = create_devices(vm);
	if (r < 0) {
		vmm_vm_destroy(vm);
		return r;
	}
	*out = vm;
	return 0;
}

int vmm_vm_create(const char *kvm_path, struct vmm_vm **out)
{
	return create_on(open_kvm(kvm_path), out);
}

int vmm_vm_create_fd(int kvm_fd, struct vmm_vm **out)
{
	return create_on(dup_kvm(kvm_fd), out);
}

/* ---- RAM and its KVM slots ---- */

/* (Re)register RAM region `slot` with KVM, dirty logging as vm says. */
static int set_slot(struct vmm_vm *vm, int slot)
{
	const struct vmm_mem_region *reg = vmm_mem_region_at(vm->mem, slot);
	struct kvm_userspace_memory_region kr = {
		.slot = (uint32_t)slot, .flags = vm->track_dirty ? KVM_MEM_LOG_DIRTY_PAGES : 0,
		.guest_phys_addr = reg->gpa, .memory_size = reg->size,
		.userspace_addr = (uint64_t)(uintptr_t)reg->hva,
	};
	return vmm_ioctl(vm->vm_fd, KVM_SET_USER_MEMORY_REGION, &kr);
}

/* A RAM region and its KVM slot: anonymous (fd < 0) or from a file. */
static int add_ram_region(struct vmm_vm *vm, uint64_t gpa, uint64_t size, int fd,
			  uint64_t offset)
{
	int r = vmm_lifecycle_created(vm);
	if (r)
		return r;
	int slot = vm->mem->n;
	r = fd < 0 ? vmm_mem_add_region(vm->mem, gpa, size, NULL)
		   : vmm_mem_add_file_region(vm->mem, gpa, size, fd, offset);
	if (!r && vm->track_dirty)
		r = vmm_mem_track_dirty(vm->mem);
	const struct vmm_mem_region *reg = vmm_mem_region_at(vm->mem, slot);
	if (r) {
		if (reg) {
			vm->mem->n--;
			vmm_mem_unmap(reg);
		}
		return r;
	}
	r = set_slot(vm, slot);
	if (r < 0) {
		/* Undo the region so nothing half-added stays behind. */
		vm->mem->n--;
		vmm_mem_unmap(reg);
		return r;
	}
	return 0;
}

int vmm_vm_add_ram(struct vmm_vm *vm, uint64_t gpa, uint64_t size)
{
	return add_ram_region(vm, gpa, size, -1, 0);
}

int vmm_vm_add_ram_file(struct vmm_vm *vm, uint64_t gpa, uint64_t size, int fd, uint64_t offset)
{
	return add_ram_region(vm, gpa, size, fd, offset);
}

/* Best before the RAM: its slots are then made with logging on (changing
 * a slot later costs an SRCU grace period each, see setup_irqchip). */
int vmm_vm_track_dirty(struct vmm_vm *vm)
{
	int r = vmm_lifecycle_created(vm);
	if (r || vm->track_dirty)
		return r;
	vm->track_dirty = 1;
	for (int i = 0; i < vm->mem->n && !r; i++)
		r = set_slot(vm, i);
	if (!r)
		r = vmm_mem_track_dirty(vm->mem);
	if (r)
		vm->track_dirty = 0;
	return r;
}

int vmm_vm_tracks_dirty(const struct vmm_vm *vm)
{
	return vm->track_dirty;
}

int vmm_vm_take_dirty(struct vmm_vm *vm, int slot, uint64_t *bits, uint64_t words)
{
	struct kvm_dirty_log log = { .slot = (uint32_t)slot, .dirty_bitmap = bits };
	memset(bits, 0, words * 8);
	int r = vmm_ioctl(vm->vm_fd, KVM_GET_DIRTY_LOG, &log);
	if (!r)
		vmm_mem_take_dirty(vm->mem, slot, bits, words);
	return r;
}

struct vmm_mem *vmm_vm_mem(struct vmm_vm *vm)
{
	return vm->mem;
}

/* base: KVM's supported CPUID (the checked blob), or NULL for bare vCPUs. */
static int create_vcpus(struct vmm_vm *vm, int n, const struct kvm_cpuid2 *base)
{
	if (n < 1 || n > VMM_MAX_VCPUS)
		return -EINVAL;
	if (vm->nvcpus || vmm_lifecycle_created(vm))
		return -EBUSY;
	int r = setup_irqchip(vm);
	if (r)
		return r;
	vm->cpuid_base = base;	/* read by each vCPU's set-up, during this call only */
	vm->nvcpus = n;	/* CPUID topology needs the count up front */
	for (int i = 0; i < n && !r; i++) {
		r = vmm_vcpu_create(vm, i, !base, &vm->vcpus[i]);
		if (r) {
			while (i--) {
				vmm_vcpu_destroy(vm->vcpus[i]);
				vm->vcpus[i] = NULL;
			}
			vm->nvcpus = 0;
		}
	}
	vm->cpuid_base = NULL;
	return r;
}

int vmm_vm_create_vcpus_bare(struct vmm_vm *vm, int n)
{
	return create_vcpus(vm, n, NULL);
}

size_t vmm_cpuid_blob_size(void)
{
	return vmm_x86_cpuid_size();
}

int vmm_vm_supported_cpuid(struct vmm_vm *vm, void *blob, size_t len)
{
	if (len != vmm_x86_cpuid_size())
		return -EINVAL;
	struct kvm_cpuid2 *c = vmm_x86_supported_cpuid(vm->kvm_fd);
	if (!c)
		return errno ? -errno : -ENOMEM;
	memcpy(blob, c, len);
	free(c);
	return 0;
}

/* The blob comes from our own process, but it is a length and a count
 * that index a buffer: both checked. */
int vmm_vm_create_vcpus_cpuid(struct vmm_vm *vm, int n, const void *blob, size_t len)
{
	const struct kvm_cpuid2 *base = blob;
	if (!blob || len != vmm_x86_cpuid_size() ||
	    base->nent > (len - sizeof(*base)) / sizeof(base->entries[0]))
		return -EINVAL;
	return create_vcpus(vm, n, base);
}

int vmm_vm_vcpu_count(const struct vmm_vm *vm)
{
	return vm->nvcpus;
}

static void destroy_virtio(struct vmm_vm *vm)
{
	for (int i = 0; i < vm->nvirtio; i++) {
		vmm_virtio_detach_kvm(vm->virtio[i], vm->vm_fd);
		vmm_virtio_free(vm->virtio[i]);
	}
	vm->nvirtio = 0;
}

/* Wire a device into KVM (ioeventfds, irqfd) and the MMIO bus; on failure
 * the device is freed and nothing of it stays. */
static int attach_virtio(struct vmm_vm *vm, struct vmm_virtio *v, uint64_t mmio_base,
			 uint32_t gsi)
{
	int r = vmm_virtio_attach_kvm(v, vm->vm_fd, mmio_base, gsi);
	if (!r) {
		r = vmm_bus_register(&vm->mmio, mmio_base, VMM_VIRTIO_MMIO_SIZE,
				     &vmm_virtio_mmio_ops, v);
		if (r)
			vmm_virtio_detach_kvm(v, vm->vm_fd);
	}
	if (r) {
		vmm_virtio_free(v);
		return r;
	}
	vm->virtio[vm->nvirtio] = v;
	return vm->nvirtio++;
}

static int can_add_virtio(struct vmm_vm *vm)
{
	int r = vmm_lifecycle_created(vm);
	if (r)
		return r;
	return vm->nvirtio == VMM_MAX_VIRTIO ? -ENOSPC : setup_irqchip(vm);
}

int vmm_vm_add_virtio_blk(struct vmm_vm *vm, int image_fd, int read_only,
			  const char *serial, uint64_t mmio_base, uint32_t gsi)
{
	struct vmm_blk *b;
	int r = can_add_virtio(vm);
	if (!r)
		r = vmm_blk_create(vm->mem, image_fd, read_only, serial, &b);
	return r ? r : attach_virtio(vm, &b->transport, mmio_base, gsi);
}

int vmm_vm_add_virtio_net(struct vmm_vm *vm, int tap_fd, const uint8_t *mac, uint32_t max_frame,
			  uint64_t mmio_base, uint32_t gsi)
{
	struct vmm_net *n;
	int r = can_add_virtio(vm);
	if (!r)
		r = vmm_net_create(vm->mem, tap_fd, mac, max_frame, &n);
	return r ? r : attach_virtio(vm, &n->transport, mmio_base, gsi);
}

int vmm_vm_add_virtio_rng(struct vmm_vm *vm, uint32_t max_request, uint64_t mmio_base,
			  uint32_t gsi)
{
	struct vmm_rng *d;
	int r = can_add_virtio(vm);
	if (!r)
		r = vmm_rng_create(vm->mem, max_request, &d);
	return r ? r : attach_virtio(vm, &d->transport, mmio_base, gsi);
}

int vmm_vm_add_virtio_vsock(struct vmm_vm *vm, uint64_t guest_cid, int listen_fd, int dir_fd,
			    const char *name, uint64_t mmio_base, uint32_t gsi)
{
	struct vmm_vsock *vs;
	int r = can_add_virtio(vm);
	if (!r)
		r = vmm_vsock_create(vm->mem, guest_cid, listen_fd, dir_fd, name, &vs);
	return r ? r : attach_virtio(vm, &vs->transport, mmio_base, gsi);
}

int vmm_vm_virtio_stats(struct vmm_vm *vm, int idx, struct vmm_virtio_stats *out)
{
	if (idx < 0 || idx >= vm->nvirtio)
		return -EINVAL;
	vmm_virtio_get_stats(vm->virtio[idx], out);
	return 0;
}

/* What KVM's teardown of a VM costs (its MMU, its memory slots: 1-15 ms,
 * measured) need not be waited for: once every device, vCPU and host fd of
 * ours is closed, the VM fd, /dev/kvm and the guest RAM behind them go to a
 * thread of their own that closes and frees them in KVM's order. */
struct reap {
	int vm_fd, kvm_fd;
	struct vmm_mem *mem;
};

static void reap_now(struct reap *r)
{
	if (r->vm_fd >= 0)
		close(r->vm_fd);
	if (r->kvm_fd >= 0)
		close(r->kvm_fd);
	vmm_mem_free(r->mem);	/* after the VM fd: KVM no longer maps it */
}

static void *reaper(void *arg)
{
	reap_now(arg);
	free(arg);
	return NULL;
}

static void reap(struct reap r, int deferred)
{
	struct reap *copy = deferred ? malloc(sizeof(*copy)) : NULL;
	pthread_attr_t attr;
	pthread_t t;
	if (copy) {
		*copy = r;
		if (!pthread_attr_init(&attr)) {
			pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
			int failed = pthread_create(&t, &attr, reaper, copy);
			pthread_attr_destroy(&attr);
			if (!failed)
				return;
		}
		free(copy);
	}
	reap_now(&r);	/* no thread to be had: now, then */
}

static void destroy(struct vmm_vm *vm, int deferred)
{
	if (!vm)
		return;
	if (vm->vm_fd >= 0)
		vmm_vm_stop(vm);
	destroy_virtio(vm);
	for (int i = 0; i < vm->nvcpus; i++)
		vmm_vcpu_destroy(vm->vcpus[i]);
	vmm_irq_close(&vm->serial_irq);
	vmm_irq_close(&vm->kbd_irq);
	if (vm->events.efd >= 0) {
		vmm_serial_close(&vm->serial);
		vmm_i8042_close(&vm->i8042);
		vmm_events_close(&vm->events);
	}
	vmm_console_close(&vm->console);
	reap((struct reap){ .vm_fd = vm->vm_fd, .kvm_fd = vm->kvm_fd, .mem = vm->mem }, deferred);
	vmm_lifecycle_destroy(vm);
	free(vm);
}

void vmm_vm_destroy(struct vmm_vm *vm)
{
	destroy(vm, 0);
}

void vmm_vm_destroy_deferred(struct vmm_vm *vm)
{
	destroy(vm, 1);
}

int vmm_vm_get_stats(const struct vmm_vm *vm, struct vmm_vm_stats *o)
{
	memset(o, 0, sizeof(*o));
	for (int i = 0; i < vm->nvcpus; i++) {
		const struct vmm_vcpu_stats *s = &vm->vcpus[i]->st;
		o->exits += LOAD(&s->exits);
		o->exits_io += LOAD(&s->io);
		o->exits_mmio += LOAD(&s->mmio);
		o->exits_hlt += LOAD(&s->hlt);
		o->exits_intr += LOAD(&s->intr);
		o->exits_other += LOAD(&s->other);
		o->unhandled_io += LOAD(&s->unhandled_io);
		o->unhandled_mmio += LOAD(&s->unhandled_mmio);
	}
	o->console_bytes = vmm_console_get_head(&vm->console);
	o->console_dropped = LOAD(&vm->console.dropped);
	o->events_dropped = LOAD(&vm->events.dropped);
	o->start_ns = LOAD(&vm->start_ns);
	o->first_run_ns = LOAD(&vm->first_run_ns);
	o->first_output_ns = LOAD(&vm->console.first_ns);
	return 0;
}

int vmm_vm_thread_count(const struct vmm_vm *vm)
{
	return LOAD(&vm->threads);
}

int vmm_vm_event_fd(const struct vmm_vm *vm)
{
	return vm->events.efd;
}

int vmm_vm_next_event(struct vmm_vm *vm, struct vmm_event *out)
{
	return vmm_events_pop(&vm->events, out);
}

int vmm_vm_console_set_fd(struct vmm_vm *vm, int out_fd)
{
	pthread_mutex_lock(&vm->console.lock);
	vm->console.out_fd = out_fd;
	pthread_mutex_unlock(&vm->console.lock);
	return 0;
}

int vmm_vm_console_notify_fd(const struct vmm_vm *vm)
{
	return vm->console.notify_fd;
}

int64_t vmm_vm_console_read(struct vmm_vm *vm, uint64_t *pos, void *buf, uint64_t len)
{
	return vmm_console_read(&vm->console, pos, buf, len);
}

uint64_t vmm_vm_console_head(const struct vmm_vm *vm)
{
	return LOAD(&vm->console.flushed);
}

int vmm_vm_console_input(struct vmm_vm *vm, const void *buf, uint64_t len)
{
	return vmm_serial_input(&vm->serial, buf, len);
}

int vmm_vm_send_ctrl_alt_del(struct vmm_vm *vm)
{
	if (vmm_vm_state(vm) != VMM_VM_RUNNING)
		return -EINVAL;
	return vmm_i8042_ctrl_alt_del(&vm->i8042);
}

#define IOAPIC_PINS 24

int vmm_vm_pulse_irq(struct vmm_vm *vm, uint32_t gsi)
{
	if (!vm->irqchip || gsi >= IOAPIC_PINS)
		return -EINVAL;
	/* High then low: an edge-triggered IOAPIC pin latches the rising edge,
	 * and the line is left low as an idle ISA line is. */
	struct kvm_irq_level line = { .irq = gsi, .level = 1 };
	if (ioctl(vm->vm_fd, KVM_IRQ_LINE, &line) < 0)
		return -errno;
	line.level = 0;
	if (ioctl(vm->vm_fd, KVM_IRQ_LINE, &line) < 0)
		return -errno;
	return 0;
}
