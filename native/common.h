/*
 * common.h - the two helpers every part of the core wants, written once.
 *
 * LOAD/STORE: the flags and counters that threads share without a lock
 * (pause_req, stop_req, state, stop_reason...).  Sequentially consistent on
 * purpose: the kick protocol (vcpu.c) relies on a flag store being seen
 * before the kick that follows it, and these are not on a path where a
 * weaker order would pay.
 *
 * vmm_ioctl: an ioctl that retries when a signal interrupts it and answers
 * in the core's convention: the ioctl's own non-negative result (an fd, a
 * size, a count, usually 0) or -errno.  Not for KVM_RUN, whose -EINTR is
 * the vCPU kick and must reach the run loop.
 */
#ifndef VMM_COMMON_H
#define VMM_COMMON_H
#include <errno.h>
#include <sys/ioctl.h>

#define LOAD(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)

static inline int vmm_ioctl(int fd, unsigned long req, void *arg)
{
	int r;
	do {
		r = ioctl(fd, req, arg);
	} while (r < 0 && errno == EINTR);
	return r < 0 ? -errno : r;
}

#endif
