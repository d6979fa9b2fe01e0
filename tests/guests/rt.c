/*
 * rt.c - the micro-guests' tiny C runtime: mailbox, boot-info decoding,
 * UART output, printf, cmdline parsing, TSC, APIC id and the ways to end.
 */
#include <stdarg.h>
#include "mg.h"

/* The mailbox is the first page of the image (link.ld pins it at MG_MAILBOX). */
__attribute__((section(".mailbox"), used, aligned(4096)))
struct mg_mailbox mg_mailbox;

_Static_assert(sizeof(struct mg_mailbox) == 4096, "mailbox is one page");
_Static_assert(__builtin_offsetof(struct mg_mailbox, count) == MG_MB_COUNT, "count");
_Static_assert(__builtin_offsetof(struct mg_mailbox, tick) == MG_MB_TICK, "tick");
_Static_assert(__builtin_offsetof(struct mg_mailbox, progress) == MG_MB_PROGRESS, "progress");
_Static_assert(__builtin_offsetof(struct mg_mailbox, tsc_khz) == MG_MB_TSC_KHZ, "tsc_khz");
_Static_assert(__builtin_offsetof(struct mg_mailbox, ap_slot) == MG_MB_AP_SLOT, "ap_slot");
_Static_assert(__builtin_offsetof(struct mg_mailbox, ap_done) == MG_MB_AP_DONE, "ap_done");
_Static_assert(__builtin_offsetof(struct mg_mailbox, boot_info) == MG_MB_BOOTINFO, "boot_info");
_Static_assert(__builtin_offsetof(struct mg_mailbox, apic_ids) == MG_MB_APIC_IDS, "apic_ids");
_Static_assert(__builtin_offsetof(struct mg_mailbox, cmdline) == MG_MB_CMDLINE, "cmdline");

#define FOUR_GIB		0x100000000ULL
#define HVM_START_MAGIC		0x336ec578u
#define ZP_CMD_LINE_PTR		0x228		/* boot_params.hdr.cmd_line_ptr */

/* xen/include/public/arch-x86/hvm/start_info.h */
struct hvm_start_info {
	u32 magic;
	u32 version;
	u32 flags;
	u32 nr_modules;
	u64 modlist_paddr;
	u64 cmdline_paddr;
	u64 rsdp_paddr;
	u64 memmap_paddr;
	u32 memmap_entries;
	u32 reserved;
};
_Static_assert(__builtin_offsetof(struct hvm_start_info, cmdline_paddr) == 24, "start_info");

/* ---------------- memory helpers (gcc may emit calls to these) ---------------- */
void *memset(void *d, int c, usize n)
{
	volatile u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, usize n)
{
	volatile u8 *p = d;
	const u8 *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

usize mg_strlen(const char *s)
{
	usize n = 0;
	while (s[n])
		n++;
	return n;
}

/* ---------------- UART 8250 at 0x3f8 ---------------- */
#define UART_THR	0x3f8
#define UART_LSR	0x3fd
#define LSR_THRE	0x20
#define LSR_POLL_MAX	256

static int uart_poll = 1;	/* lsr=0 on the cmdline, or a stuck LSR, turns it off */

void mg_putc(char c)
{
	if (uart_poll) {
		int i = 0;
		while (!(inb(UART_LSR) & LSR_THRE)) {
			if (++i >= LSR_POLL_MAX) {
				uart_poll = 0;	/* LSR never says ready: stop asking */
				break;
			}
			cpu_relax();
		}
	}
	outb(UART_THR, (u8)c);
}

void mg_puts(const char *s)
{
	while (*s)
		mg_putc(*s++);
}

static void put_u64(u64 v, unsigned base, int neg)
{
	char buf[24];
	int i = 0;
	do {
		unsigned d = (unsigned)(v % base);
		buf[i++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
		v /= base;
	} while (v);
	if (neg)
		mg_putc('-');
	while (i)
		mg_putc(buf[--i]);
}

static void mg_vprintf(const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			mg_putc(*fmt);
			continue;
		}
		int lng = 0, prec = -1;
		fmt++;
		if (fmt[0] == '.' && fmt[1] == '*') {
			prec = va_arg(ap, int);
			fmt += 2;
		}
		while (*fmt == 'l' || *fmt == 'z') {
			lng = 1;
			fmt++;
		}
		switch (*fmt) {
		case 'd': {
			s64 v = lng ? va_arg(ap, s64) : va_arg(ap, int);
			put_u64(v < 0 ? -(u64)v : (u64)v, 10, v < 0);
			break;
		}
		case 'u':
			put_u64(lng ? va_arg(ap, u64) : va_arg(ap, unsigned), 10, 0);
			break;
		case 'x':
			put_u64(lng ? va_arg(ap, u64) : va_arg(ap, unsigned), 16, 0);
			break;
		case 'c':
			mg_putc((char)va_arg(ap, int));
			break;
		case 's': {
			const char *s = va_arg(ap, const char *);
			if (!s)
				s = "(null)";
			for (; *s && prec != 0; s++, prec--)
				mg_putc(*s);
			break;
		}
		case '%':
			mg_putc('%');
			break;
		case 0:
			return;
		default:
			mg_putc('%');
			mg_putc(*fmt);
		}
	}
}

void mg_printf(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	mg_vprintf(fmt, ap);
	va_end(ap);
}

/* ---------------- cmdline ---------------- */
/*
 * Parsed once (mg_start): every key=value word, in order.  Words without '='
 * and words beyond MG_MAX_WORDS are ignored.  Lookups scan from the end, so
 * the last occurrence of a key wins (a test can override an earlier word).
 */
#define MG_MAX_WORDS	128

struct word {
	const char *key, *val;
	usize klen, vlen;
};

static struct word words[MG_MAX_WORDS] __attribute__((section(".bss.noinit")));
static usize nwords;

static int is_blank(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static void parse_cmdline(const char *p)
{
	nwords = 0;
	while (*p && nwords < MG_MAX_WORDS) {
		while (is_blank(*p))
			p++;
		const char *w = p, *eq = NULL;
		while (*p && !is_blank(*p)) {
			if (*p == '=' && !eq)
				eq = p;
			p++;
		}
		if (eq && eq > w) {
			words[nwords].key = w;
			words[nwords].klen = (usize)(eq - w);
			words[nwords].val = eq + 1;
			words[nwords].vlen = (usize)(p - eq - 1);
			nwords++;
		}
	}
}

const char *mg_arg(const char *key, usize *len)
{
	usize klen = mg_strlen(key);

	for (usize n = nwords; n-- > 0;) {
		const struct word *w = &words[n];
		usize i;
		if (w->klen != klen)
			continue;
		for (i = 0; i < klen && w->key[i] == key[i]; i++)
			;
		if (i == klen) {
			if (len)
				*len = w->vlen;
			return w->val;
		}
	}
	if (len)
		*len = 0;
	return NULL;
}

/* The n-th (0-based) occurrence of key, in cmdline order (e.g. repeated device words). */
const char *mg_arg_nth(const char *key, usize n, usize *len)
{
	usize klen = mg_strlen(key);

	for (usize k = 0; k < nwords; k++) {
		const struct word *w = &words[k];
		usize i;
		if (w->klen != klen)
			continue;
		for (i = 0; i < klen && w->key[i] == key[i]; i++)
			;
		if (i == klen && n-- == 0) {
			if (len)
				*len = w->vlen;
			return w->val;
		}
	}
	if (len)
		*len = 0;
	return NULL;
}

int mg_arg_is(const char *key, const char *value)
{
	usize len, i;
	const char *v = mg_arg(key, &len);
	if (!v)
		return 0;
	for (i = 0; i < len && value[i] && v[i] == value[i]; i++)
		;
	return i == len && value[i] == 0;
}

u64 mg_arg_u64(const char *key, u64 def)
{
	usize len, i = 0;
	const char *v = mg_arg(key, &len);
	u64 r = 0;
	unsigned base = 10;

	if (!v)
		return def;
	if (len > 2 && v[0] == '0' && (v[1] == 'x' || v[1] == 'X')) {
		base = 16;
		i = 2;
	}
	if (i == len)
		goto bad;
	for (; i < len; i++) {
		char c = v[i];
		unsigned d;
		if (c >= '0' && c <= '9')
			d = (unsigned)(c - '0');
		else if (base == 16 && c >= 'a' && c <= 'f')
			d = (unsigned)(c - 'a' + 10);
		else if (base == 16 && c >= 'A' && c <= 'F')
			d = (unsigned)(c - 'A' + 10);
		else
			goto bad;
		if (r > (~0ULL - d) / base)
			goto bad;
		r = r * base + d;
	}
	return r;
bad:
	mg_error("bad number %s=%.*s", key, (int)len, v);
}

/* ---------------- ending the VM ---------------- */
struct idt_ptr {
	u16 limit;
	u64 base;
} __attribute__((packed));

/*
 * Triple fault: an IDT with limit 0 makes every exception undeliverable
 * (#UD -> #GP -> #DF -> shutdown, KVM_EXIT_SHUTDOWN).  ud2 raises the #UD;
 * on PVM hosts KVM's emulator injects it (checked: dmesg shows "triple
 * fault delivering vec=8"), unlike int3 / int n, which it cannot emulate.
 */
MG_NORETURN static void triple_fault(void)
{
	static const struct idt_ptr zero_idt = { 0, 0 };
	__asm__ volatile("cli\n\tlidt %0\n\tud2" : : "m"(zero_idt) : "memory");
	for (;;)
		__asm__ volatile("cli; hlt");
}

MG_NORETURN void mg_end(enum mg_end how)
{
	MB->state = 3;
	switch (how) {
	case MG_END_RESET:
		outb(0x64, 0xfe);	/* i8042: pulse the CPU reset line */
		/* No i8042 (QEMU microvm has none): fall back to a triple fault. */
		for (int i = 0; i < 1000; i++)
			cpu_relax();
		triple_fault();
	case MG_END_TRIPLE:
		triple_fault();
	case MG_END_HALT:
	default:
		for (;;)
			__asm__ volatile("cli; hlt");
	}
}

MG_NORETURN void mg_end_default(void)
{
	if (mg_arg_is("end", "halt"))
		mg_end(MG_END_HALT);
	if (mg_arg_is("end", "triple"))
		mg_end(MG_END_TRIPLE);
	mg_end(MG_END_RESET);
}

MG_NORETURN void mg_error(const char *fmt, ...)
{
	va_list ap;
	mg_puts("MG-ERROR ");
	va_start(ap, fmt);
	mg_vprintf(fmt, ap);
	va_end(ap);
	mg_putc('\n');
	mg_end_default();
}

/* ---------------- time ---------------- */
#define TSC_KHZ_MAX	10000000ULL	/* 10 GHz: an upper bound for "at least" delays */

void mg_delay_us_at_least(u64 us)
{
	u64 start = rdtsc(), cycles = us * (TSC_KHZ_MAX / 1000), now;
	do {
		cpu_relax();
		now = rdtsc();
	} while (now >= start && now - start < cycles);
}

#define PIT_HZ		1193182ULL
#define PIT_MS		10
#define PIT_LATCH	((PIT_HZ * PIT_MS + 500) / 1000)	/* 11932 */
#define PIT_POLL_MAX	1000000

/* PIT channel 2, mode 0, gated by port 0x61 bit 0; OUT2 read back in bit 5. */
static u64 calibrate_pit(void)
{
	u8 saved = inb(0x61);
	u64 t0, t1;
	u32 polls = 0;

	outb(0x61, (u8)((saved & ~0x02) | 0x01));	/* gate on, speaker off */
	outb(0x43, 0xb0);				/* ch2, lo/hi byte, mode 0, binary */
	outb(0x42, PIT_LATCH & 0xff);
	outb(0x42, PIT_LATCH >> 8);
	t0 = rdtsc();
	while (!(inb(0x61) & 0x20))
		if (++polls >= PIT_POLL_MAX)
			break;
	t1 = rdtsc();
	outb(0x61, saved);
	if (polls == 0 || polls >= PIT_POLL_MAX || t1 <= t0)
		return 0;	/* no PIT, or OUT2 stuck */
	return (t1 - t0) / PIT_MS;
}

static int plausible_khz(u64 khz)
{
	return khz >= 100000 && khz <= TSC_KHZ_MAX;	/* 100 MHz .. 10 GHz */
}

/* kvmclock (pvclock ABI): the host tells the TSC -> ns scale directly. */
struct pvclock_vcpu_time_info {
	u32 version;
	u32 pad0;
	u64 tsc_timestamp;
	u64 system_time;
	u32 tsc_to_system_mul;
	signed char tsc_shift;
	u8 flags;
	u8 pad[2];
};

#define MSR_KVM_SYSTEM_TIME		0x12
#define MSR_KVM_SYSTEM_TIME_NEW		0x4b564d01
#define KVM_FEATURE_CLOCKSOURCE		(1u << 0)
#define KVM_FEATURE_CLOCKSOURCE2	(1u << 3)

static struct pvclock_vcpu_time_info kvmclock __attribute__((aligned(64)));

static u64 tsc_khz_kvmclock(void)
{
	volatile struct pvclock_vcpu_time_info *pv = &kvmclock;
	u32 a, b, c, d, msr, version = 0, mul = 0;
	int shift = 0;

	cpuid(0x40000000, 0, &a, &b, &c, &d);
	if (b != 0x4b4d564b || c != 0x564b4d56 || d != 0x4d || a < 0x40000001)
		return 0;	/* not "KVMKVMKVM\0\0\0" */
	cpuid(0x40000001, 0, &a, &b, &c, &d);
	if (a & KVM_FEATURE_CLOCKSOURCE2)
		msr = MSR_KVM_SYSTEM_TIME_NEW;
	else if (a & KVM_FEATURE_CLOCKSOURCE)
		msr = MSR_KVM_SYSTEM_TIME;
	else
		return 0;

	memset((void *)&kvmclock, 0, sizeof(kvmclock));
	wrmsr(msr, (u64)(usize)&kvmclock | 1);
	for (u32 i = 0; i < 1000000; i++) {
		version = pv->version;
		if (version && !(version & 1)) {
			mul = pv->tsc_to_system_mul;
			shift = pv->tsc_shift;
			if (pv->version == version)
				break;
		}
		mul = 0;
		cpu_relax();
	}
	wrmsr(msr, 0);		/* leave no kvmclock page behind */
	if (!mul)
		return 0;
	u64 khz = (1000000ULL << 32) / mul;
	return shift < 0 ? khz << -shift : khz >> shift;
}

u64 mg_tsc_khz(const char **source)
{
	u32 a, b, c, d;
	u64 khz = mg_arg_u64("tsc_khz", 0);
	int force_pit = mg_arg_is("clock", "pit");

	if (khz) {
		*source = "cmdline";
		return khz;
	}
	if (!force_pit) {
		khz = tsc_khz_kvmclock();
		if (plausible_khz(khz)) {
			*source = "kvmclock";
			return khz;
		}
	}
	khz = calibrate_pit();
	if (plausible_khz(khz)) {
		*source = "pit";
		return khz;
	}
	cpuid(0, 0, &a, &b, &c, &d);
	if (a >= 0x15) {
		cpuid(0x15, 0, &a, &b, &c, &d);	/* TSC = crystal (ECX Hz) * EBX / EAX */
		if (a && b && c && plausible_khz((u64)c * b / a / 1000)) {
			*source = "cpuid15";
			return (u64)c * b / a / 1000;
		}
		cpuid(0, 0, &a, &b, &c, &d);
	}
	if (a >= 0x16) {
		cpuid(0x16, 0, &a, &b, &c, &d);	/* base frequency, MHz */
		if (plausible_khz((u64)(a & 0xffff) * 1000)) {
			*source = "cpuid16";
			return (u64)(a & 0xffff) * 1000;
		}
	}
	*source = "guess";
	return 1000000;
}

u32 mg_apic_id(void)
{
	u32 a, b, c, d;
	cpuid(1, 0, &a, &b, &c, &d);
	return b >> 24;
}

/* ---------------- C entry from entry.S ---------------- */
void mg_start(u32 boot, u64 info);

void mg_start(u32 boot, u64 info)
{
	const char *src = NULL;
	volatile char *dst = MB->cmdline;
	usize i = 0;

	MB->magic = MG_MAGIC_VALUE;
	MB->boot = boot;
	MB->boot_info = info;
	MB->state = 1;

	if (info && info < FOUR_GIB - 4096) {
		if (boot == MG_BOOT_PVH) {
			const struct hvm_start_info *si = (const void *)info;
			if (si->magic == HVM_START_MAGIC && si->cmdline_paddr < FOUR_GIB)
				src = (const char *)si->cmdline_paddr;
		} else {
			u32 p = *(const volatile u32 *)(info + ZP_CMD_LINE_PTR);
			src = (const char *)(u64)p;
		}
	}
	if (src)
		for (; i < MG_CMDLINE_MAX - 1 && src[i]; i++)
			dst[i] = src[i];
	dst[i] = 0;
	parse_cmdline((const char *)MB->cmdline);

	if (mg_arg_is("lsr", "0"))
		uart_poll = 0;

	main((const char *)MB->cmdline);
	mg_end_default();
}
