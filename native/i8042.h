/*
 * i8042.h - the PS/2 controller, as much as a microVM needs (Firecracker's
 * model): the CPU reset line (command 0xFE on port 0x64) that stops the
 * VM, a keyboard port through which Ctrl-Alt-Del can be injected (IRQ 1),
 * and enough of the controller protocol for Linux's driver to probe it.
 */
#ifndef VMM_I8042_H
#define VMM_I8042_H
#include <pthread.h>
#include "bus.h"
#include "irq.h"

#define VMM_I8042_DATA 0x60
#define VMM_I8042_CMD 0x64	/* the bus range is 0x60..0x64 */
#define VMM_I8042_IRQ 1
#define VMM_I8042_BUF 16

struct vmm_i8042 {
	pthread_mutex_t lock;
	struct vmm_irq *irq;
	void (*on_reset)(void *ctx);	/* the guest pulled the reset line */
	void *ctx;
	uint8_t ctr;		/* controller configuration byte */
	uint8_t cmd;		/* command awaiting its data byte, or 0 */
	uint8_t status_cmd;	/* last write went to the command port */
	uint8_t outp;
	uint8_t buf[VMM_I8042_BUF];
	unsigned head, tail;
};

extern const struct vmm_bus_ops vmm_i8042_ops;
void vmm_i8042_init(struct vmm_i8042 *k, struct vmm_irq *irq,
		    void (*on_reset)(void *ctx), void *ctx);
void vmm_i8042_close(struct vmm_i8042 *k);
int vmm_i8042_ctrl_alt_del(struct vmm_i8042 *k);
/* Snapshots: the controller's fields of struct vmm_legacy_state.  The state
 * comes from a file: check_state refuses (-EINVAL) an output buffer longer
 * than ours; restore checks the same and changes nothing when it refuses. */
void vmm_i8042_save(struct vmm_i8042 *k, struct vmm_legacy_state *out);
int vmm_i8042_check_state(const struct vmm_legacy_state *in);
int vmm_i8042_restore(struct vmm_i8042 *k, const struct vmm_legacy_state *in);

#endif
