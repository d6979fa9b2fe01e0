/*
 * kvmstats.h - a vCPU's activity read from KVM's binary statistics
 * (KVM_GET_STATS_FD, Linux 5.14+): the count of HLT instructions and of
 * interrupts and NMIs KVM delivered, work the guest did that never exits to
 * us (the in-kernel LAPIC handles all three).  Reading it is a pread: the
 * vCPU is not disturbed, which is what lets the halt watchdog leave an idle
 * vCPU alone (vcpu.c).
 */
#ifndef VMM_KVMSTATS_H
#define VMM_KVMSTATS_H
#include <stdint.h>

#define VMM_KVMSTATS_NONE UINT64_MAX	/* no statistics: KVM too old, or read failed */

struct vmm_kvmstats {
	int fd;				/* -1: none */
	uint32_t nofs;
	uint64_t ofs[3];		/* file offsets of the counters summed */
};

/* Never fails: without statistics, fd is -1 and every read says NONE. */
void vmm_kvmstats_open(struct vmm_kvmstats *s, int vcpu_fd);
/* halt_exits + irq_injections + nmi_injections, or VMM_KVMSTATS_NONE. */
uint64_t vmm_kvmstats_activity(const struct vmm_kvmstats *s);
void vmm_kvmstats_close(struct vmm_kvmstats *s);

#endif
