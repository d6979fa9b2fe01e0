/*
 * mg.h - shared definitions of the vmmd micro-guests (C and assembly).
 *
 * Everything here is freestanding: no libc, no SSE, baseline x86-64.
 * The fixed physical addresses below are part of the guest's documented
 * interface (README.md); tests/guests/build.py mirrors them as Python
 * constants.  Keep the three in sync.
 */
#ifndef MG_H
#define MG_H

/* ---- fixed physical addresses (identity mapped: vaddr == paddr) ---- */
#define MG_LOAD_ADDR	0x200000	/* image base: first PT_LOAD */
#define MG_MAILBOX	0x200000	/* 4 KiB mailbox page = first page of the image */
#define MG_AP_TRAMP	0x3000		/* real-mode AP trampoline (SIPI vector 0x03) */
#define MG_AP_VECTOR	(MG_AP_TRAMP >> 12)

/* mailbox layout (offsets from MG_MAILBOX) */
#define MG_MB_MAGIC	0x000	/* u64 "MGMBOX01" once the C runtime runs */
#define MG_MB_BOOT	0x008	/* u32 boot protocol: 1 = PVH, 2 = Linux 64-bit */
#define MG_MB_STATE	0x00c	/* u32 0 loaded, 1 C entered, 2 mode running, 3 ending */
#define MG_MB_COUNT	0x010	/* u64 mg=count counter */
#define MG_MB_TICK	0x018	/* u64 last MG-TICK sequence number printed */
#define MG_MB_PROGRESS	0x020	/* u64 iterations done (exits, mmio, spin) */
#define MG_MB_TSC_KHZ	0x028	/* u64 TSC frequency used by mg=tick */
#define MG_MB_AP_SLOT	0x030	/* u32 AP slots taken (lock xadd) */
#define MG_MB_AP_DONE	0x034	/* u32 APs checked in (lock inc, after storing id) */
#define MG_MB_BOOTINFO	0x038	/* u64 physical address of start_info / zero page */
#define MG_MB_APIC_IDS	0x040	/* u32[MG_MAX_APS] APIC ids of the APs, in check-in order */
#define MG_MB_CMDLINE	0x800	/* char[MG_CMDLINE_MAX] NUL-terminated copy of the cmdline */

#define MG_MAX_APS	255
#define MG_CMDLINE_MAX	2048

#define MG_MAGIC_VALUE	0x3130584f424d474dULL	/* "MGMBOX01" little endian */
#define MG_BOOT_PVH	1
#define MG_BOOT_LINUX64	2

/* GDT selectors (our own GDT, same as the Linux 64-bit boot protocol's) */
#define MG_CS64		0x08
#define MG_DS		0x10
#define MG_CS32		0x18

#ifndef __ASSEMBLER__

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long s64;
typedef unsigned long usize;

#define NULL ((void *)0)
#define MG_NORETURN __attribute__((noreturn))
#define MG_PRINTF(a, b) __attribute__((format(printf, a, b)))

struct mg_mailbox {
	u64 magic;
	u32 boot;
	u32 state;
	u64 count;
	u64 tick;
	u64 progress;
	u64 tsc_khz;
	u32 ap_slot;
	u32 ap_done;
	u64 boot_info;
	u32 apic_ids[MG_MAX_APS];
	u8 pad[MG_MB_CMDLINE - MG_MB_APIC_IDS - 4 * MG_MAX_APS];
	char cmdline[MG_CMDLINE_MAX];
};

#define MB ((volatile struct mg_mailbox *)MG_MAILBOX)

/* ---- port and MSR access ---- */
static inline void outb(u16 port, u8 v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port) : "memory");
	return v;
}

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi) : : "memory");
	return ((u64)hi << 32) | lo;
}

static inline u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}

static inline void wrmsr(u32 msr, u64 v)
{
	__asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}

static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

static inline void cpu_relax(void)
{
	__asm__ volatile("pause" : : : "memory");
}

static inline void mmio_write32(u64 addr, u32 v)
{
	__asm__ volatile("movl %0, (%1)" : : "r"(v), "r"(addr) : "memory");
}

static inline u32 mmio_read32(u64 addr)
{
	u32 v;
	__asm__ volatile("movl (%1), %0" : "=r"(v) : "r"(addr) : "memory");
	return v;
}

/* ---- runtime (rt.c) ---- */
enum mg_end { MG_END_RESET, MG_END_HALT, MG_END_TRIPLE };

void *memset(void *d, int c, usize n);
void *memcpy(void *d, const void *s, usize n);
usize mg_strlen(const char *s);

void mg_putc(char c);
void mg_puts(const char *s);
void mg_printf(const char *fmt, ...) MG_PRINTF(1, 2);

/* cmdline: the last occurrence of key=value wins; words are split on blanks */
const char *mg_arg(const char *key, usize *len);
const char *mg_arg_nth(const char *key, usize n, usize *len);	/* in cmdline order */
int mg_arg_is(const char *key, const char *value);
u64 mg_arg_u64(const char *key, u64 def);	/* ends the VM with MG-ERROR if malformed */

MG_NORETURN void mg_end(enum mg_end how);
MG_NORETURN void mg_end_default(void);	/* the end= word (default reset) */
MG_NORETURN void mg_error(const char *fmt, ...) MG_PRINTF(1, 2);

void mg_delay_us_at_least(u64 us);
u64 mg_tsc_khz(const char **source);

u32 mg_apic_id(void);

int main(const char *cmdline);

/* blk.c / net.c: virtio-blk and virtio-net drivers (over virtio.c) and their modes */
void mode_blk(void);
void mode_net(void);
void mode_rng(void);
/* vsock.c: virtio-vsock driver and its modes */
void mode_vsock_echo(void);
void mode_vsock_connect(void);
void mode_vsock_flood(void);

/* assembly (entry.S) */
extern const char mg_ap_tramp_start[], mg_ap_tramp_end[];

#endif /* __ASSEMBLER__ */
#endif /* MG_H */
