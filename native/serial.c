/*
 * serial.c - 8250/16550A UART register model.
 *
 * Interrupt identification follows the 16550: received data outranks
 * THR-empty; the THR-empty interrupt is cleared by reading IIR or writing
 * THR and is raised again when the (instant) transmission completes or the
 * guest enables it.  The line is edge-triggered through irqfd, so we pulse
 * only when the virtual line rises; Linux's handler loops until IIR says
 * "no interrupt", which lowers it again.
 */
#include <errno.h>
#include <string.h>

#include "serial.h"

enum {
	R_DATA = 0, R_IER = 1, R_IIR = 2, R_LCR = 3, R_MCR = 4, R_LSR = 5,
	R_MSR = 6, R_SCR = 7,
	IER_RDI = 0x01, IER_THRI = 0x02, IER_MASK = 0x0f,
	IIR_NONE = 0x01, IIR_THRI = 0x02, IIR_RDI = 0x04, IIR_FIFO = 0xc0,
	LCR_DLAB = 0x80,
	MCR_LOOP = 0x10,
	LSR_DR = 0x01, LSR_THRE = 0x20, LSR_TEMT = 0x40,
	MSR_CTS = 0x10, MSR_DSR = 0x20, MSR_DCD = 0x80,
};

static unsigned rx_count(const struct vmm_serial *s)
{
	return s->rx_tail - s->rx_head;
}

static uint8_t iir(const struct vmm_serial *s)
{
	if ((s->ier & IER_RDI) && rx_count(s))
		return IIR_RDI;
	if ((s->ier & IER_THRI) && s->thr_ipending)
		return IIR_THRI;
	return IIR_NONE;
}

/* Called with s->lock held after any state change. */
static void update_irq(struct vmm_serial *s)
{
	int level = iir(s) != IIR_NONE;
	if (level && !s->irq_level)
		vmm_irq_trigger(s->irq);
	s->irq_level = level;
}

static void rx_push(struct vmm_serial *s, uint8_t b)
{
	if (rx_count(s) == VMM_SERIAL_RX_FIFO) {
		s->rx_dropped++;
		return;
	}
	s->rx[s->rx_tail++ % VMM_SERIAL_RX_FIFO] = b;
}

static uint8_t msr(const struct vmm_serial *s)
{
	if (!(s->mcr & MCR_LOOP))
		return MSR_DCD | MSR_DSR | MSR_CTS;
	/* Loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD. */
	return (uint8_t)(((s->mcr & 0x02) << 3) | ((s->mcr & 0x01) << 5) |
			 ((s->mcr & 0x04) << 4) | ((s->mcr & 0x08) << 4));
}

static void serial_read(void *priv, uint64_t off, uint8_t *data, uint32_t len)
{
	struct vmm_serial *s = priv;
	uint8_t v = 0;
	pthread_mutex_lock(&s->lock);
	switch (off) {
	case R_DATA:
		if (s->lcr & LCR_DLAB) {
			v = s->dll;
		} else if (rx_count(s)) {
			v = s->rx[s->rx_head++ % VMM_SERIAL_RX_FIFO];
		}
		break;
	case R_IER:
		v = (s->lcr & LCR_DLAB) ? s->dlm : s->ier;
		break;
	case R_IIR:
		v = iir(s);
		if (v == IIR_THRI)
			s->thr_ipending = 0;
		v |= IIR_FIFO;
		break;
	case R_LCR: v = s->lcr; break;
	case R_MCR: v = s->mcr; break;
	case R_LSR: v = LSR_THRE | LSR_TEMT | (rx_count(s) ? LSR_DR : 0); break;
	case R_MSR: v = msr(s); break;
	case R_SCR: v = s->scr; break;
	}
	update_irq(s);
	pthread_mutex_unlock(&s->lock);
	memset(data, 0, len);
	data[0] = v;
}

static void serial_write(void *priv, uint64_t off, const uint8_t *data, uint32_t len)
{
	struct vmm_serial *s = priv;
	uint8_t v = data[0];	/* guest-controlled; only the low byte matters */
	(void)len;
	pthread_mutex_lock(&s->lock);
	switch (off) {
	case R_DATA:
		if (s->lcr & LCR_DLAB) {
			s->dll = v;
			break;
		}
		if (s->mcr & MCR_LOOP)
			rx_push(s, v);
		else
			vmm_console_put(s->console, v);
		s->thr_ipending = 1;	/* sent at once: THR is empty again */
		break;
	case R_IER:
		if (s->lcr & LCR_DLAB) {
			s->dlm = v;
			break;
		}
		if ((v & IER_THRI) && !(s->ier & IER_THRI))
			s->thr_ipending = 1;	/* as a 16550 does: THR is empty */
		s->ier = v & IER_MASK;
		break;
	case R_IIR: break;	/* FCR: FIFOs are always on; nothing to model */
	case R_LCR: s->lcr = v; break;
	case R_MCR: s->mcr = v & 0x1f; break;
	case R_SCR: s->scr = v; break;
	default: break;	/* LSR/MSR are read-only */
	}
	update_irq(s);
	pthread_mutex_unlock(&s->lock);
}

const struct vmm_bus_ops vmm_serial_ops = { serial_read, serial_write };

void vmm_serial_init(struct vmm_serial *s, struct vmm_console *con, struct vmm_irq *irq)
{
	memset(s, 0, sizeof(*s));
	pthread_mutex_init(&s->lock, NULL);
	s->console = con;
	s->irq = irq;
	s->dll = 0x0c;	/* 9600 baud, as after a BIOS */
	s->mcr = 0x08;	/* OUT2 */
}

void vmm_serial_close(struct vmm_serial *s)
{
	pthread_mutex_destroy(&s->lock);
}

int vmm_serial_input(struct vmm_serial *s, const uint8_t *buf, uint64_t len)
{
	uint64_t n = 0;
	pthread_mutex_lock(&s->lock);
	while (n < len && rx_count(s) < VMM_SERIAL_RX_FIFO)
		rx_push(s, buf[n++]);
	update_irq(s);
	pthread_mutex_unlock(&s->lock);
	return (int)n;
}

void vmm_serial_save(struct vmm_serial *s, struct vmm_legacy_state *o)
{
	pthread_mutex_lock(&s->lock);
	o->ier = s->ier, o->lcr = s->lcr, o->mcr = s->mcr, o->scr = s->scr;
	o->dll = s->dll, o->dlm = s->dlm;
	o->thr_ipending = (uint8_t)s->thr_ipending, o->irq_level = (uint8_t)s->irq_level;
	o->rx_len = 0;
	for (unsigned i = s->rx_head; i != s->rx_tail; i++)
		o->rx[o->rx_len++] = s->rx[i % VMM_SERIAL_RX_FIFO];
	pthread_mutex_unlock(&s->lock);
}

int vmm_serial_check_state(const struct vmm_legacy_state *in)
{
	/* untrusted: the length indexes our FIFO, the flags are our booleans */
	if (in->rx_len > VMM_SERIAL_RX_FIFO || in->thr_ipending > 1 || in->irq_level > 1)
		return -EINVAL;
	return 0;
}

int vmm_serial_restore(struct vmm_serial *s, const struct vmm_legacy_state *in)
{
	int r = vmm_serial_check_state(in);
	if (r)
		return r;
	pthread_mutex_lock(&s->lock);
	s->ier = in->ier, s->lcr = in->lcr, s->mcr = in->mcr, s->scr = in->scr;
	s->dll = in->dll, s->dlm = in->dlm;
	s->thr_ipending = in->thr_ipending, s->irq_level = in->irq_level;
	memcpy(s->rx, in->rx, in->rx_len);
	s->rx_head = 0, s->rx_tail = in->rx_len;
	pthread_mutex_unlock(&s->lock);
	return 0;
}
