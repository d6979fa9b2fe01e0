/*
 * main.c - the micro-guest modes, chosen by mg= on the kernel command line.
 * README.md lists each mode's exact output and port / MMIO accesses.
 */
#include "mg.h"

#define LAPIC_DEFAULT	0xfee00000ULL
#define MSR_APIC_BASE	0x1b
#define APIC_BASE_X2	(1u << 10)
#define LAPIC_SVR	0x0f0
#define LAPIC_ICR_LO	0x300
#define LAPIC_ICR_HI	0x310
#define MSR_X2APIC_ICR	0x830
#define ICR_BUSY	(1u << 12)
#define ICR_INIT	0x00000500u
#define ICR_STARTUP	0x00000600u
#define ICR_ASSERT	0x00004000u
#define ICR_ALL_BUT_SELF 0x000c0000u

static void mode_print(void)
{
	mg_puts("MG-HELLO\n");
	for (int c = 0x20; c <= 0x7e; c++)
		mg_putc((char)c);
	mg_putc('\n');
	mg_puts("MG-DONE\n");
}

/* The exit loops are three instructions an exit - the exit, dec, jnz - the
 * same three bench/floor.c runs under a bare KVM_RUN loop, so the two
 * compare the VMMs' cost alone (ring-0 guest code is emulated on PVM hosts:
 * every guest instruction shows in the round trip).  Progress is written
 * once, after the loop. */
static void mode_exits(void)
{
	u64 n = mg_arg_u64("n", 1000);
	u64 port = mg_arg_u64("port", 0x510);

	if (port > 0xffff)
		mg_error("bad port %llx", port);
	if (n)
		__asm__ volatile("1: outb %%al, %%dx\n\tdec %%rcx\n\tjnz 1b"
				 : "+c"(n) : "a"(0), "d"((u16)port) : "memory");
	MB->progress = mg_arg_u64("n", 1000);
	mg_puts("MG-DONE\n");
}

static void mode_mmio(void)
{
	u64 n = mg_arg_u64("n", 1000);
	u64 addr = mg_arg_u64("addr", 0xd0000000ULL);

	if (addr > 0xfffffffcULL || (addr & 3))
		mg_error("bad addr %llx (4-byte aligned, below 4 GiB)", addr);
	if (n)
		__asm__ volatile("1: movl %%eax, (%%rdi)\n\tdec %%rcx\n\tjnz 1b"
				 : "+c"(n) : "a"(0), "D"(addr) : "memory");
	MB->progress = mg_arg_u64("n", 1000);
	mg_puts("MG-DONE\n");
}

static void mode_count(void)
{
	u64 n = mg_arg_u64("n", 10000);
	u64 every = mg_arg_u64("every", 1000);
	u64 left = every;

	MB->count = 0;
	for (u64 i = 0; n == 0 || i < n; i++) {
		u64 v = MB->count + 1;
		MB->count = v;
		if (every && --left == 0) {
			left = every;
			mg_printf("MG-COUNT %llu\n", v);
		}
	}
	mg_puts("MG-DONE\n");
}

static void mode_tick(void)
{
	const char *src;
	u64 ms = mg_arg_u64("ms", 10);
	u64 n = mg_arg_u64("n", 0);
	u64 khz = mg_tsc_khz(&src);
	u64 period = ms * khz, seq = 0, last, deadline;

	MB->tsc_khz = khz;
	MB->tick = 0;
	mg_printf("MG-TSC khz=%llu src=%s\n", khz, src);
	last = rdtsc();
	deadline = last + period;
	for (;;) {
		u64 now = rdtsc();
		if (now < last) {
			/* TSC went backwards (restored elsewhere): restart the period */
			deadline = now + period;
		} else if (now >= deadline) {
			/* next deadline from now: a long pause gives one tick, no burst */
			MB->tick = ++seq;
			mg_printf("MG-TICK %llu\n", seq);
			if (n && seq >= n)
				break;
			now = rdtsc();
			deadline = now + period;
		}
		last = now;
		cpu_relax();
	}
	mg_puts("MG-DONE\n");
}

/* mg=genid: the 16 bytes at addr= (the VMGenID id), printed now and again
 * at each change, as a restored or cloned VM's guest sees them. */
static void put_genid(const u8 *id)
{
	static const char hex[] = "0123456789abcdef";

	mg_puts("MG-GENID ");
	for (int i = 0; i < 16; i++) {
		mg_putc(hex[id[i] >> 4]);
		mg_putc(hex[id[i] & 15]);
	}
	mg_putc('\n');
}

#define IOAPIC_BASE	0xfec00000ULL
#define IOAPIC_REGSEL	0x00
#define IOAPIC_WIN	0x10
#define MSR_X2APIC_SVR	0x80f

/* Route IOAPIC pin `pin` to this CPU's LAPIC as `vector` (fixed, edge,
 * active high, unmasked) with the LAPIC software-enabled.  Interrupts stay
 * off: the vector waits in the LAPIC's IRR, where the host can see it. */
static void route_pin(u64 pin, u64 vector)
{
	u64 apic_base_msr = rdmsr(MSR_APIC_BASE);
	u64 lapic = apic_base_msr & 0xfffff000ULL;

	if (pin > 23 || vector < 0x20 || vector > 0xfe)
		mg_error("bad ged=%llx / ged_pin=%llu", vector, pin);
	if (apic_base_msr & APIC_BASE_X2)
		wrmsr(MSR_X2APIC_SVR, rdmsr(MSR_X2APIC_SVR) | 0x1ff);
	else
		mmio_write32((lapic ? lapic : LAPIC_DEFAULT) + LAPIC_SVR, 0x1ff);
	mmio_write32(IOAPIC_BASE + IOAPIC_REGSEL, 0x11 + 2 * (u32)pin);
	mmio_write32(IOAPIC_BASE + IOAPIC_WIN, 0);	/* destination: APIC id 0 */
	mmio_write32(IOAPIC_BASE + IOAPIC_REGSEL, 0x10 + 2 * (u32)pin);
	mmio_write32(IOAPIC_BASE + IOAPIC_WIN, (u32)vector);
}

static void mode_genid(void)
{
	u64 addr = mg_arg_u64("addr", 0xff000);
	u64 n = mg_arg_u64("n", 0);
	u64 ged = mg_arg_u64("ged", 0);
	volatile const u8 *id = (volatile const u8 *)addr;
	u8 seen[16];

	if (addr + 16 > 0x40000000ULL)
		mg_error("bad addr %llx (below 1 GiB)", addr);
	if (ged)
		route_pin(mg_arg_u64("ged_pin", 3), ged);
	for (int i = 0; i < 16; i++)
		seen[i] = id[i];
	put_genid(seen);
	MB->progress = 0;
	for (u64 changes = 0; n == 0 || changes < n;) {
		int same = 1;
		for (int i = 0; i < 16; i++)
			same &= seen[i] == id[i];
		if (!same) {
			for (int i = 0; i < 16; i++)
				seen[i] = id[i];
			put_genid(seen);
			MB->progress = ++changes;
		}
		cpu_relax();
	}
	mg_puts("MG-DONE\n");
}

/* ---- SMP ---- */
static u64 lapic_base;
static int x2apic;

static void lapic_ipi(u32 icr)
{
	if (x2apic) {
		wrmsr(MSR_X2APIC_ICR, icr);	/* destination shorthand: no dest needed */
		return;
	}
	mmio_write32(lapic_base + LAPIC_ICR_HI, 0);
	mmio_write32(lapic_base + LAPIC_ICR_LO, icr);
	for (int i = 0; i < 1000 && (mmio_read32(lapic_base + LAPIC_ICR_LO) & ICR_BUSY); i++)
		cpu_relax();
}

static void mode_smp(void)
{
	u64 ncpus = mg_arg_u64("ncpus", 1);
	u64 timeout_ms = mg_arg_u64("timeout_ms", 3000);
	u32 ids[MG_MAX_APS + 1];
	u32 seen, nids;

	if (ncpus == 0 || ncpus > MG_MAX_APS + 1)
		mg_error("bad ncpus %llu (1..%u)", ncpus, MG_MAX_APS + 1);
	MB->ap_slot = 0;
	MB->ap_done = 0;

	if (ncpus > 1) {
		u64 apic_base_msr = rdmsr(MSR_APIC_BASE);
		lapic_base = apic_base_msr & 0xfffff000ULL;
		if (!lapic_base)
			lapic_base = LAPIC_DEFAULT;
		x2apic = (apic_base_msr & APIC_BASE_X2) != 0;
		if (!x2apic) {
			u32 svr = mmio_read32(lapic_base + LAPIC_SVR);
			mmio_write32(lapic_base + LAPIC_SVR, svr | 0x1ff);	/* enable, vector 0xff */
		}
		memcpy((void *)MG_AP_TRAMP, mg_ap_tramp_start,
		       (usize)(mg_ap_tramp_end - mg_ap_tramp_start));

		/*
		 * INIT, SIPI, SIPI to all but self.  No 10 ms INIT delay: like
		 * Linux on modern CPUs (init_udelay = 0), and KVM's LAPIC
		 * processes INIT before a latched SIPI anyway.
		 */
		lapic_ipi(ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_INIT);
		mg_delay_us_at_least(10);
		lapic_ipi(ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_STARTUP | MG_AP_VECTOR);
		mg_delay_us_at_least(200);
		if (MB->ap_done < ncpus - 1)
			lapic_ipi(ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_STARTUP | MG_AP_VECTOR);

		/* bounded wait: rdtsc against a 10 GHz upper bound, i.e. >= timeout_ms */
		u64 start = rdtsc(), limit = timeout_ms * 10000000ULL, now;
		do {
			cpu_relax();
			now = rdtsc();
		} while (MB->ap_done < ncpus - 1 && now >= start && now - start < limit);
	}

	seen = 1 + MB->ap_done;
	nids = MB->ap_done < MG_MAX_APS ? MB->ap_done : MG_MAX_APS;
	ids[0] = mg_apic_id();
	for (u32 i = 0; i < nids; i++)
		ids[i + 1] = MB->apic_ids[i];
	nids++;
	for (u32 i = 1; i < nids; i++)	/* insertion sort */
		for (u32 j = i; j > 0 && ids[j - 1] > ids[j]; j--) {
			u32 t = ids[j];
			ids[j] = ids[j - 1];
			ids[j - 1] = t;
		}
	mg_printf("MG-CPUS %u apic=", seen);
	for (u32 i = 0; i < nids; i++)
		mg_printf(i ? ",%u" : "%u", ids[i]);
	mg_putc('\n');
	mg_puts("MG-DONE\n");
}

static void mode_spin(void)
{
	mg_puts("MG-START\n");
	for (u64 i = 1;; i++) {
		MB->progress = i;
		cpu_relax();
	}
}

static void mode_info(void)
{
	u32 a, b, c, d, vendor[3];
	cpuid(0, 0, &a, &vendor[0], &vendor[2], &vendor[1]);
	mg_printf("MG-BOOT %s info=0x%llx\n", MB->boot == MG_BOOT_PVH ? "pvh" : "linux64",
		  MB->boot_info);
	mg_printf("MG-CMDLINE %s\n", (const char *)MB->cmdline);
	mg_printf("MG-CPU vendor=%.*s maxleaf=0x%x apic=%u\n", 12, (const char *)vendor, a,
		  mg_apic_id());
	cpuid(0x40000000, 0, &a, &b, &c, &d);
	u32 hv[3] = { b, c, d };
	mg_printf("MG-HV sig=%.*s maxleaf=0x%x\n", 12, (const char *)hv, a);
	mg_printf("MG-MAILBOX 0x%x\n", MG_MAILBOX);
	mg_puts("MG-DONE\n");
}

static void mode_halt(void)
{
	mg_puts("MG-START\n");
	mg_end(MG_END_HALT);
}

/* An idle guest: interrupts on, halted, nothing armed to wake it (no timer
 * programmed, no device enabled).  What an idle VM costs the host is then
 * the VMM's own doing. */
static void mode_idle(void)
{
	mg_puts("MG-IDLE\n");
	for (;;)
		__asm__ volatile("sti; hlt");
}

static void mode_triple(void)
{
	mg_puts("MG-START\n");
	mg_end(MG_END_TRIPLE);
}

static void mode_reset(void)
{
	mg_puts("MG-START\n");
	mg_end(MG_END_RESET);
}

/*
 * An instruction KVM's emulator does not implement, on an MMIO operand: the
 * access must be emulated (no RAM behind it) and cannot be, so KVM stops
 * the vCPU with an emulation failure - on hardware KVM as on PVM.  popcnt
 * (f3 48 0f b8 /r) is absent from the emulator's opcode tables.
 */
static void mode_emufail(void)
{
	u64 addr = mg_arg_u64("addr", 0xd0000000);
	u64 v;
	mg_puts("MG-START\n");
	__asm__ volatile("popcntq (%1), %0" : "=r"(v) : "r"(addr) : "memory");
	mg_printf("MG-ERROR popcnt on MMIO was emulated: %u\n", (u32)v);
	mg_end(MG_END_RESET);
}

static const struct {
	const char *name;
	void (*run)(void);
} modes[] = {
	{ "print", mode_print },
	{ "exits", mode_exits },
	{ "mmio", mode_mmio },
	{ "count", mode_count },
	{ "tick", mode_tick },
	{ "smp", mode_smp },
	{ "spin", mode_spin },
	{ "info", mode_info },
	{ "halt", mode_halt },
	{ "idle", mode_idle },
	{ "triple", mode_triple },
	{ "reset", mode_reset },
	{ "emufail", mode_emufail },
	{ "blk", mode_blk },
	{ "net", mode_net },
	{ "rng", mode_rng },
	{ "genid", mode_genid },
	{ "vsock-echo", mode_vsock_echo },
	{ "vsock-connect", mode_vsock_connect },
	{ "vsock-flood", mode_vsock_flood },
};

int main(const char *cmdline)
{
	usize len;
	const char *m = mg_arg("mg", &len);

	(void)cmdline;
	MB->state = 2;
	if (!m) {
		mode_print();	/* no mg= word: the print mode */
		return 0;
	}
	for (usize i = 0; i < sizeof(modes) / sizeof(modes[0]); i++) {
		const char *n = modes[i].name;
		usize j;
		for (j = 0; j < len && n[j] && m[j] == n[j]; j++)
			;
		if (j == len && !n[j]) {
			modes[i].run();
			return 0;
		}
	}
	mg_error("unknown mode mg=%.*s", (int)len, m);
}
