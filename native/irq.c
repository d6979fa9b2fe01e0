/*
 * irq.c - irqfd-backed interrupt lines.
 */
#include <errno.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/kvm.h>

#include "irq.h"

int vmm_irq_init(struct vmm_irq *irq, int vm_fd, uint32_t gsi)
{
	irq->vm_fd = vm_fd;
	irq->gsi = gsi;
	irq->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (irq->efd < 0)
		return -errno;
	struct kvm_irqfd req = { .fd = (uint32_t)irq->efd, .gsi = gsi };
	if (ioctl(vm_fd, KVM_IRQFD, &req) < 0) {
		int err = -errno;
		close(irq->efd);
		irq->efd = -1;
		return err;
	}
	return 0;
}

void vmm_irq_close(struct vmm_irq *irq)
{
	if (irq->efd < 0)
		return;
	struct kvm_irqfd req = { .fd = (uint32_t)irq->efd, .gsi = irq->gsi,
				 .flags = KVM_IRQFD_FLAG_DEASSIGN };
	ioctl(irq->vm_fd, KVM_IRQFD, &req);
	close(irq->efd);
	irq->efd = -1;
}

void vmm_irq_trigger(struct vmm_irq *irq)
{
	uint64_t one = 1;
	if (irq->efd >= 0 && write(irq->efd, &one, sizeof(one)) < 0) {
		/* EAGAIN means an injection is already pending: same effect */
	}
}
