/*
 * events.h - the C -> Python event channel: a bounded ring guarded by a
 * mutex plus an eventfd that becomes readable when the ring is not empty.
 * Producers are vCPU and I/O threads; the single consumer is Python.
 * A full ring drops the newest event and counts it, never blocks a vCPU.
 */
#ifndef VMM_EVENTS_H
#define VMM_EVENTS_H
#include <pthread.h>
#include "vmmcore.h"

#define VMM_EVENT_RING 64

struct vmm_events {
	pthread_mutex_t lock;
	int efd;
	unsigned head, tail;	/* free-running; tail - head = queued */
	uint64_t dropped, dropped_reported;
	struct vmm_event ring[VMM_EVENT_RING];
};

int vmm_events_init(struct vmm_events *ev);
void vmm_events_close(struct vmm_events *ev);
void vmm_events_push(struct vmm_events *ev, const struct vmm_event *e);
int vmm_events_pop(struct vmm_events *ev, struct vmm_event *out);
uint64_t vmm_now_ns(void);

#endif
