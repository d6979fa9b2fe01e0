/*
 * virtio_mmio.h - the virtio-mmio (version 2) transport: registers,
 * feature negotiation, queue set-up, status and reset, interrupt status.
 * A device plugs in as an ops table plus private data; the transport owns
 * the queues and calls ops->queue_notify to process one.
 *
 * QueueNotify normally never exits to us: KVM signals a per-queue ioeventfd
 * that the VM's I/O thread serves (vmm_virtio_kick).  The interrupt goes
 * out through an irqfd.  Without KVM (native tests) both are plain calls.
 *
 * Every entry that may touch guest RAM (kick, backend ready, register
 * writes: DRIVER_OK starts net RX, a notify without ioeventfd serves the
 * queue) runs the device under a guard (guard.h), with the lock held.  If
 * guest RAM vanished under it (its file shrank), the device is faulted for
 * good: NEEDS_RESET, no queue served again, even after a reset; and the VM
 * is told to stop (vmm_mem's on_fault).
 */
#ifndef VMM_VIRTIO_MMIO_H
#define VMM_VIRTIO_MMIO_H
#include <pthread.h>
#include "bus.h"
#include "irq.h"
#include "virtq.h"

#define VMM_VIRTIO_MAX_QUEUES 3	/* vsock: RX, TX, event */
#define VMM_VIRTIO_MMIO_SIZE 0x1000
#define VMM_VIRTIO_F_VERSION_1 (1ull << 32)
#define VMM_VIRTIO_F_EVENT_IDX (1ull << 29)
#define VMM_VIRTIO_F_INDIRECT_DESC (1ull << 28)
#define VMM_VIRTIO_STATUS_NEEDS_RESET 0x40

struct vmm_virtio;

struct vmm_virtio_ops {
	uint32_t device_id;
	uint32_t num_queues;
	uint64_t features;	/* device-specific bits; the transport adds its own */
	void (*config_read)(void *priv, uint64_t off, uint8_t *data, uint32_t len);
	/* Process queue q: pop, serve, push.  Called with the transport lock held,
	 * after DRIVER_OK and never once the device needs a reset (the
	 * transport counts the notify: st.notifies). */
	void (*queue_notify)(struct vmm_virtio *v, uint32_t q);
	void (*reset)(void *priv);
	/* The driver set DRIVER_OK: negotiated features are final (net mirrors
	 * its offloads to the tap here).  Lock held; may be NULL. */
	void (*driver_ok)(struct vmm_virtio *v);
	void (*destroy)(struct vmm_virtio *v);	/* frees the device and its transport */
	/* backend_fd is readable (the I/O thread polls it).  Lock held. */
	void (*backend_ready)(struct vmm_virtio *v);
	/* The transport state came back from a snapshot with DRIVER_OK set:
	 * redo what driver_ok set up on the host side, touching no guest
	 * memory (the VM is paused).  Lock held; may be NULL. */
	void (*restored)(struct vmm_virtio *v);
};

struct vmm_virtio {
	pthread_mutex_t lock;
	const struct vmm_virtio_ops *ops;
	void *priv;
	const struct vmm_mem *mem;
	struct vmm_irq irq;		/* efd < 0: no KVM (tests) */
	int kick_fd[VMM_VIRTIO_MAX_QUEUES];	/* ioeventfds, -1 without KVM */
	uint64_t base;			/* guest physical MMIO base */
	uint32_t status, dev_feat_sel, drv_feat_sel, queue_sel, int_status, config_gen;
	uint64_t driver_features;
	int faulted;			/* guest RAM vanished under the device */
	struct vmm_virtq q[VMM_VIRTIO_MAX_QUEUES];
	struct vmm_virtio_stats st;
	/* A host fd with input for the device (a tap), -1 if none.  The I/O
	 * thread polls it and installs poll_backend so the device can stop
	 * and restart that polling (no guest buffers: leave input queued). */
	int backend_fd;
	void (*poll_backend)(void *ctx, int on);
	void *poll_ctx;
};

extern const struct vmm_bus_ops vmm_virtio_mmio_ops;
void vmm_virtio_init(struct vmm_virtio *v, const struct vmm_virtio_ops *ops, void *priv,
		     const struct vmm_mem *mem);
/* Wire ioeventfds (QueueNotify) and the irqfd into KVM. */
int vmm_virtio_attach_kvm(struct vmm_virtio *v, int vm_fd, uint64_t base, uint32_t gsi);
void vmm_virtio_detach_kvm(struct vmm_virtio *v, int vm_fd);
/* Serve queue q now (the I/O thread, on its ioeventfd). */
void vmm_virtio_kick(struct vmm_virtio *v, uint32_t q);
/* The I/O thread: backend_fd is readable. */
void vmm_virtio_backend_ready(struct vmm_virtio *v);
/* Snapshots: the transport and queue state; restore validates it all
 * (-EINVAL) against what the device offers and guest RAM, and changes
 * nothing unless everything holds. */
void vmm_virtio_save(struct vmm_virtio *v, struct vmm_virtio_state *out);
int vmm_virtio_restore(struct vmm_virtio *v, const struct vmm_virtio_state *in);
/* For device code (lock held): start or stop polling backend_fd. */
void vmm_virtio_poll_backend(struct vmm_virtio *v, int on);
/* For device code (lock held): a chain was bad - count it, stop the device. */
void vmm_virtio_fail(struct vmm_virtio *v);
/* For device code (lock held): interrupt the driver if the queue wants it. */
void vmm_virtio_signal_used(struct vmm_virtio *v, uint32_t q);

#endif
