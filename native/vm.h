/*
 * vm.h - struct vmm_vm: one microVM's KVM fds, memory, buses, devices,
 * threads and lifecycle flags.  Control operations (start, pause, resume,
 * stop in lifecycle.c; destroy) serialize on ctl_lock; vCPU threads read
 * the flags without it (atomics), so the hot path takes no VM-wide lock.
 */
#ifndef VMM_VM_H
#define VMM_VM_H
#include <pthread.h>

#include "bus.h"
#include "console.h"
#include "events.h"
#include "i8042.h"
#include "irq.h"
#include "memory.h"
#include "serial.h"
#include "virtio_mmio.h"

#define VMM_MAX_VCPUS 32
#define VMM_MAX_VIRTIO 16

struct vmm_vcpu;
struct vmm_iothread;

struct vmm_vm {
	int kvm_fd, vm_fd;
	int run_size;		/* mmap size of struct kvm_run */
	struct vmm_mem *mem;
	struct vmm_bus pio, mmio;
	struct vmm_events events;
	struct vmm_console console;
	struct vmm_irq serial_irq, kbd_irq;
	struct vmm_serial serial;
	struct vmm_i8042 i8042;
	int nvcpus;
	struct vmm_vcpu *vcpus[VMM_MAX_VCPUS];
	/* KVM's supported CPUID, read once while vCPUs are created (x86.c). */
	const struct kvm_cpuid2 *cpuid_base;
	struct vmm_iothread *io;
	int nvirtio;
	struct vmm_virtio *virtio[VMM_MAX_VIRTIO];	/* served by the I/O thread */

	/* Run state and the park protocol: lifecycle.c's. */
	pthread_mutex_t ctl_lock;	/* one control operation at a time */
	pthread_mutex_t park_lock;	/* vCPUs parking for pause */
	pthread_cond_t park_cond;
	int parked;			/* vCPUs parked (or exited) */
	int pause_req, stop_req;	/* atomics */
	int state;			/* enum vmm_vm_state (atomic) */
	int stop_reason;		/* first reason wins (atomic) */
	int threads;			/* live C threads (atomic) */
	int track_dirty;		/* dirty-page logging on (snapshots) */
	int irqchip;			/* in-kernel irqchip and PIT made */
	int threadless;			/* PAUSED with no thread yet: they start at resume (ctl_lock) */
	/* Set by a machine restore that moves the clock to the host's (state.c):
	 * the vCPUs' TSCs, restored after it, move forward by as much (x86.c). */
	uint64_t tsc_advance_ns;
	uint64_t start_ns, first_run_ns;	/* vmm_vm_stats explains (atomic) */
};

/* The pages of RAM region `slot` dirtied since the last call, one bit
 * each in bits (words long, zeroed here): KVM's log (which KVM clears as
 * it hands it over) OR the pages the VMM's devices wrote.  Dirty tracking
 * must be on. */
int vmm_vm_take_dirty(struct vmm_vm *vm, int slot, uint64_t *bits, uint64_t words);

#endif
