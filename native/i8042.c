/*
 * i8042.c - PS/2 controller: reset line, keyboard output buffer, probe
 * answers.  Controller replies are polled by the guest; keyboard bytes
 * (scancodes, device ACKs) raise IRQ 1 when the CTR enables it, one pulse
 * per byte made visible.
 */
#include <errno.h>
#include <string.h>

#include "i8042.h"

enum {
	ST_OBF = 0x01, ST_SYS = 0x04, ST_CMD = 0x08, ST_UNLOCKED = 0x10,
	CTR_KBD_INT = 0x01, CTR_SYS = 0x04,
	CMD_READ_CTR = 0x20, CMD_WRITE_CTR = 0x60, CMD_AUX_TEST = 0xa9,
	CMD_SELF_TEST = 0xaa, CMD_KBD_TEST = 0xab, CMD_READ_OUTP = 0xd0,
	CMD_WRITE_OUTP = 0xd1, CMD_WRITE_AUX = 0xd4, CMD_RESET_CPU = 0xfe,
	KBD_ACK = 0xfa, KBD_RESET = 0xff, KBD_GET_ID = 0xf2, KBD_BAT_OK = 0xaa,
};

static unsigned queued(const struct vmm_i8042 *k)
{
	return k->tail - k->head;
}

/* Called with k->lock held.  kbd: the byte comes from the keyboard. */
static void push(struct vmm_i8042 *k, uint8_t b, int kbd)
{
	if (queued(k) == VMM_I8042_BUF)
		return;
	k->buf[k->tail++ % VMM_I8042_BUF] = b;
	if (kbd && queued(k) == 1 && (k->ctr & CTR_KBD_INT))
		vmm_irq_trigger(k->irq);
}

static void i8042_read(void *priv, uint64_t off, uint8_t *data, uint32_t len)
{
	struct vmm_i8042 *k = priv;
	uint8_t v = 0;
	pthread_mutex_lock(&k->lock);
	if (off == 0) {
		if (queued(k)) {
			v = k->buf[k->head++ % VMM_I8042_BUF];
			/* Next byte visible: tell the guest again. */
			if (queued(k) && (k->ctr & CTR_KBD_INT))
				vmm_irq_trigger(k->irq);
		}
	} else if (off == 4) {
		v = ST_SYS | ST_UNLOCKED | (k->status_cmd ? ST_CMD : 0) |
		    (queued(k) ? ST_OBF : 0);
	}
	pthread_mutex_unlock(&k->lock);
	memset(data, 0, len);
	data[0] = v;
}

static void command(struct vmm_i8042 *k, uint8_t cmd)
{
	switch (cmd) {
	case CMD_READ_CTR: push(k, k->ctr, 0); break;
	case CMD_READ_OUTP: push(k, k->outp, 0); break;
	case CMD_SELF_TEST: push(k, 0x55, 0); break;
	case CMD_KBD_TEST: push(k, 0x00, 0); break;
	case CMD_AUX_TEST: push(k, 0xff, 0); break;	/* no mouse */
	case CMD_WRITE_CTR:
	case CMD_WRITE_OUTP:
	case CMD_WRITE_AUX:
		k->cmd = cmd;	/* the data byte follows on port 0x60 */
		break;
	default: break;	/* enable/disable ports and the rest: nothing to model */
	}
}

static void kbd_write(struct vmm_i8042 *k, uint8_t b)
{
	push(k, KBD_ACK, 1);
	if (b == KBD_RESET) {
		push(k, KBD_BAT_OK, 1);
	} else if (b == KBD_GET_ID) {
		push(k, 0xab, 1);
		push(k, 0x83, 1);
	}
}

static void i8042_write(void *priv, uint64_t off, const uint8_t *data, uint32_t len)
{
	struct vmm_i8042 *k = priv;
	uint8_t v = data[0];	/* guest-controlled */
	int reset = 0;
	(void)len;
	pthread_mutex_lock(&k->lock);
	if (off == 4) {
		k->status_cmd = 1;
		if (v == CMD_RESET_CPU)
			reset = 1;
		else
			command(k, v);
	} else if (off == 0) {
		k->status_cmd = 0;
		uint8_t pending = k->cmd;
		k->cmd = 0;
		if (pending == CMD_WRITE_CTR)
			k->ctr = v;
		else if (pending == CMD_WRITE_OUTP && !(v & 1))
			reset = 1;	/* output port bit 0 low: the other reset path */
		else if (pending == CMD_WRITE_OUTP)
			k->outp = v;
		else if (pending == CMD_WRITE_AUX)
			;	/* no mouse: swallow */
		else
			kbd_write(k, v);
	}
	pthread_mutex_unlock(&k->lock);
	/* Outside the lock: stopping the VM kicks other vCPUs. */
	if (reset)
		k->on_reset(k->ctx);
}

const struct vmm_bus_ops vmm_i8042_ops = { i8042_read, i8042_write };

void vmm_i8042_init(struct vmm_i8042 *k, struct vmm_irq *irq,
		    void (*on_reset)(void *ctx), void *ctx)
{
	memset(k, 0, sizeof(*k));
	pthread_mutex_init(&k->lock, NULL);
	k->irq = irq;
	k->on_reset = on_reset;
	k->ctx = ctx;
	k->ctr = CTR_KBD_INT | CTR_SYS;
	k->outp = 0x01;	/* bit 0: reset line inactive */
}

void vmm_i8042_close(struct vmm_i8042 *k)
{
	pthread_mutex_destroy(&k->lock);
}

int vmm_i8042_ctrl_alt_del(struct vmm_i8042 *k)
{
	/* Set-2 make codes (the guest's atkbd translates; no XLATE in CTR). */
	static const uint8_t seq[] = { 0x14, 0x11, 0xe0, 0x71 };
	pthread_mutex_lock(&k->lock);
	if (VMM_I8042_BUF - queued(k) < sizeof(seq)) {
		pthread_mutex_unlock(&k->lock);
		return -EBUSY;
	}
	for (unsigned i = 0; i < sizeof(seq); i++)
		push(k, seq[i], 1);
	pthread_mutex_unlock(&k->lock);
	return 0;
}

void vmm_i8042_save(struct vmm_i8042 *k, struct vmm_legacy_state *o)
{
	pthread_mutex_lock(&k->lock);
	o->ctr = k->ctr, o->cmd = k->cmd, o->status_cmd = k->status_cmd, o->outp = k->outp;
	o->kbd_len = 0;
	for (unsigned i = k->head; i != k->tail; i++)
		o->kbd[o->kbd_len++] = k->buf[i % VMM_I8042_BUF];
	pthread_mutex_unlock(&k->lock);
}

int vmm_i8042_check_state(const struct vmm_legacy_state *in)
{
	/* untrusted: the length indexes our buffer */
	return in->kbd_len > VMM_I8042_BUF ? -EINVAL : 0;
}

int vmm_i8042_restore(struct vmm_i8042 *k, const struct vmm_legacy_state *in)
{
	int r = vmm_i8042_check_state(in);
	if (r)
		return r;
	pthread_mutex_lock(&k->lock);
	k->ctr = in->ctr, k->cmd = in->cmd, k->status_cmd = in->status_cmd, k->outp = in->outp;
	memcpy(k->buf, in->kbd, in->kbd_len);
	k->head = 0, k->tail = in->kbd_len;
	pthread_mutex_unlock(&k->lock);
	return 0;
}
