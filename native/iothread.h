/*
 * iothread.h - the VM's C I/O thread: an epoll loop that serves timers
 * (console flush, the halt watchdog) and, in later devices, queue
 * ioeventfds and tap fds.  Python never runs here.
 */
#ifndef VMM_IOTHREAD_H
#define VMM_IOTHREAD_H
#include <pthread.h>

#include "vm.h"

struct vmm_iothread {
	struct vmm_vm *vm;
	int epfd;
	int wake_fd;		/* eventfd: stop request */
	int watchdog_fd;	/* timerfd: halt detection, 1 s */
	pthread_t thread;
	int started;
	int quit;		/* atomic */
};

int vmm_iothread_start(struct vmm_vm *vm, struct vmm_iothread **out);
void vmm_iothread_stop(struct vmm_iothread *io);

#endif
