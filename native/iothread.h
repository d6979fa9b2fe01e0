/*
 * iothread.h - the VM's C I/O thread: an epoll loop that serves queue
 * ioeventfds, device backend fds (taps) and timers (console flush, the halt
 * watchdog).  Python never runs here.  It parks while the VM is paused.
 */
#ifndef VMM_IOTHREAD_H
#define VMM_IOTHREAD_H
#include <pthread.h>

#include "vm.h"

/* What a device's poll_backend hook needs to (un)watch its fd. */
struct vmm_io_watch {
	int epfd, fd;
	uint64_t tag;
};

struct vmm_iothread {
	struct vmm_vm *vm;
	int epfd;
	int wake_fd;		/* eventfd: stop request */
	int watchdog_fd;	/* timerfd: halt detection, 1 s */
	pthread_t thread;
	int started;
	int quit;		/* atomic */
	struct vmm_io_watch backend[VMM_MAX_VIRTIO];
};

int vmm_iothread_start(struct vmm_vm *vm, struct vmm_iothread **out);
void vmm_iothread_stop(struct vmm_iothread *io);
/* Make the loop look at its flags (pause) now. */
void vmm_iothread_wake(struct vmm_iothread *io);

#endif
