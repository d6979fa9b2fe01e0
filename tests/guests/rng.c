/*
 * rng.c - a minimal virtio entropy (virtio-rng) driver for the micro-guest,
 * over the shared virtio-mmio transport in virtio.c, and the mg=rng mode.
 *
 * The device is the first virtio_mmio.device= word whose DeviceID is 4 (it
 * comes after any drives and interfaces).  Polling only, like blk.c and
 * net.c.  Each round posts one device-writable buffer of size= bytes
 * (pre-zeroed) as a one-descriptor chain, waits for it, and prints what
 * came back: the used length, the FNV-1a of the bytes written and whether
 * they were all zero.  README.md ("mg=rng") has the words and the output.
 */
#include "virtio.h"

#define VIRTIO_ID_RNG		4
#define QDEFAULT		16
#define SUMS_MAX		64	/* rounds whose sums are compared at the end */

/* Not zeroed at boot: vio_queue_setup writes what the device reads. */
static struct vring rng_ring __attribute__((section(".bss.noinit"), aligned(4096)));

static u64 rng_want(void)
{
	return mg_arg_u64("evidx", 0) ? F_EVENT_IDX : 0;
}

static void rng_find(struct vdev *v)
{
	u32 words = vio_count();
	for (u32 w = 0; w < words; w++) {
		vio_find(v, "rng", 0, w);
		if (vio_probe_id(v) == VIRTIO_ID_RNG)
			return;
	}
	mg_error("rng: no virtio entropy device (%u virtio_mmio.device= words)", words);
}

static int all_zero(const u8 *p, u32 n)
{
	for (u32 i = 0; i < n; i++)
		if (p[i])
			return 0;
	return 1;
}

void mode_rng(void)
{
	struct vdev v;
	struct vq q;
	u64 rounds = mg_arg_u64("n", 3), size = mg_arg_u64("size", 4096);
	u64 ms = mg_arg_u64("ms", 0), timeout_ms = mg_arg_u64("timeout_ms", 2000);
	u32 sums[SUMS_MAX];
	int bad = 0;

	if (size == 0 || size > VIRTIO_BUF_SIZE)
		mg_error("rng size=%llu: 1..%u bytes", size, VIRTIO_BUF_SIZE);
	rng_find(&v);
	vio_begin(&v, VIRTIO_ID_RNG, "entropy", rng_want);
	vio_queue_size(&q, &v, 0, QDEFAULT, 0);
	vio_queue_setup(&q, &rng_ring, 0);
	vio_driver_ok(&v);
	mg_printf("MG-RNG-READY features=0x%llx qmax=%u\n", v.accepted, q.qmax);

	for (u64 r = 0; rounds == 0 || r < rounds; r++) {
		if (r && ms)
			mg_delay_us_at_least(ms * 1000);
		memset(virtio_buf, 0, size);
		put_desc(&rng_ring.desc[0], (u64)(usize)virtio_buf, (u32)size, D_WRITE, 0);
		vq_post_head(&q, 0);
		vq_kick(&q, 0);
		if (!vq_wait_used(&q, timeout_ms, 4096))
			mg_error("rng %s round=%llu used=%u avail=%u status=0x%x",
				 vio_status(&v) & ST_NEEDS_RESET ? "needs-reset" : "timeout", r,
				 rng_ring.used.idx, q.avail_idx, vio_status(&v));
		volatile struct vused_elem *e = &rng_ring.used.ring[q.last_used % q.qsize];
		u32 id = e->id, len = e->len;
		q.last_used++;
		vq_set_used_event(&q);
		vio_ack(&v);
		if (id != 0 || len > size)
			mg_error("rng round=%llu: used id %u len %u for head 0 of %llu bytes", r, id,
				 len, size);
		u32 sum = fnv1a_update(FNV1A_INIT, virtio_buf, len);
		int zero = all_zero(virtio_buf, len);
		mg_printf("MG-RNG %llu len=%u sum=", r, len);
		put_hex(sum, 8);
		mg_printf(" zero=%u\n", zero);
		MB->progress = r + 1;
		bad |= zero || len == 0;
		if (r < SUMS_MAX) {
			for (u64 k = 0; k < r; k++)
				bad |= sums[k] == sum;
			sums[r] = sum;
		}
	}
	mg_printf("MG-RNG-CHECK %s\n", bad ? "bad" : "ok");
	mg_puts("MG-DONE\n");
}
