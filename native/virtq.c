/*
 * virtq.c - split virtqueue: pop descriptor chains, push used entries,
 * notification suppression (VIRTIO_F_EVENT_IDX), indirect tables.
 */
#include <errno.h>
#include <string.h>

#include "virtq.h"

enum {
	VRING_DESC_F_NEXT = 1, VRING_DESC_F_WRITE = 2, VRING_DESC_F_INDIRECT = 4,
	VRING_AVAIL_F_NO_INTERRUPT = 1,
};

struct vring_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
} __attribute__((packed));

/* Both ranges are inside guest RAM (translated): no sum overflows. */
static int overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
	return a < b + blen && b < a + alen;
}

int vmm_virtq_activate(struct vmm_virtq *q, const struct vmm_mem *mem)
{
	uint64_t n = q->size;
	if (n == 0 || n > VMM_VIRTQ_MAX_SIZE || (n & (n - 1)))
		return -EINVAL;
	if ((q->desc_gpa & 15) || (q->avail_gpa & 1) || (q->used_gpa & 3))
		return -EINVAL;
	q->desc = vmm_mem_translate(mem, q->desc_gpa, 16 * n);
	q->avail = vmm_mem_translate(mem, q->avail_gpa, 6 + 2 * n);
	q->used = vmm_mem_translate(mem, q->used_gpa, 6 + 8 * n);
	if (!q->desc || !q->avail || !q->used) {
		q->desc = q->avail = q->used = NULL;
		return -EFAULT;
	}
	/* The device writes the used ring: never over what it reads to find
	 * work.  Over the avail ring its used idx can stand for the avail idx
	 * (a snapshot with last_avail != used_idx then serves chains forever,
	 * the guest doing nothing); over the table its entries rewrite chains. */
	if (overlaps(q->used_gpa, 6 + 8 * n, q->avail_gpa, 6 + 2 * n) ||
	    overlaps(q->used_gpa, 6 + 8 * n, q->desc_gpa, 16 * n)) {
		q->desc = q->avail = q->used = NULL;
		return -EINVAL;
	}
	q->ready = 1;
	q->mem = mem;
	return 0;
}

/* The device writes the used ring (entries, idx, avail_event). */
static void mark_used_ring(const struct vmm_virtq *q)
{
	vmm_mem_mark_dirty(q->mem, q->used, 6 + 8 * (uint64_t)q->size);
}

void vmm_chain_mark_written(const struct vmm_virtq *q, const struct vmm_chain *c)
{
	for (int i = c->nseg - c->nwritable; i < c->nseg; i++)
		vmm_mem_mark_dirty(q->mem, c->seg[i].iov_base, c->seg[i].iov_len);
}

void vmm_virtq_reset(struct vmm_virtq *q)
{
	memset(q, 0, sizeof(*q));
}

static uint16_t load16(const uint8_t *p)
{
	return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
}

static void store16(uint8_t *p, uint16_t v)
{
	__atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
}

/* Append guest buffer [addr, addr+len) to the chain, split at region
 * boundaries.  addr and len are guest-controlled. */
static int add_segment(struct vmm_chain *c, const struct vmm_mem *mem, uint64_t addr,
		       uint32_t len, int writable)
{
	if (!writable && c->nwritable)
		return -EINVAL;	/* readable after writable breaks the virtio rules */
	if (addr + len < addr)
		return -EFAULT;
	while (len) {
		const struct vmm_mem_region *r = vmm_mem_region_of(mem, addr);
		if (!r)
			return -EFAULT;
		uint64_t room = r->size - (addr - r->gpa);
		uint32_t n = room < len ? (uint32_t)room : len;
		if (c->nseg == VMM_CHAIN_MAX_SEGS)
			return -E2BIG;
		c->seg[c->nseg].iov_base = r->hva + (addr - r->gpa);
		c->seg[c->nseg].iov_len = n;
		c->nseg++;
		if (writable) {
			c->nwritable++;
			c->writable_len += n;
		} else {
			c->readable_len += n;
		}
		addr += n;
		len -= n;
	}
	return 0;
}

/* Walk one descriptor table (the ring's or an indirect one). */
static int walk(struct vmm_virtq *q, const struct vmm_mem *mem, struct vmm_chain *c,
		const struct vring_desc *table, uint32_t n, uint16_t first, int indirect)
{
	uint16_t i = first;
	/* next is 16-bit: at most 65536 entries of a table are reachable. */
	uint32_t reachable = n < 65536 ? n : 65536;
	for (uint32_t seen = 0;; seen++) {
		if (i >= n)
			return -EINVAL;		/* guest-controlled index */
		if (seen >= reachable)
			return -ELOOP;		/* more links than entries: a cycle */
		struct vring_desc d;
		memcpy(&d, &table[i], sizeof(d));	/* one snapshot: the guest may race us */
		if (d.flags & VRING_DESC_F_INDIRECT) {
			if (indirect || !q->indirect || (d.flags & VRING_DESC_F_NEXT) ||
			    d.len == 0 || d.len % sizeof(struct vring_desc))
				return -EINVAL;
			const struct vring_desc *t = vmm_mem_translate(mem, d.addr, d.len);
			if (!t)
				return -EFAULT;
			return walk(q, mem, c, t, d.len / sizeof(struct vring_desc), 0, 1);
		}
		int r = add_segment(c, mem, d.addr, d.len, d.flags & VRING_DESC_F_WRITE);
		if (r)
			return r;
		if (!(d.flags & VRING_DESC_F_NEXT))
			return 0;
		i = d.next;
	}
}

int vmm_virtq_pop(struct vmm_virtq *q, const struct vmm_mem *mem, struct vmm_chain *c)
{
	if (!q->ready)
		return 0;
	uint16_t avail_idx = load16(q->avail + 2);
	if (avail_idx == q->last_avail)
		return 0;
	/* A driver cannot have more than size buffers outstanding. */
	if ((uint16_t)(avail_idx - q->last_avail) > q->size)
		return -EINVAL;
	uint16_t head;
	memcpy(&head, q->avail + 4 + 2 * (q->last_avail % q->size), 2);
	q->last_avail++;
	if (q->event_idx) {	/* avail_event: wake us for the next one */
		store16(q->used + 4 + 8 * q->size, q->last_avail);
		mark_used_ring(q);
		/* Full barrier before the next avail idx load: else that load
		 * may pass the store (x86 too), the driver reads the old
		 * avail_event and skips its notify, and we miss its entry. */
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
	}
	memset(c, 0, offsetof(struct vmm_chain, seg));
	c->head = head;
	int r = walk(q, mem, c, (const struct vring_desc *)q->desc, q->size, head, 0);
	return r ? r : 1;
}

void vmm_virtq_push(struct vmm_virtq *q, uint16_t head, uint32_t written)
{
	uint8_t *e = q->used + 4 + 8 * (q->used_idx % q->size);
	uint32_t id = head;
	memcpy(e, &id, 4);
	memcpy(e + 4, &written, 4);
	q->used_idx++;
	store16(q->used + 2, q->used_idx);	/* release: the entry is visible first */
	mark_used_ring(q);
}

int vmm_virtq_need_interrupt(struct vmm_virtq *q)
{
	/* A queue that is not ready has no rings to read: restored from a
	 * snapshot it may have none mapped (NULL), turned off by the driver
	 * they may no longer match its size. */
	if (!q->ready)
		return 0;
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	uint16_t old = q->signalled_used, now = q->used_idx;
	if (old == now)
		return 0;
	q->signalled_used = now;
	if (!q->event_idx)
		return !(load16(q->avail) & VRING_AVAIL_F_NO_INTERRUPT);
	/* used_event sits after the avail ring. */
	uint16_t used_event = load16(q->avail + 4 + 2 * q->size);
	return (uint16_t)(now - used_event - 1) < (uint16_t)(now - old);
}

static uint64_t chain_copy(const struct vmm_chain *c, int writable, uint64_t off, void *buf,
			   uint64_t len, int to_chain)
{
	uint64_t done = 0;
	int first = writable ? c->nseg - c->nwritable : 0;
	int last = writable ? c->nseg : c->nseg - c->nwritable;
	for (int i = first; i < last && done < len; i++) {
		uint64_t sl = c->seg[i].iov_len;
		if (off >= sl) {
			off -= sl;
			continue;
		}
		uint64_t n = sl - off < len - done ? sl - off : len - done;
		uint8_t *p = (uint8_t *)c->seg[i].iov_base + off;
		if (to_chain)
			memcpy(p, (const uint8_t *)buf + done, n);
		else
			memcpy((uint8_t *)buf + done, p, n);
		done += n;
		off = 0;
	}
	return done;
}

uint64_t vmm_chain_read(const struct vmm_chain *c, uint64_t off, void *buf, uint64_t len)
{
	return chain_copy(c, 0, off, buf, len, 0);
}

uint64_t vmm_chain_write(const struct vmm_chain *c, uint64_t off, const void *buf, uint64_t len)
{
	return chain_copy(c, 1, off, (void *)buf, len, 1);
}
