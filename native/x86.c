/*
 * x86.c - per-vCPU x86 state a microVM needs before its first KVM_RUN:
 * CPUID (KVM's supported set, with this vCPU's APIC id and the VM's
 * topology), the boot MSRs, LAPIC LINT0/LINT1 wiring, FPU defaults, and
 * the boot registers the Python loader computed.  Values follow
 * Firecracker's proven choices.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include "common.h"
#include "vcpu.h"

#define MAX_CPUID_ENTRIES 256
#define MSR_TSC 0x10		/* IA32_TIME_STAMP_COUNTER */

size_t vmm_x86_cpuid_size(void)
{
	return sizeof(struct kvm_cpuid2) + MAX_CPUID_ENTRIES * sizeof(struct kvm_cpuid_entry2);
}

struct kvm_cpuid2 *vmm_x86_supported_cpuid(int kvm_fd)
{
	struct kvm_cpuid2 *c = calloc(1, vmm_x86_cpuid_size());
	if (!c)
		return NULL;
	c->nent = MAX_CPUID_ENTRIES;
	if (ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, c) < 0) {
		free(c);
		return NULL;
	}
	/* The in-kernel LAPIC has a TSC-deadline timer; KVM does not say so in
	 * the supported set, only as a capability. */
	if (ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_TSC_DEADLINE_TIMER) > 0)
		for (uint32_t i = 0; i < c->nent; i++)
			if (c->entries[i].function == 1)
				c->entries[i].ecx |= 1u << 24;
	return c;
}

static int log2_ceil(int n)
{
	int s = 0;
	while ((1 << s) < n)
		s++;
	return s;
}

/* Leaf 0xB: one thread per core, every vCPU a core of one package. */
static void set_topology_leaf(struct kvm_cpuid_entry2 *e, uint32_t sub, int n, uint32_t apic)
{
	memset(e, 0, sizeof(*e));
	e->function = 0xb;
	e->index = sub;
	e->flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
	e->edx = apic;
	if (sub == 0) {		/* SMT level */
		e->eax = 0;
		e->ebx = 1;
		e->ecx = (1u << 8) | sub;
	} else if (sub == 1) {	/* core level */
		e->eax = (uint32_t)log2_ceil(n);
		e->ebx = (uint32_t)n;
		e->ecx = (2u << 8) | sub;
	} else {		/* invalid level ends the enumeration */
		e->ecx = sub;
	}
}

static void patch_cpuid(struct kvm_cpuid2 *c, int n, uint32_t apic)
{
	uint32_t out = 0;
	for (uint32_t i = 0; i < c->nent; i++) {
		struct kvm_cpuid_entry2 *e = &c->entries[i];
		/* Host topology leaves are replaced below; 0x1f dropped so the
		 * guest falls back to 0xb. */
		if (e->function == 0xb || e->function == 0x1f)
			continue;
		if (e->function == 1) {
			e->ebx = (apic << 24) | ((uint32_t)n << 16) | (8u << 8);
			e->ecx |= 1u << 31;	/* hypervisor present */
			if (n > 1)
				e->edx |= 1u << 28;	/* HTT: several logical CPUs */
		} else if (e->function == 4 && (e->eax & 0x1f)) {
			uint32_t level = (e->eax >> 5) & 7;
			uint32_t sharing = level >= 3 ? (uint32_t)n - 1 : 0;
			e->eax &= 0x3fff;
			e->eax |= (((uint32_t)n - 1) & 0x3f) << 26;
			e->eax |= (sharing & 0xfff) << 14;
		}
		c->entries[out++] = *e;
	}
	for (uint32_t sub = 0; sub < 3 && out < MAX_CPUID_ENTRIES; sub++)
		set_topology_leaf(&c->entries[out++], sub, n, apic);
	c->nent = out;
}

static int setup_cpuid(struct vmm_vm *vm, struct vmm_vcpu *vc)
{
	struct kvm_cpuid2 *c = malloc(vmm_x86_cpuid_size());
	if (!c)
		return -ENOMEM;
	memcpy(c, vm->cpuid_base, vmm_x86_cpuid_size());	/* each vCPU patches its own copy */
	/* nvcpus is final before the first vCPU is created. */
	patch_cpuid(c, vm->nvcpus, (uint32_t)vc->idx);
	int r = vmm_ioctl(vc->fd, KVM_SET_CPUID2, c);
	free(c);
	return r;
}

static int setup_msrs(struct vmm_vcpu *vc)
{
	static const struct { uint32_t index; uint64_t data; } boot[] = {
		{ 0x174, 0 }, { 0x175, 0 }, { 0x176, 0 },	/* SYSENTER_CS/ESP/EIP */
		{ 0xc0000081, 0 }, { 0xc0000082, 0 },		/* STAR, LSTAR */
		{ 0xc0000083, 0 }, { 0xc0000084, 0 },		/* CSTAR, SYSCALL_MASK */
		{ 0xc0000102, 0 },				/* KERNEL_GS_BASE */
		{ MSR_TSC, 0 },					/* TSC */
		{ 0x1a0, 1 },					/* MISC_ENABLE: fast strings */
		{ 0x2ff, (1u << 11) | 6 },			/* MTRRdefType: on, WB */
	};
	enum { N = sizeof(boot) / sizeof(boot[0]) };
	struct {
		struct kvm_msrs hdr;
		struct kvm_msr_entry e[N];
	} m;
	memset(&m, 0, sizeof(m));
	m.hdr.nmsrs = N;
	for (int i = 0; i < N; i++) {
		m.e[i].index = boot[i].index;
		m.e[i].data = boot[i].data;
	}
	int r = ioctl(vc->fd, KVM_SET_MSRS, &m);
	if (r < 0)
		return -errno;
	return r == N ? 0 : -EIO;
}

static void lapic_set_delivery(struct kvm_lapic_state *l, int reg, uint32_t mode)
{
	uint32_t v;
	memcpy(&v, &l->regs[reg], 4);
	v = (v & ~0x700u) | (mode << 8);
	memcpy(&l->regs[reg], &v, 4);
}

static int setup_lapic(struct vmm_vcpu *vc)
{
	struct kvm_lapic_state l;
	if (ioctl(vc->fd, KVM_GET_LAPIC, &l) < 0)
		return -errno;
	lapic_set_delivery(&l, 0x350, 7);	/* LINT0: ExtINT (the PIC) */
	lapic_set_delivery(&l, 0x360, 4);	/* LINT1: NMI */
	return vmm_ioctl(vc->fd, KVM_SET_LAPIC, &l);
}

static int setup_fpu(struct vmm_vcpu *vc)
{
	struct kvm_fpu fpu;
	memset(&fpu, 0, sizeof(fpu));
	fpu.fcw = 0x37f;
	fpu.mxcsr = 0x1f80;
	return vmm_ioctl(vc->fd, KVM_SET_FPU, &fpu);
}

int vmm_x86_setup_vcpu(struct vmm_vm *vm, struct vmm_vcpu *vc)
{
	int r = setup_cpuid(vm, vc);
	if (!r)
		r = setup_msrs(vc);
	if (!r)
		r = setup_lapic(vc);
	if (!r)
		r = setup_fpu(vc);
	return r;
}

static void to_kvm_segment(struct kvm_segment *k, const struct vmm_segment *s)
{
	memset(k, 0, sizeof(*k));
	k->base = s->base;
	k->limit = s->limit;
	k->selector = s->selector;
	k->type = s->type;
	k->present = s->present;
	k->dpl = s->dpl;
	k->db = s->db;
	k->s = s->s;
	k->l = s->l;
	k->g = s->g;
	k->avl = s->avl;
	k->unusable = !s->present;
}

int vmm_x86_set_boot_regs(struct vmm_vcpu *vc, const struct vmm_boot_regs *b)
{
	struct kvm_sregs sr;
	if (ioctl(vc->fd, KVM_GET_SREGS, &sr) < 0)
		return -errno;
	to_kvm_segment(&sr.cs, &b->cs);
	to_kvm_segment(&sr.ds, &b->ds);
	to_kvm_segment(&sr.es, &b->es);
	to_kvm_segment(&sr.fs, &b->fs);
	to_kvm_segment(&sr.gs, &b->gs);
	to_kvm_segment(&sr.ss, &b->ss);
	to_kvm_segment(&sr.tr, &b->tr);
	to_kvm_segment(&sr.ldt, &b->ldt);
	sr.gdt.base = b->gdt_base;
	sr.gdt.limit = b->gdt_limit;
	sr.idt.base = b->idt_base;
	sr.idt.limit = b->idt_limit;
	sr.cr0 = b->cr0;
	sr.cr3 = b->cr3;
	sr.cr4 = b->cr4;
	sr.efer = b->efer;
	if (ioctl(vc->fd, KVM_SET_SREGS, &sr) < 0)
		return -errno;
	struct kvm_regs r;
	memset(&r, 0, sizeof(r));
	r.rip = b->rip;
	r.rsp = b->rsp;
	r.rbp = b->rbp;
	r.rsi = b->rsi;
	r.rbx = b->rbx;
	r.rflags = b->rflags;
	return vmm_ioctl(vc->fd, KVM_SET_REGS, &r);
}

static void from_kvm_segment(struct vmm_segment *s, const struct kvm_segment *k)
{
	s->base = k->base;
	s->limit = k->limit;
	s->selector = k->selector;
	s->type = k->type;
	s->present = k->present;
	s->dpl = k->dpl;
	s->db = k->db;
	s->s = k->s;
	s->l = k->l;
	s->g = k->g;
	s->avl = k->avl;
}

int vmm_x86_get_regs(struct vmm_vcpu *vc, struct vmm_boot_regs *b, uint32_t *mp_state)
{
	struct kvm_sregs sr;
	struct kvm_regs r;
	struct kvm_mp_state mp;
	if (ioctl(vc->fd, KVM_GET_SREGS, &sr) < 0 || ioctl(vc->fd, KVM_GET_REGS, &r) < 0 ||
	    ioctl(vc->fd, KVM_GET_MP_STATE, &mp) < 0)
		return -errno;
	memset(b, 0, sizeof(*b));
	from_kvm_segment(&b->cs, &sr.cs);
	from_kvm_segment(&b->ds, &sr.ds);
	from_kvm_segment(&b->es, &sr.es);
	from_kvm_segment(&b->fs, &sr.fs);
	from_kvm_segment(&b->gs, &sr.gs);
	from_kvm_segment(&b->ss, &sr.ss);
	from_kvm_segment(&b->tr, &sr.tr);
	from_kvm_segment(&b->ldt, &sr.ldt);
	b->gdt_base = sr.gdt.base;
	b->gdt_limit = sr.gdt.limit;
	b->idt_base = sr.idt.base;
	b->idt_limit = sr.idt.limit;
	b->cr0 = sr.cr0;
	b->cr3 = sr.cr3;
	b->cr4 = sr.cr4;
	b->efer = sr.efer;
	b->rip = r.rip;
	b->rsp = r.rsp;
	b->rbp = r.rbp;
	b->rsi = r.rsi;
	b->rbx = r.rbx;
	b->rflags = r.rflags;
	*mp_state = mp.mp_state;
	return 0;
}

/* ---- snapshots: the vCPU's whole architectural state ---- */
#define BLOB(field, type) _Static_assert(sizeof(((struct vmm_vcpu_state *)0)->field) == \
					  sizeof(type), #field " size")
BLOB(regs, struct kvm_regs);
BLOB(sregs, struct kvm_sregs);
BLOB(xsave, struct kvm_xsave);
BLOB(xcrs, struct kvm_xcrs);
BLOB(debugregs, struct kvm_debugregs);
BLOB(lapic, struct kvm_lapic_state);
BLOB(events, struct kvm_vcpu_events);

#define MAX_STATE_MSRS (sizeof(((struct vmm_vcpu_state *)0)->msrs) / sizeof(struct vmm_msr))
#define MAX_STATE_CPUID (sizeof(((struct vmm_vcpu_state *)0)->cpuid) / \
			 sizeof(struct vmm_cpuid_entry))

struct msr_buf {
	struct kvm_msrs hdr;
	struct kvm_msr_entry e[MAX_STATE_MSRS];
};

/* Every MSR KVM lists as saveable that this vCPU can read: KVM_GET_MSRS
 * stops at the first it cannot, so skip that one and go on. */
static int save_msrs(struct vmm_vcpu *vc, struct vmm_vcpu_state *s)
{
	struct { struct kvm_msr_list hdr; uint32_t idx[MAX_STATE_MSRS]; } list;
	list.hdr.nmsrs = MAX_STATE_MSRS;
	if (ioctl(vc->vm->kvm_fd, KVM_GET_MSR_INDEX_LIST, &list) < 0)
		return -errno;
	struct msr_buf *m = calloc(1, sizeof(*m));
	if (!m)
		return -ENOMEM;
	s->nmsrs = 0;
	for (uint32_t from = 0; from < list.hdr.nmsrs;) {
		uint32_t n = list.hdr.nmsrs - from;
		m->hdr.nmsrs = n;
		for (uint32_t i = 0; i < n; i++)
			m->e[i] = (struct kvm_msr_entry){ .index = list.idx[from + i] };
		int got = ioctl(vc->fd, KVM_GET_MSRS, m);
		if (got < 0) {
			free(m);
			return -errno;
		}
		for (int i = 0; i < got; i++)
			s->msrs[s->nmsrs++] = (struct vmm_msr){ .index = m->e[i].index,
							       .data = m->e[i].data };
		from += (uint32_t)got + 1;	/* skip the one KVM could not read */
	}
	free(m);
	return 0;
}

static int save_cpuid(struct vmm_vcpu *vc, struct vmm_vcpu_state *s)
{
	struct kvm_cpuid2 *c = calloc(1, vmm_x86_cpuid_size());
	if (!c)
		return -ENOMEM;
	c->nent = MAX_CPUID_ENTRIES;
	int r = vmm_ioctl(vc->fd, KVM_GET_CPUID2, c);
	if (!r && c->nent > MAX_STATE_CPUID)
		r = -E2BIG;
	for (uint32_t i = 0; !r && i < c->nent; i++) {
		const struct kvm_cpuid_entry2 *e = &c->entries[i];
		s->cpuid[i] = (struct vmm_cpuid_entry){ e->function, e->index, e->flags, e->eax,
							e->ebx, e->ecx, e->edx };
	}
	s->ncpuid = r ? 0 : c->nent;
	free(c);
	return r;
}

/* Firecracker's order: mp_state, registers, FPU, LAPIC, CPUID, MSRs, events. */
int vmm_x86_save_vcpu(struct vmm_vcpu *vc, struct vmm_vcpu_state *s)
{
	struct kvm_mp_state mp;
	memset(s, 0, sizeof(*s));
	int r = vmm_ioctl(vc->fd, KVM_GET_MP_STATE, &mp);
	s->mp_state = mp.mp_state;
	if (!r)
		r = vmm_ioctl(vc->fd, KVM_GET_REGS, s->regs);
	if (!r)
		r = vmm_ioctl(vc->fd, KVM_GET_SREGS, s->sregs);
	if (!r)
		r = vmm_ioctl(vc->fd, KVM_GET_XSAVE, s->xsave);
	if (!r)
		r = vmm_ioctl(vc->fd, KVM_GET_XCRS, s->xcrs);
	if (!r)
		r = vmm_ioctl(vc->fd, KVM_GET_DEBUGREGS, s->debugregs);
	if (!r)
		r = vmm_ioctl(vc->fd, KVM_GET_LAPIC, s->lapic);
	if (!r)
		r = save_cpuid(vc, s);
	if (!r)
		r = save_msrs(vc, s);
	if (!r)
		r = vmm_ioctl(vc->fd, KVM_GET_VCPU_EVENTS, s->events);
	return r;
}

static int restore_cpuid(struct vmm_vcpu *vc, const struct vmm_vcpu_state *s)
{
	if (s->ncpuid == 0 || s->ncpuid > MAX_STATE_CPUID)
		return -EINVAL;
	struct kvm_cpuid2 *c = calloc(1, vmm_x86_cpuid_size());
	if (!c)
		return -ENOMEM;
	c->nent = s->ncpuid;
	for (uint32_t i = 0; i < s->ncpuid; i++) {
		const struct vmm_cpuid_entry *e = &s->cpuid[i];
		c->entries[i] = (struct kvm_cpuid_entry2){ .function = e->function, .index = e->index,
			.flags = e->flags, .eax = e->eax, .ebx = e->ebx, .ecx = e->ecx, .edx = e->edx };
	}
	int r = vmm_ioctl(vc->fd, KVM_SET_CPUID2, c);
	free(c);
	return r;
}

/* The TSC advanced by ns at the vCPU's TSC rate (KVM_GET_TSC_KHZ); 128-bit
 * product: years in ns times GHz overflow 64 bits. */
static int advance_tsc(struct vmm_vcpu *vc, struct kvm_msr_entry *tsc, uint64_t ns)
{
	int khz = ioctl(vc->fd, KVM_GET_TSC_KHZ, 0);
	if (khz <= 0)
		return khz < 0 ? -errno : -EINVAL;
	tsc->data += (uint64_t)((unsigned __int128)ns * (unsigned)khz / 1000000u);
	return 0;
}

static int restore_msrs(struct vmm_vcpu *vc, const struct vmm_vcpu_state *s, uint64_t tsc_advance_ns)
{
	if (s->nmsrs > MAX_STATE_MSRS)
		return -EINVAL;
	struct msr_buf *m = calloc(1, sizeof(*m));
	if (!m)
		return -ENOMEM;
	m->hdr.nmsrs = s->nmsrs;
	int r = 0;
	for (uint32_t i = 0; i < s->nmsrs; i++) {
		m->e[i] = (struct kvm_msr_entry){ .index = s->msrs[i].index, .data = s->msrs[i].data };
		if (m->e[i].index == MSR_TSC && tsc_advance_ns && !r)
			r = advance_tsc(vc, &m->e[i], tsc_advance_ns);
	}
	if (r) {
		free(m);
		return r;
	}
	int got = ioctl(vc->fd, KVM_SET_MSRS, m);
	free(m);
	if (got < 0)
		return -errno;
	return (uint32_t)got == s->nmsrs ? 0 : -EINVAL;	/* an MSR KVM refused */
}

/* KVM's order: CPUID before anything that depends on it, LAPIC after sregs
 * (the APIC base), MSRs after the LAPIC (TSC deadline), events last. */
int vmm_x86_restore_vcpu(struct vmm_vcpu *vc, const struct vmm_vcpu_state *s,
			 uint64_t tsc_advance_ns)
{
	struct kvm_mp_state mp = { .mp_state = s->mp_state };
	int r = restore_cpuid(vc, s);
	if (!r)
		r = vmm_ioctl(vc->fd, KVM_SET_MP_STATE, &mp);
	if (!r)
		r = vmm_ioctl(vc->fd, KVM_SET_REGS, (void *)s->regs);
	if (!r)
		r = vmm_ioctl(vc->fd, KVM_SET_SREGS, (void *)s->sregs);
	if (!r)
		r = vmm_ioctl(vc->fd, KVM_SET_XSAVE, (void *)s->xsave);
	if (!r)
		r = vmm_ioctl(vc->fd, KVM_SET_XCRS, (void *)s->xcrs);
	if (!r)
		r = vmm_ioctl(vc->fd, KVM_SET_DEBUGREGS, (void *)s->debugregs);
	if (!r)
		r = vmm_ioctl(vc->fd, KVM_SET_LAPIC, (void *)s->lapic);
	if (!r)
		r = restore_msrs(vc, s, tsc_advance_ns);
	if (!r)
		r = vmm_ioctl(vc->fd, KVM_SET_VCPU_EVENTS, (void *)s->events);
	return r;
}
