/*
 * events.c - bounded event ring with eventfd wake-up.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "events.h"

uint64_t vmm_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int vmm_events_init(struct vmm_events *ev)
{
	memset(ev, 0, sizeof(*ev));
	ev->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (ev->efd < 0)
		return -errno;
	pthread_mutex_init(&ev->lock, NULL);
	return 0;
}

void vmm_events_close(struct vmm_events *ev)
{
	if (ev->efd >= 0)
		close(ev->efd);
	ev->efd = -1;
	pthread_mutex_destroy(&ev->lock);
}

void vmm_events_push(struct vmm_events *ev, const struct vmm_event *e)
{
	pthread_mutex_lock(&ev->lock);
	if (ev->tail - ev->head < VMM_EVENT_RING) {
		ev->ring[ev->tail % VMM_EVENT_RING] = *e;
		if (!ev->ring[ev->tail % VMM_EVENT_RING].time_ns)
			ev->ring[ev->tail % VMM_EVENT_RING].time_ns = vmm_now_ns();
		ev->tail++;
	} else {
		ev->dropped++;
	}
	pthread_mutex_unlock(&ev->lock);
	uint64_t one = 1;
	/* A full eventfd counter cannot happen with 64-bit counts; ignore. */
	if (write(ev->efd, &one, sizeof(one)) < 0) {
		/* nothing to do: the consumer polls the ring anyway */
	}
}

int vmm_events_pop(struct vmm_events *ev, struct vmm_event *out)
{
	uint64_t cnt;
	int got = 0;
	pthread_mutex_lock(&ev->lock);
	if (ev->dropped != ev->dropped_reported) {
		memset(out, 0, sizeof(*out));
		out->type = VMM_EVENT_LOST;
		out->vcpu = -1;
		out->code = ev->dropped - ev->dropped_reported;
		out->time_ns = vmm_now_ns();
		ev->dropped_reported = ev->dropped;
		got = 1;
	} else if (ev->tail != ev->head) {
		*out = ev->ring[ev->head % VMM_EVENT_RING];
		ev->head++;
		got = 1;
	}
	if (ev->tail == ev->head && ev->dropped == ev->dropped_reported) {
		/* Drain the counter so poll() sleeps until the next push. */
		if (read(ev->efd, &cnt, sizeof(cnt)) < 0) {
			/* EAGAIN: already drained */
		}
	}
	pthread_mutex_unlock(&ev->lock);
	return got;
}
