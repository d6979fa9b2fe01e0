/*
 * kvmstats.c - see kvmstats.h.  The statistics file is self-describing: a
 * header, then one descriptor per counter (name, type, offset in the data
 * block), then the data.  The counters are found by name once, at vCPU
 * creation; after that a read is one pread per counter.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/kvm.h>

#include "kvmstats.h"

static const char *const counters[] = { "halt_exits", "irq_injections", "nmi_injections" };

/* Descriptors past this are not ours to parse (KVM has ~50 per vCPU). */
#define MAX_DESCS 4096
#define MAX_NAME 1024

static int find_counters(struct vmm_kvmstats *s)
{
	struct kvm_stats_header h;
	if (pread(s->fd, &h, sizeof(h), 0) != (ssize_t)sizeof(h))
		return -EIO;
	if (!h.num_desc || h.num_desc > MAX_DESCS || !h.name_size || h.name_size > MAX_NAME)
		return -EINVAL;
	size_t one = sizeof(struct kvm_stats_desc) + h.name_size;
	char *buf = malloc(one * h.num_desc);
	if (!buf)
		return -ENOMEM;
	int r = 0;
	if (pread(s->fd, buf, one * h.num_desc, h.desc_offset) != (ssize_t)(one * h.num_desc))
		r = -EIO;
	for (uint32_t c = 0; !r && c < sizeof(counters) / sizeof(counters[0]); c++) {
		int found = 0;
		for (uint32_t i = 0; i < h.num_desc && !found; i++) {
			const struct kvm_stats_desc *d = (const void *)(buf + one * i);
			/* A cumulative 64-bit counter of that name, nothing else. */
			if (strncmp(d->name, counters[c], h.name_size) ||
			    (d->flags & KVM_STATS_TYPE_MASK) != KVM_STATS_TYPE_CUMULATIVE ||
			    d->size != 1)
				continue;
			s->ofs[s->nofs++] = (uint64_t)h.data_offset + d->offset;
			found = 1;
		}
		if (!found)
			r = -ENOENT;
	}
	free(buf);
	return r;
}

void vmm_kvmstats_open(struct vmm_kvmstats *s, int vcpu_fd)
{
	memset(s, 0, sizeof(*s));
	s->fd = ioctl(vcpu_fd, KVM_GET_STATS_FD, 0);
	if (s->fd >= 0 && find_counters(s) < 0)
		vmm_kvmstats_close(s);
	if (s->fd < 0)
		s->fd = -1;
}

uint64_t vmm_kvmstats_activity(const struct vmm_kvmstats *s)
{
	if (s->fd < 0)
		return VMM_KVMSTATS_NONE;
	uint64_t sum = 0;
	for (uint32_t i = 0; i < s->nofs; i++) {
		uint64_t v;
		if (pread(s->fd, &v, sizeof(v), (off_t)s->ofs[i]) != (ssize_t)sizeof(v))
			return VMM_KVMSTATS_NONE;
		sum += v;
	}
	return sum == VMM_KVMSTATS_NONE ? 0 : sum;
}

void vmm_kvmstats_close(struct vmm_kvmstats *s)
{
	if (s->fd >= 0)
		close(s->fd);
	s->fd = -1;
	s->nofs = 0;
}
