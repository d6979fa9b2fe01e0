/*
 * iothread.c - the VM's epoll loop: virtio queue ioeventfds, device backend
 * fds (taps), the console flush timer and the halt watchdog's timer (one
 * round a second of vmm_vcpus_probe_halt, whose policy is vcpu.c's).  It
 * parks with the vCPUs while the VM is paused.
 */
#define _GNU_SOURCE	/* pthread_setname_np */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include "common.h"
#include "guard.h"
#include "iothread.h"
#include "lifecycle.h"
#include "vcpu.h"

/* epoll data: a tag in the high 32 bits; for virtio, device << 8 | queue. */
enum { TAG_WAKE = 1, TAG_CONSOLE = 2, TAG_WATCHDOG = 3, TAG_VIRTIO = 4, TAG_BACKEND = 5 };
#define EV(tag, low) (((uint64_t)(tag) << 32) | (uint32_t)(low))

/* Pause: the I/O thread parks like a vCPU, so no device touches guest
 * memory while the VM is paused (snapshots rely on it). */
static void park(struct vmm_iothread *io)
{
	struct vmm_vm *vm = io->vm;
	vmm_console_flush(&vm->console);	/* a partial line shows while paused */
	vmm_lifecycle_park(vm, &io->quit);
}

static void serve(struct vmm_iothread *io, uint64_t data, int *rounds)
{
	uint32_t low = (uint32_t)data;
	uint64_t cnt;
	switch (data >> 32) {
	case TAG_VIRTIO:
		vmm_virtio_kick(io->vm->virtio[low >> 8], low & 0xff);
		break;
	case TAG_BACKEND:
		vmm_virtio_backend_ready(io->vm->virtio[low]);
		break;
	case TAG_CONSOLE:
		vmm_console_timer(&io->vm->console);
		break;
	case TAG_WATCHDOG:
		if (read(io->watchdog_fd, &cnt, sizeof(cnt)) < 0) {
			/* spurious */
		}
		vmm_vcpus_probe_halt(io->vm, rounds);
		break;
	default:	/* wake-up: the loop condition decides */
		if (read(io->wake_fd, &cnt, sizeof(cnt)) < 0) {
			/* already drained */
		}
		break;
	}
}

static void *io_main(void *arg)
{
	struct vmm_iothread *io = arg;
	struct epoll_event evs[16];
	int rounds = 0;
	sigset_t set;
	pthread_setname_np(pthread_self(), "vmio");	/* as top -H, ps -L show it */
	vmm_guard_thread_sigset(&set);	/* SIGBUS stays deliverable: devices run guarded */
	pthread_sigmask(SIG_SETMASK, &set, NULL);
	while (!LOAD(&io->quit)) {
		if (LOAD(&io->vm->pause_req) && !LOAD(&io->vm->stop_req)) {
			park(io);
			continue;
		}
		int n = epoll_wait(io->epfd, evs, 16, -1);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			break;
		for (int i = 0; i < n; i++)
			serve(io, evs[i].data.u64, &rounds);
	}
	__atomic_sub_fetch(&io->vm->threads, 1, __ATOMIC_SEQ_CST);
	return NULL;
}

/* A device's hook to stop/restart polling its backend (level-triggered:
 * a stopped fd keeps its input until polling restarts). */
static void poll_backend(void *ctx, int on)
{
	struct vmm_io_watch *w = ctx;
	struct epoll_event ev = { .events = on ? EPOLLIN : 0, .data.u64 = w->tag };
	epoll_ctl(w->epfd, EPOLL_CTL_MOD, w->fd, &ev);
}

static int watch(int epfd, int fd, uint64_t tag)
{
	struct epoll_event ev = { .events = EPOLLIN, .data.u64 = tag };
	return epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0 ? -errno : 0;
}

/* Queue ioeventfds and the backend fd of device d; the device gets the
 * hook to pause its backend. */
static int watch_device(struct vmm_iothread *io, int d)
{
	struct vmm_virtio *v = io->vm->virtio[d];
	int r = 0;
	for (int q = 0; !r && q < VMM_VIRTIO_MAX_QUEUES; q++)
		if (v->kick_fd[q] >= 0)
			r = watch(io->epfd, v->kick_fd[q], EV(TAG_VIRTIO, (d << 8) | q));
	if (r || v->backend_fd < 0)
		return r;
	struct vmm_io_watch *w = &io->backend[d];
	*w = (struct vmm_io_watch){ .epfd = io->epfd, .fd = v->backend_fd, .tag = EV(TAG_BACKEND, d) };
	r = watch(io->epfd, w->fd, w->tag);
	if (!r) {
		pthread_mutex_lock(&v->lock);
		v->poll_backend = poll_backend;
		v->poll_ctx = w;
		pthread_mutex_unlock(&v->lock);
	}
	return r;
}

static void unwatch_devices(struct vmm_iothread *io)
{
	for (int d = 0; d < io->vm->nvirtio; d++) {
		struct vmm_virtio *v = io->vm->virtio[d];
		pthread_mutex_lock(&v->lock);
		v->poll_backend = NULL;
		v->poll_ctx = NULL;
		pthread_mutex_unlock(&v->lock);
	}
}

static void close_fds(struct vmm_iothread *io)
{
	if (io->epfd >= 0)
		close(io->epfd);
	if (io->wake_fd >= 0)
		close(io->wake_fd);
	if (io->watchdog_fd >= 0)
		close(io->watchdog_fd);
}

int vmm_iothread_start(struct vmm_vm *vm, struct vmm_iothread **out)
{
	struct vmm_iothread *io = calloc(1, sizeof(*io));
	if (!io)
		return -ENOMEM;
	io->vm = vm;
	io->epfd = epoll_create1(EPOLL_CLOEXEC);
	io->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	io->watchdog_fd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
	int r = (io->epfd < 0 || io->wake_fd < 0 || io->watchdog_fd < 0) ? -errno : 0;
	struct itimerspec its = { .it_value = { .tv_sec = 1 }, .it_interval = { .tv_sec = 1 } };
	if (!r && timerfd_settime(io->watchdog_fd, 0, &its, NULL) < 0)
		r = -errno;
	if (!r)
		r = watch(io->epfd, io->wake_fd, EV(TAG_WAKE, 0));
	if (!r)
		r = watch(io->epfd, io->watchdog_fd, EV(TAG_WATCHDOG, 0));
	if (!r)
		r = watch(io->epfd, vm->console.timer_fd, EV(TAG_CONSOLE, 0));
	for (int d = 0; !r && d < vm->nvirtio; d++)
		r = watch_device(io, d);
	if (!r) {
		__atomic_add_fetch(&vm->threads, 1, __ATOMIC_SEQ_CST);
		r = -pthread_create(&io->thread, NULL, io_main, io);
		if (r)
			__atomic_sub_fetch(&vm->threads, 1, __ATOMIC_SEQ_CST);
	}
	if (r) {
		unwatch_devices(io);
		close_fds(io);
		free(io);
		return r;
	}
	io->started = 1;
	*out = io;
	return 0;
}

void vmm_iothread_wake(struct vmm_iothread *io)
{
	uint64_t one = 1;
	if (io && write(io->wake_fd, &one, sizeof(one)) < 0) {
		/* counter full: the thread is awake anyway */
	}
}

void vmm_iothread_stop(struct vmm_iothread *io)
{
	if (!io)
		return;
	STORE(&io->quit, 1);
	vmm_iothread_wake(io);
	if (io->started)
		pthread_join(io->thread, NULL);
	unwatch_devices(io);
	close_fds(io);
	free(io);
}
