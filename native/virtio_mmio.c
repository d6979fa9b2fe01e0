/*
 * virtio_mmio.c - virtio-mmio v2 register file and transport logic.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/kvm.h>

#include "guard.h"
#include "virtio_mmio.h"
#include "virtio_mmio_regs.h"

enum {
	VENDOR = 0x444d4d56 /* "VMMD" */,
	ST_FEATURES_OK = 8, ST_DRIVER_OK = 4,
	QUEUE_MAX = 256,
};

#define TRANSPORT_FEATURES (VMM_VIRTIO_F_VERSION_1 | VMM_VIRTIO_F_EVENT_IDX | \
			    VMM_VIRTIO_F_INDIRECT_DESC)

void vmm_virtio_init(struct vmm_virtio *v, const struct vmm_virtio_ops *ops, void *priv,
		     const struct vmm_mem *mem)
{
	memset(v, 0, sizeof(*v));
	pthread_mutex_init(&v->lock, NULL);
	v->ops = ops;
	v->priv = priv;
	v->mem = mem;
	v->irq.efd = -1;
	v->backend_fd = -1;
	for (int i = 0; i < VMM_VIRTIO_MAX_QUEUES; i++)
		v->kick_fd[i] = -1;
}

static uint64_t offered(const struct vmm_virtio *v)
{
	return v->ops->features | TRANSPORT_FEATURES;
}

static void raise_irq(struct vmm_virtio *v, uint32_t why)
{
	v->int_status |= why;
	v->st.interrupts++;
	vmm_irq_trigger(&v->irq);
}

void vmm_virtio_fail(struct vmm_virtio *v)
{
	v->st.bad_chains++;
	if (!(v->status & VMM_VIRTIO_STATUS_NEEDS_RESET)) {
		v->status |= VMM_VIRTIO_STATUS_NEEDS_RESET;
		raise_irq(v, VIRTIO_MMIO_INT_CONFIG);
	}
}

void vmm_virtio_signal_used(struct vmm_virtio *v, uint32_t q)
{
	if (vmm_virtq_need_interrupt(&v->q[q]))
		raise_irq(v, VIRTIO_MMIO_INT_VRING);
}

static void reset(struct vmm_virtio *v)
{
	/* A faulted device stays broken: its memory will not come back. */
	v->status = v->faulted ? VMM_VIRTIO_STATUS_NEEDS_RESET : 0;
	v->driver_features = 0;
	v->int_status = 0;
	v->dev_feat_sel = v->drv_feat_sel = v->queue_sel = 0;
	for (int i = 0; i < VMM_VIRTIO_MAX_QUEUES; i++)
		vmm_virtq_reset(&v->q[i]);
	if (v->ops->reset)
		v->ops->reset(v->priv);
}

static struct vmm_virtq *selected(struct vmm_virtio *v)
{
	/* guest-controlled selector */
	return v->queue_sel < v->ops->num_queues ? &v->q[v->queue_sel] : NULL;
}

/* Buffers are the driver's until DRIVER_OK (virtio 1.x, 3.1.2): the device
 * consumes none before it, whatever a guest-controlled notify says.  A
 * device that failed (NEEDS_RESET: a bad chain) stays stopped until the
 * driver resets it: its queue_notify is not called, the notify only counted. */
static void serve_queue(struct vmm_virtio *v, uint32_t q)
{
	if (!(v->status & ST_DRIVER_OK) || v->faulted)
		return;
	v->st.notifies++;
	if (!(v->status & VMM_VIRTIO_STATUS_NEEDS_RESET))
		v->ops->queue_notify(v, q);
}

/* Back from a guard's jump (lock held): the page at g->fault_addr is gone.
 * Whatever the device was doing is abandoned half-way; it never runs again.
 * No interrupt for the NEEDS_RESET: it would only wake the guest into the
 * missing memory, and its crash there could win the VM's stop reason. */
static void memory_fault(struct vmm_virtio *v, const struct vmm_guard *g)
{
	v->faulted = 1;
	v->status |= VMM_VIRTIO_STATUS_NEEDS_RESET;
	vmm_virtio_poll_backend(v, 0);	/* a readable tap would spin the I/O thread */
	vmm_mem_fault(v->mem, g->fault_addr);
}

static uint32_t reg_read(struct vmm_virtio *v, uint64_t off)
{
	struct vmm_virtq *q = selected(v);
	switch (off) {
	case VIRTIO_MMIO_MAGIC_VALUE: return VIRTIO_MMIO_MAGIC_VIRT;
	case VIRTIO_MMIO_VERSION: return VIRTIO_MMIO_VERSION_2;
	case VIRTIO_MMIO_DEVICE_ID: return v->ops->device_id;
	case VIRTIO_MMIO_VENDOR_ID: return VENDOR;
	case VIRTIO_MMIO_DEVICE_FEATURES:
		return v->dev_feat_sel > 1 ? 0 : (uint32_t)(offered(v) >> (32 * v->dev_feat_sel));
	case VIRTIO_MMIO_QUEUE_NUM_MAX: return q ? QUEUE_MAX : 0;
	case VIRTIO_MMIO_QUEUE_READY: return q ? (uint32_t)q->ready : 0;
	case VIRTIO_MMIO_INTERRUPT_STATUS: return v->int_status;
	case VIRTIO_MMIO_STATUS: return v->status;
	case VIRTIO_MMIO_CONFIG_GENERATION: return v->config_gen;
	default: return 0;
	}
}

/* FEATURES_OK sticks only for a subset of what we offer, with VERSION_1. */
static void set_status(struct vmm_virtio *v, uint32_t val)
{
	if (val == 0) {
		reset(v);
		return;
	}
	if ((val & ST_FEATURES_OK) && !(v->status & ST_FEATURES_OK)) {
		uint64_t f = v->driver_features;
		if ((f & ~offered(v)) || !(f & VMM_VIRTIO_F_VERSION_1))
			val &= ~ST_FEATURES_OK;
	}
	int was_ok = v->status & ST_DRIVER_OK;
	/* The device's own NEEDS_RESET bit is not the driver's to clear. */
	v->status = (val & 0xff & ~VMM_VIRTIO_STATUS_NEEDS_RESET) |
		    (v->status & VMM_VIRTIO_STATUS_NEEDS_RESET);
	if (!was_ok && (v->status & ST_DRIVER_OK) && v->ops->driver_ok)
		v->ops->driver_ok(v);
}

static void set_queue_ready(struct vmm_virtio *v, struct vmm_virtq *q, uint32_t val)
{
	if (!val) {
		q->ready = 0;
		return;
	}
	q->event_idx = !!(v->driver_features & VMM_VIRTIO_F_EVENT_IDX);
	q->indirect = !!(v->driver_features & VMM_VIRTIO_F_INDIRECT_DESC);
	if (vmm_virtq_activate(q, v->mem) < 0)
		vmm_virtio_fail(v);	/* rings outside RAM or misaligned */
}

static void set_half(uint64_t *x, int high, uint32_t val)
{
	*x = high ? (*x & 0xffffffffull) | ((uint64_t)val << 32) : (*x & ~0xffffffffull) | val;
}

static void reg_write(struct vmm_virtio *v, uint64_t off, uint32_t val)
{
	struct vmm_virtq *q = selected(v);
	/* Queue layout may change only while the queue is off. */
	int q_writable = q && !q->ready;
	switch (off) {
	case VIRTIO_MMIO_DEVICE_FEATURES_SEL: v->dev_feat_sel = val; break;
	case VIRTIO_MMIO_DRIVER_FEATURES_SEL: v->drv_feat_sel = val; break;
	case VIRTIO_MMIO_DRIVER_FEATURES:
		if (v->drv_feat_sel <= 1 && !(v->status & ST_FEATURES_OK))
			set_half(&v->driver_features, (int)v->drv_feat_sel, val);
		break;
	case VIRTIO_MMIO_QUEUE_SEL: v->queue_sel = val; break;
	case VIRTIO_MMIO_QUEUE_NUM:
		if (q_writable)
			q->size = val <= QUEUE_MAX ? (uint16_t)val : 0;
		break;
	case VIRTIO_MMIO_QUEUE_READY:
		if (q)
			set_queue_ready(v, q, val);
		break;
	case VIRTIO_MMIO_QUEUE_NOTIFY:
		/* Only without ioeventfd (tests); the I/O thread serves it otherwise. */
		if (val < v->ops->num_queues)
			serve_queue(v, val);
		break;
	case VIRTIO_MMIO_INTERRUPT_ACK: v->int_status &= ~val; break;
	case VIRTIO_MMIO_STATUS: set_status(v, val); break;
	case VIRTIO_MMIO_QUEUE_DESC_LOW: case VIRTIO_MMIO_QUEUE_DESC_HIGH:
		if (q_writable)
			set_half(&q->desc_gpa, off == VIRTIO_MMIO_QUEUE_DESC_HIGH, val);
		break;
	case VIRTIO_MMIO_QUEUE_AVAIL_LOW: case VIRTIO_MMIO_QUEUE_AVAIL_HIGH:
		if (q_writable)
			set_half(&q->avail_gpa, off == VIRTIO_MMIO_QUEUE_AVAIL_HIGH, val);
		break;
	case VIRTIO_MMIO_QUEUE_USED_LOW: case VIRTIO_MMIO_QUEUE_USED_HIGH:
		if (q_writable)
			set_half(&q->used_gpa, off == VIRTIO_MMIO_QUEUE_USED_HIGH, val);
		break;
	default: break;	/* read-only or unknown: ignored */
	}
}

static void mmio_read(void *priv, uint64_t off, uint8_t *data, uint32_t len)
{
	struct vmm_virtio *v = priv;
	pthread_mutex_lock(&v->lock);
	if (off >= VIRTIO_MMIO_CONFIG) {
		memset(data, 0, len);
		if (v->ops->config_read)
			v->ops->config_read(v->priv, off - VIRTIO_MMIO_CONFIG, data, len);
	} else {
		uint32_t val = (len == 4 && !(off & 3)) ? reg_read(v, off) : 0;
		memset(data, 0, len);
		memcpy(data, &val, len < 4 ? len : 4);
	}
	pthread_mutex_unlock(&v->lock);
}

static void mmio_write(void *priv, uint64_t off, const uint8_t *data, uint32_t len)
{
	struct vmm_virtio *v = priv;
	if (off >= VIRTIO_MMIO_CONFIG || len != 4 || (off & 3))
		return;	/* config is read-only here; registers are 32-bit */
	uint32_t val;
	struct vmm_guard g;
	memcpy(&val, data, 4);
	pthread_mutex_lock(&v->lock);
	if (VMM_GUARD_ENTER(&g, v->mem) == 0)
		reg_write(v, off, val);
	else
		memory_fault(v, &g);
	vmm_guard_leave(&g);
	pthread_mutex_unlock(&v->lock);
}

const struct vmm_bus_ops vmm_virtio_mmio_ops = { mmio_read, mmio_write };

uint32_t vmm_virtio_mmio_read(struct vmm_virtio *v, uint64_t off, uint32_t len)
{
	uint8_t buf[8] = { 0 };
	uint32_t val;
	if (len > 4)
		len = 4;
	mmio_read(v, off, buf, len);
	memcpy(&val, buf, 4);
	return val;
}

void vmm_virtio_mmio_write(struct vmm_virtio *v, uint64_t off, uint32_t value, uint32_t len)
{
	uint8_t buf[4];
	memcpy(buf, &value, 4);
	mmio_write(v, off, buf, len > 4 ? 4 : len);
}

void vmm_virtio_kick(struct vmm_virtio *v, uint32_t q)
{
	uint64_t cnt;
	struct vmm_guard g;
	if (v->kick_fd[q] >= 0 && read(v->kick_fd[q], &cnt, sizeof(cnt)) < 0)
		return;	/* spurious wake-up */
	pthread_mutex_lock(&v->lock);
	if (VMM_GUARD_ENTER(&g, v->mem) == 0)
		serve_queue(v, q);
	else
		memory_fault(v, &g);
	vmm_guard_leave(&g);
	pthread_mutex_unlock(&v->lock);
}

void vmm_virtio_backend_ready(struct vmm_virtio *v)
{
	struct vmm_guard g;
	pthread_mutex_lock(&v->lock);
	if (VMM_GUARD_ENTER(&g, v->mem) == 0) {
		if (v->ops->backend_ready && !v->faulted)
			v->ops->backend_ready(v);
	} else {
		memory_fault(v, &g);
	}
	vmm_guard_leave(&g);
	pthread_mutex_unlock(&v->lock);
}

void vmm_virtio_poll_backend(struct vmm_virtio *v, int on)
{
	if (v->poll_backend)
		v->poll_backend(v->poll_ctx, on);
}

void vmm_virtio_get_stats(struct vmm_virtio *v, struct vmm_virtio_stats *out)
{
	pthread_mutex_lock(&v->lock);
	*out = v->st;
	pthread_mutex_unlock(&v->lock);
}

static int ioeventfd(int vm_fd, int fd, uint64_t addr, uint32_t q, int deassign)
{
	struct kvm_ioeventfd req = {
		.datamatch = q, .addr = addr, .len = 4, .fd = fd,
		.flags = KVM_IOEVENTFD_FLAG_DATAMATCH | (deassign ? KVM_IOEVENTFD_FLAG_DEASSIGN : 0),
	};
	return ioctl(vm_fd, KVM_IOEVENTFD, &req) < 0 ? -errno : 0;
}

int vmm_virtio_attach_kvm(struct vmm_virtio *v, int vm_fd, uint64_t base, uint32_t gsi)
{
	v->base = base;
	int r = vmm_irq_init(&v->irq, vm_fd, gsi);
	for (uint32_t q = 0; !r && q < v->ops->num_queues; q++) {
		v->kick_fd[q] = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
		r = v->kick_fd[q] < 0 ? -errno
				      : ioeventfd(vm_fd, v->kick_fd[q], base + VIRTIO_MMIO_QUEUE_NOTIFY, q, 0);
		if (r && v->kick_fd[q] >= 0) {
			close(v->kick_fd[q]);
			v->kick_fd[q] = -1;
		}
	}
	if (r)
		vmm_virtio_detach_kvm(v, vm_fd);
	return r;
}

void vmm_virtio_detach_kvm(struct vmm_virtio *v, int vm_fd)
{
	for (uint32_t q = 0; q < VMM_VIRTIO_MAX_QUEUES; q++) {
		if (v->kick_fd[q] < 0)
			continue;
		ioeventfd(vm_fd, v->kick_fd[q], v->base + VIRTIO_MMIO_QUEUE_NOTIFY, q, 1);
		close(v->kick_fd[q]);
		v->kick_fd[q] = -1;
	}
	vmm_irq_close(&v->irq);
}

void vmm_virtio_free(struct vmm_virtio *v)
{
	if (v)
		v->ops->destroy(v);
}

/* ---- snapshots ---- */
void vmm_virtio_save(struct vmm_virtio *v, struct vmm_virtio_state *o)
{
	pthread_mutex_lock(&v->lock);
	memset(o, 0, sizeof(*o));
	*o = (struct vmm_virtio_state){
		.device_id = v->ops->device_id, .nqueues = v->ops->num_queues,
		.status = v->status, .dev_feat_sel = v->dev_feat_sel, .drv_feat_sel = v->drv_feat_sel,
		.queue_sel = v->queue_sel, .int_status = v->int_status, .config_gen = v->config_gen,
		.driver_features = v->driver_features,
	};
	for (uint32_t i = 0; i < v->ops->num_queues; i++) {
		const struct vmm_virtq *q = &v->q[i];
		o->q[i] = (struct vmm_virtq_state){
			.desc = q->desc_gpa, .avail = q->avail_gpa, .used = q->used_gpa,
			.size = q->size, .last_avail = q->last_avail, .used_idx = q->used_idx,
			.signalled_used = q->signalled_used, .ready = (uint8_t)q->ready,
			.event_idx = (uint8_t)q->event_idx, .indirect = (uint8_t)q->indirect,
		};
	}
	pthread_mutex_unlock(&v->lock);
}

static int restore_queue(struct vmm_virtq *q, const struct vmm_virtq_state *s,
			 const struct vmm_mem *mem, uint64_t features)
{
	/* untrusted: everything below comes from a file */
	if (s->size > QUEUE_MAX || (s->size & (s->size - 1)) || s->ready > 1 ||
	    s->event_idx != !!(features & VMM_VIRTIO_F_EVENT_IDX) ||
	    s->indirect != !!(features & VMM_VIRTIO_F_INDIRECT_DESC))
		return -EINVAL;
	vmm_virtq_reset(q);
	q->size = s->size;
	q->desc_gpa = s->desc;
	q->avail_gpa = s->avail;
	q->used_gpa = s->used;
	q->event_idx = s->event_idx;
	q->indirect = s->indirect;
	/* Indices are free-running u16 counters: any value is one the driver
	 * could have reached; a wrong one only makes the queue fail checks. */
	q->last_avail = s->last_avail;
	q->used_idx = s->used_idx;
	q->signalled_used = s->signalled_used;
	/* Rings misaligned or outside RAM: an impossible state (-EINVAL, as
	 * documented), not activate's -EFAULT. */
	return s->ready && vmm_virtq_activate(q, mem) < 0 ? -EINVAL : 0;
}

/* No guard here: restoring reads no ring, it only checks the rings' place
 * in RAM (the VM is not started; the first kick reads them, guarded). */
int vmm_virtio_restore(struct vmm_virtio *v, const struct vmm_virtio_state *s)
{
	enum { KNOWN_STATUS = 0x01 | 0x02 | ST_DRIVER_OK | ST_FEATURES_OK |
	       VMM_VIRTIO_STATUS_NEEDS_RESET | 0x80 };
	uint64_t f = s->driver_features;
	if (s->device_id != v->ops->device_id || s->nqueues != v->ops->num_queues ||
	    (s->status & ~(uint32_t)KNOWN_STATUS) || (f & ~offered(v)) ||
	    ((s->status & ST_FEATURES_OK) && !(f & VMM_VIRTIO_F_VERSION_1)) ||
	    (s->int_status & ~(uint32_t)(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG)))
		return -EINVAL;
	struct vmm_virtq q[VMM_VIRTIO_MAX_QUEUES];
	for (uint32_t i = 0; i < v->ops->num_queues; i++) {
		int r = restore_queue(&q[i], &s->q[i], v->mem, f);
		if (r)
			return r;
	}
	pthread_mutex_lock(&v->lock);
	memcpy(v->q, q, sizeof(struct vmm_virtq) * v->ops->num_queues);
	v->status = s->status;
	v->dev_feat_sel = s->dev_feat_sel;
	v->drv_feat_sel = s->drv_feat_sel;
	v->queue_sel = s->queue_sel;
	v->int_status = s->int_status;
	v->config_gen = s->config_gen;
	v->driver_features = f;
	if ((v->status & ST_DRIVER_OK) && v->ops->restored)
		v->ops->restored(v);
	pthread_mutex_unlock(&v->lock);
	return 0;
}
