/*
 * console.h - where guest console bytes go: a bounded history ring read by
 * absolute position (many readers, each with its own cursor), an optional
 * output fd, and an eventfd that tells readers new bytes arrived.
 *
 * Writes are batched: the producer flushes to the fd and notifies on a
 * newline or a full batch; a partial line is flushed by the I/O thread a
 * few milliseconds later (vmm_console_flush), so prompts still appear.
 */
#ifndef VMM_CONSOLE_H
#define VMM_CONSOLE_H
#include <pthread.h>
#include "vmmcore.h"

#define VMM_CONSOLE_RING (256 * 1024)	/* power of two */
#define VMM_CONSOLE_BATCH 1024

struct vmm_console {
	pthread_mutex_t lock;
	uint8_t *ring;
	uint64_t head;		/* total bytes ever written */
	uint64_t flushed;	/* bytes already sent to out_fd / notified */
	uint64_t base;		/* nothing kept below (a restored VM's first offset) */
	int out_fd;
	int notify_fd;		/* eventfd */
	int timer_fd;		/* one-shot: flush a partial line (I/O thread) */
	int timer_armed;
	uint64_t dropped;
	uint64_t first_ns;	/* CLOCK_MONOTONIC of the first byte put, 0 before */
};

int vmm_console_init(struct vmm_console *c);
void vmm_console_close(struct vmm_console *c);
void vmm_console_put(struct vmm_console *c, uint8_t byte);
void vmm_console_flush(struct vmm_console *c);
/* The I/O thread calls this when timer_fd fires. */
void vmm_console_timer(struct vmm_console *c);
int64_t vmm_console_read(struct vmm_console *c, uint64_t *pos, void *buf, uint64_t len);
/* Bytes ever written: what a snapshot keeps of the console. */
uint64_t vmm_console_get_head(const struct vmm_console *c);
/* A restored VM's console goes on at the offset it had (the bytes before
 * it are not kept: readers see them as lost). */
void vmm_console_set_head(struct vmm_console *c, uint64_t head);

#endif
