/*
 * fuzz_virtq.c - the split-virtqueue walker alone (virtq.c), no device.
 *
 * Feeds: the queue (size, ring addresses, EVENT_IDX / INDIRECT, the three
 * u16 indexes, as a snapshot could set them), a list of ops (pop a chain
 * then read / write across it and push it, the guest publishing more
 * entries or changing a byte between pops, interrupt checks), and guest
 * RAM itself: descriptor table, avail ring, indirect tables and buffers.
 *
 * Checks: activation refuses rings not wholly in RAM; every chain popped
 * has segments of non-zero length wholly inside one RAM region, readable
 * before writable, lengths that add up; vmm_chain_read / write copy
 * exactly the bytes they report and the right ones (for writes: when the
 * writable segments do not overlap); a pop plus a chain write plus a push
 * changes no byte of RAM except in the chain's writable segments and the
 * used ring.  Guard pages catch any access outside RAM.
 *
 * Input: u16 size, u8 flags (1 EVENT_IDX, 2 INDIRECT), u32 desc, avail,
 * used, u16 last_avail, used_idx, signalled_used, u8 nops, nops x 4 bytes
 * of ops (kind, a, u16 b), then the RAM image (fuzz.h: ram_load).
 */
#include "fuzz.h"
#include "virtq.h"

#define RAM_BYTES (RAM_A_SIZE + RAM_B_SIZE + RAM_C_SIZE)
#define MAX_COPY 8192

enum { V_POP, V_PUBLISH, V_POKE, V_INTERRUPT, V_KINDS };

/* Index of a host byte of guest RAM in a flat A|B|C array, or -1. */
static long flat_index(const struct vmm_mem *mem, const uint8_t *p)
{
	long base = 0;
	for (int i = 0; i < mem->n; i++) {
		const struct vmm_mem_region *r = &mem->r[i];
		if (p >= r->hva && p < r->hva + r->size)
			return base + (p - r->hva);
		base += (long)r->size;
	}
	return -1;
}

static void snapshot(const struct vmm_mem *mem, uint8_t *out)
{
	for (int i = 0; i < mem->n; i++) {
		memcpy(out, mem->r[i].hva, mem->r[i].size);
		out += mem->r[i].size;
	}
}

static void allow(const struct vmm_mem *mem, uint8_t *allowed, const void *p, uint64_t len)
{
	long at = flat_index(mem, p);
	CHECK(at >= 0 && (uint64_t)at + len <= RAM_BYTES, "range not in RAM");
	memset(allowed + at, 1, len);
}

static void check_chain(const struct vmm_virtq *q, const struct vmm_mem *mem,
			const struct vmm_chain *c)
{
	uint64_t rl = 0, wl = 0;
	CHECK(c->head < q->size, "head %u", c->head);
	CHECK(c->nseg >= 0 && c->nseg <= VMM_CHAIN_MAX_SEGS, "nseg %d", c->nseg);
	CHECK(c->nwritable >= 0 && c->nwritable <= c->nseg, "nwritable %d", c->nwritable);
	for (int i = 0; i < c->nseg; i++) {
		CHECK(c->seg[i].iov_len > 0, "empty segment %d", i);
		CHECK(in_ram(mem, c->seg[i].iov_base, c->seg[i].iov_len),
		      "segment %d outside RAM", i);
		if (i < c->nseg - c->nwritable)
			rl += c->seg[i].iov_len;
		else
			wl += c->seg[i].iov_len;
	}
	CHECK(rl == c->readable_len && wl == c->writable_len, "lengths %llu/%llu",
	      (unsigned long long)c->readable_len, (unsigned long long)c->writable_len);
}

/* The bytes [off, off+len) of the chain's readable or writable side,
 * gathered the plain way, for comparison. */
static uint64_t gather(const struct vmm_chain *c, int writable, uint64_t off, uint8_t *out,
		       uint64_t len)
{
	uint64_t pos = 0, done = 0;
	int first = writable ? c->nseg - c->nwritable : 0;
	int last = writable ? c->nseg : c->nseg - c->nwritable;
	for (int i = first; i < last && done < len; i++) {
		uint64_t sl = c->seg[i].iov_len;
		if (pos + sl > off) {
			uint64_t from = off > pos ? off - pos : 0;
			uint64_t n = sl - from < len - done ? sl - from : len - done;
			memcpy(out + done, (const uint8_t *)c->seg[i].iov_base + from, n);
			done += n;
		}
		pos += sl;
	}
	return done;
}

static uint8_t before[RAM_BYTES], allowed[RAM_BYTES], after[RAM_BYTES], wmask[RAM_BYTES];
static uint8_t buf[MAX_COPY], ref[MAX_COPY];
static struct vmm_chain chain;

static void pop_op(struct vmm_virtq *q, const struct vmm_mem *mem, uint8_t a, uint16_t b)
{
	snapshot(mem, before);
	memset(allowed, 0, sizeof(allowed));
	allow(mem, allowed, q->used, 6 + 8 * (uint64_t)q->size);	/* avail_event, entries, idx */
	int r = vmm_virtq_pop(q, mem, &chain);
	CHECK(r == 0 || r == 1 || r == -EINVAL || r == -EFAULT || r == -ELOOP || r == -E2BIG,
	      "pop returned %d", r);
	if (r == 1) {
		check_chain(q, mem, &chain);
		/* Read: off and len from the op, both sometimes past the end. */
		uint64_t off = b % 4096, len = (uint64_t)a * 32;
		uint64_t got = vmm_chain_read(&chain, off, buf, len);
		uint64_t want = off < chain.readable_len ?
			(chain.readable_len - off < len ? chain.readable_len - off : len) : 0;
		CHECK(got == want, "read %llu, want %llu", (unsigned long long)got,
		      (unsigned long long)want);
		CHECK(gather(&chain, 0, off, ref, len) == got && !memcmp(buf, ref, got),
		      "read the wrong bytes");
		/* Write a pattern the same way; only writable segments may change.
		 * The guest may make them overlap: then a later one overwrites an
		 * earlier one and only the count is checked, not the bytes. */
		int overlap = 0;
		memset(wmask, 0, sizeof(wmask));
		for (int i = chain.nseg - chain.nwritable; i < chain.nseg; i++) {
			long at = flat_index(mem, chain.seg[i].iov_base);
			overlap |= memchr(wmask + at, 1, chain.seg[i].iov_len) != NULL;
			memset(wmask + at, 1, chain.seg[i].iov_len);
			allow(mem, allowed, chain.seg[i].iov_base, chain.seg[i].iov_len);
		}
		off = b >> 4;
		for (uint64_t i = 0; i < len; i++)
			buf[i] = (uint8_t)(0x5a ^ i);
		got = vmm_chain_write(&chain, off, buf, len);
		want = off < chain.writable_len ?
			(chain.writable_len - off < len ? chain.writable_len - off : len) : 0;
		CHECK(got == want, "wrote %llu, want %llu", (unsigned long long)got,
		      (unsigned long long)want);
		CHECK(gather(&chain, 1, off, ref, len) == got && (overlap || !memcmp(buf, ref, got)),
		      "wrote the wrong bytes");
		vmm_chain_mark_written(q, &chain);
		vmm_virtq_push(q, chain.head, (uint32_t)got);
	}
	snapshot(mem, after);
	for (size_t i = 0; i < RAM_BYTES; i += 256) {	/* the byte loop only where changed */
		if (!memcmp(before + i, after + i, 256))
			continue;
		for (size_t k = i; k < i + 256; k++)
			CHECK(before[k] == after[k] || allowed[k], "RAM byte %#zx changed", k);
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct input in = { data, size };
	struct vmm_virtq q;
	vmm_virtq_reset(&q);
	q.size = in_u16(&in);
	uint8_t flags = in_u8(&in);
	q.event_idx = flags & 1;
	q.indirect = !!(flags & 2);
	q.desc_gpa = in_u32(&in);
	q.avail_gpa = in_u32(&in);
	q.used_gpa = in_u32(&in);
	q.last_avail = in_u16(&in);
	q.used_idx = in_u16(&in);
	q.signalled_used = in_u16(&in);
	uint8_t nops = in_u8(&in) % MAX_OPS;
	struct input ops = in_sub(&in, 4ull * nops);
	struct vmm_mem *mem = ram_load(in);

	if (vmm_virtq_activate(&q, mem) < 0) {
		CHECK(!q.ready && !q.desc && !q.avail && !q.used, "refused but half set up");
		return 0;
	}
	CHECK(in_ram(mem, q.desc, 16ull * q.size) && in_ram(mem, q.avail, 6 + 2ull * q.size) &&
	      in_ram(mem, q.used, 6 + 8ull * q.size), "activated rings outside RAM");
	while (ops.n) {
		uint8_t kind = in_u8(&ops) % V_KINDS, a = in_u8(&ops);
		uint16_t b = in_u16(&ops);
		switch (kind) {
		case V_POP:
			pop_op(&q, mem, a, b);
			break;
		case V_PUBLISH: {	/* the guest adds entries to the avail ring */
			uint16_t idx;
			memcpy(&idx, q.avail + 2, 2);
			idx = (uint16_t)(idx + a % 17);
			memcpy(q.avail + 2, &idx, 2);
			break;
		}
		case V_POKE:		/* the guest changes a byte (descriptor, ring...) */
			vmm_mem_write(mem, b % (RAM_A_SIZE + RAM_B_SIZE), &a, 1);
			break;
		case V_INTERRUPT: {
			int r = vmm_virtq_need_interrupt(&q);
			CHECK(r == 0 || r == 1, "need_interrupt %d", r);
			CHECK(q.signalled_used == q.used_idx, "signalled_used not updated");
			break;
		}
		}
	}
	return 0;
}
