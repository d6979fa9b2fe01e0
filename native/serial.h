/*
 * serial.h - 16550A-compatible UART (the guest console, COM1 at 0x3f8,
 * IRQ 4).  Transmit is instantaneous into the console; received bytes
 * wait in a small FIFO until the guest reads them.
 */
#ifndef VMM_SERIAL_H
#define VMM_SERIAL_H
#include <pthread.h>
#include "bus.h"
#include "console.h"
#include "irq.h"

#define VMM_SERIAL_PORT 0x3f8
#define VMM_SERIAL_IRQ 4
#define VMM_SERIAL_RX_FIFO 64

struct vmm_serial {
	pthread_mutex_t lock;
	struct vmm_console *console;
	struct vmm_irq *irq;
	uint8_t ier, lcr, mcr, scr, dll, dlm;
	int thr_ipending;	/* THR-empty interrupt pending */
	int irq_level;		/* our virtual line, to pulse on rising edges */
	uint8_t rx[VMM_SERIAL_RX_FIFO];
	unsigned rx_head, rx_tail;
	uint64_t rx_dropped;
};

extern const struct vmm_bus_ops vmm_serial_ops;
void vmm_serial_init(struct vmm_serial *s, struct vmm_console *con, struct vmm_irq *irq);
void vmm_serial_close(struct vmm_serial *s);
/* Host -> guest bytes; returns how many fit in the FIFO. */
int vmm_serial_input(struct vmm_serial *s, const uint8_t *buf, uint64_t len);
/* Snapshots: the UART's fields of struct vmm_legacy_state.  The state comes
 * from a file: check_state refuses (-EINVAL) one the UART cannot be in (an
 * RX FIFO longer than its own, a flag other than 0 or 1); restore checks the
 * same and changes nothing when it refuses. */
void vmm_serial_save(struct vmm_serial *s, struct vmm_legacy_state *out);
int vmm_serial_check_state(const struct vmm_legacy_state *in);
int vmm_serial_restore(struct vmm_serial *s, const struct vmm_legacy_state *in);

#endif
