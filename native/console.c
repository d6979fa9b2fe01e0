/*
 * console.c - console history ring, batched fd output and notification.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include "common.h"
#include "console.h"
#include "events.h"	/* vmm_now_ns */

int vmm_console_init(struct vmm_console *c)
{
	memset(c, 0, sizeof(*c));
	c->out_fd = -1;
	c->ring = malloc(VMM_CONSOLE_RING);
	if (!c->ring)
		return -ENOMEM;
	c->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	c->timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
	if (c->notify_fd < 0 || c->timer_fd < 0) {
		int err = -errno;
		if (c->notify_fd >= 0)
			close(c->notify_fd);
		if (c->timer_fd >= 0)
			close(c->timer_fd);
		free(c->ring);
		c->ring = NULL;
		return err;
	}
	pthread_mutex_init(&c->lock, NULL);
	return 0;
}

void vmm_console_close(struct vmm_console *c)
{
	if (!c->ring)
		return;
	vmm_console_flush(c);
	close(c->notify_fd);
	close(c->timer_fd);
	free(c->ring);
	c->ring = NULL;
	pthread_mutex_destroy(&c->lock);
}

/* Called with c->lock held. */
static void flush_locked(struct vmm_console *c)
{
	uint64_t from = c->flushed;
	if (from == c->head)
		return;
	if (c->head - from > VMM_CONSOLE_RING) {
		c->dropped += c->head - VMM_CONSOLE_RING - from;
		from = c->head - VMM_CONSOLE_RING;
	}
	if (c->out_fd >= 0) {
		while (from < c->head) {
			uint64_t off = from & (VMM_CONSOLE_RING - 1);
			uint64_t n = c->head - from;
			if (n > VMM_CONSOLE_RING - off)
				n = VMM_CONSOLE_RING - off;
			ssize_t w = write(c->out_fd, c->ring + off, n);
			if (w < 0 && errno == EINTR)
				continue;
			if (w <= 0) {
				/* A reader that cannot keep up loses output, the guest never waits. */
				c->dropped += c->head - from;
				break;
			}
			from += (uint64_t)w;
		}
	}
	c->flushed = c->head;
	uint64_t one = 1;
	if (write(c->notify_fd, &one, sizeof(one)) < 0) {
		/* counter saturated: readers are woken anyway */
	}
}

void vmm_console_put(struct vmm_console *c, uint8_t byte)
{
	pthread_mutex_lock(&c->lock);
	if (!c->first_ns)
		STORE(&c->first_ns, vmm_now_ns());
	c->ring[c->head & (VMM_CONSOLE_RING - 1)] = byte;
	c->head++;
	if (byte == '\n' || c->head - c->flushed >= VMM_CONSOLE_BATCH) {
		flush_locked(c);
	} else if (!c->timer_armed) {
		/* A partial line (a prompt) shows up 5 ms later at the latest. */
		struct itimerspec its = { .it_value = { .tv_nsec = 5 * 1000 * 1000 } };
		if (timerfd_settime(c->timer_fd, 0, &its, NULL) == 0)
			c->timer_armed = 1;
	}
	pthread_mutex_unlock(&c->lock);
}

void vmm_console_timer(struct vmm_console *c)
{
	uint64_t ticks;
	if (read(c->timer_fd, &ticks, sizeof(ticks)) < 0) {
		/* spurious wake-up: flush anyway */
	}
	pthread_mutex_lock(&c->lock);
	c->timer_armed = 0;
	flush_locked(c);
	pthread_mutex_unlock(&c->lock);
}

void vmm_console_flush(struct vmm_console *c)
{
	pthread_mutex_lock(&c->lock);
	flush_locked(c);
	pthread_mutex_unlock(&c->lock);
}

int64_t vmm_console_read(struct vmm_console *c, uint64_t *pos, void *buf, uint64_t len)
{
	uint64_t copied = 0;
	pthread_mutex_lock(&c->lock);
	uint64_t p = *pos;
	uint64_t oldest = c->head > VMM_CONSOLE_RING ? c->head - VMM_CONSOLE_RING : 0;
	if (oldest < c->base)
		oldest = c->base;
	if (p < oldest)
		p = oldest;
	if (p > c->head)
		p = c->head;
	/* Readers only see flushed bytes, so a line arrives whole. */
	while (p < c->flushed && copied < len) {
		uint64_t off = p & (VMM_CONSOLE_RING - 1);
		uint64_t n = c->flushed - p;
		if (n > VMM_CONSOLE_RING - off)
			n = VMM_CONSOLE_RING - off;
		if (n > len - copied)
			n = len - copied;
		memcpy((uint8_t *)buf + copied, c->ring + off, n);
		copied += n;
		p += n;
	}
	*pos = p;
	pthread_mutex_unlock(&c->lock);
	return (int64_t)copied;
}

uint64_t vmm_console_get_head(const struct vmm_console *c)
{
	return LOAD(&c->head);	/* lock-free: a reader between two bytes is fine */
}

void vmm_console_set_head(struct vmm_console *c, uint64_t head)
{
	pthread_mutex_lock(&c->lock);
	c->head = c->flushed = c->base = head;
	pthread_mutex_unlock(&c->lock);
}
