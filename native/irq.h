/*
 * irq.h - an interrupt line into the in-kernel irqchip through KVM_IRQFD.
 * Writing the eventfd makes KVM pulse the GSI (edge), so raising an
 * interrupt from any thread costs one write() and no vCPU exit.
 */
#ifndef VMM_IRQ_H
#define VMM_IRQ_H
#include "vmmcore.h"

struct vmm_irq {
	int vm_fd;
	int efd;
	uint32_t gsi;
};

int vmm_irq_init(struct vmm_irq *irq, int vm_fd, uint32_t gsi);
void vmm_irq_close(struct vmm_irq *irq);
void vmm_irq_trigger(struct vmm_irq *irq);

#endif
