/*
 * vcpu.h - one vCPU: its KVM fd, the shared kvm_run page, counters and the
 * thread running the KVM_RUN loop.  Exits are dispatched in C: PIO and
 * MMIO to the VM's buses, fatal exits to vmm_vm_request_stop().
 */
#ifndef VMM_VCPU_H
#define VMM_VCPU_H
#include <pthread.h>
#include <linux/kvm.h>

#include "kvmstats.h"
#include "vm.h"

struct vmm_vcpu_stats {
	uint64_t exits, io, mmio, hlt, intr, other, unhandled_io, unhandled_mmio;
};

struct vmm_vcpu {
	struct vmm_vm *vm;
	int idx;
	int fd;
	struct kvm_run *run;
	pthread_t thread;
	int started;
	int probe_halt;		/* the watchdog asks: are you halted, IF=0? (atomic) */
	int dead_halt;		/* answer (atomic) */
	int answered;		/* dead_halt answers for the activity below (atomic) */
	uint64_t answered_exits, answered_kvm;	/* the activity at the answer (atomic) */
	uint64_t last_exits, last_kvm;	/* the watchdog's view (its rounds run on the I/O thread) */
	int quiet_rounds;	/* rounds without activity since the last (watchdog's) */
	int ask_after;		/* quiet rounds before it is asked (watchdog's; 0 = 1) */
	struct vmm_kvmstats kstats;	/* KVM's counters of this vCPU (kvmstats.h) */
	struct vmm_vcpu_stats st;	/* written by the owning thread only */
};

/* bare: no CPUID, MSRs, LAPIC or FPU set-up (a snapshot's state follows). */
int vmm_vcpu_create(struct vmm_vm *vm, int idx, int bare, struct vmm_vcpu **out);
void vmm_vcpu_destroy(struct vmm_vcpu *vc);
int vmm_vcpu_start(struct vmm_vcpu *vc);
void vmm_vcpu_kick(struct vmm_vcpu *vc);
void vmm_vcpu_join(struct vmm_vcpu *vc);
/* One round of the halt watchdog (vcpu.c explains it); *rounds carries the
 * count of "all dead" rounds in a row from one call to the next.  Stops the
 * VM (HALT) on the second. */
void vmm_vcpus_probe_halt(struct vmm_vm *vm, int *rounds);
/* x86.c: KVM's supported CPUID (with the VM-wide bits set), read once per
 * VM; then CPUID, MSRs, LAPIC LINTs and FPU for each fresh vCPU. */
struct kvm_cpuid2 *vmm_x86_supported_cpuid(int kvm_fd);
size_t vmm_x86_cpuid_size(void);	/* a struct kvm_cpuid2 with room for every entry */
int vmm_x86_setup_vcpu(struct vmm_vm *vm, struct vmm_vcpu *vc);
int vmm_x86_set_boot_regs(struct vmm_vcpu *vc, const struct vmm_boot_regs *b);
int vmm_x86_get_regs(struct vmm_vcpu *vc, struct vmm_boot_regs *b, uint32_t *mp_state);
/* Snapshots: the whole state, in the order KVM needs it back. */
int vmm_x86_save_vcpu(struct vmm_vcpu *vc, struct vmm_vcpu_state *s);
/* tsc_advance_ns: how far the guest's TSC moves past its saved value (0: not
 * at all), at the vCPU's own TSC rate. */
int vmm_x86_restore_vcpu(struct vmm_vcpu *vc, const struct vmm_vcpu_state *s,
			 uint64_t tsc_advance_ns);

#endif
