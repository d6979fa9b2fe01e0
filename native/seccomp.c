/*
 * seccomp.c - vmm_seccomp_install: the allowlist of seccomp_allow.h as a
 * libseccomp filter, and the SIGSYS handler that reports a refused call
 * (see seccomp.h).
 */
#define _GNU_SOURCE	/* si_syscall, si_call_addr */
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <seccomp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/if_tun.h>

#include "seccomp.h"

_Static_assert(VMM_SECCOMP_EXIT == 128 + SIGSYS, "the exit status says SIGSYS");

enum rule_kind { RULE_ANY, RULE_WHEN, RULE_SELF };

struct rule {
	const char *name;
	int nr;
	enum rule_kind kind;
	unsigned arg;
	uint64_t mask, value;
	int err;	/* nonzero: refused with this errno, not allowed */
};

#define ANY .kind = RULE_ANY
#define WHEN(a, m, v) .kind = RULE_WHEN, .arg = (a), .mask = (m), .value = (v)
#define SELF(a) .kind = RULE_SELF, .arg = (a)
#define REFUSE(e) .kind = RULE_ANY, .err = (e)
#define REFUSE_WHEN(a, m, v, e) WHEN(a, m, v), .err = (e)
#define VMM_SYSCALL(call, rule, why) { .name = #call, .nr = SCMP_SYS(call), rule },
static const struct rule rules[] = {
#include "seccomp_allow.h"
};
#undef VMM_SYSCALL

#define NRULES ((int)(sizeof(rules) / sizeof(rules[0])))

/* The report fd, for the SIGSYS handler: a handler gets no context of
 * ours, so this one value is process-wide (set once, before the filter). */
static int report_fd = -1;

/* Raw system calls only (both are on the list), nothing that allocates or
 * locks: the trap can land anywhere, inside malloc included. */
static void on_sigsys(int sig, siginfo_t *si, void *uc)
{
	(void)sig;
	(void)uc;
	struct vmm_seccomp_report rep = {
		.magic = VMM_SECCOMP_MAGIC, .syscall_nr = si->si_syscall,
		.ip = (uint64_t)(uintptr_t)si->si_call_addr,
	};
	syscall(SYS_write, report_fd, &rep, sizeof(rep));
	syscall(SYS_exit_group, VMM_SECCOMP_EXIT);	/* 128 + SIGSYS */
}

/* libseccomp lets an unconditional rule win over a call's conditional
 * ones, whatever its action: a call with an allowed and a refused case
 * needs a condition on each (REFUSE_WHEN). */
static int add_rule(scmp_filter_ctx ctx, const struct rule *r)
{
	uint32_t action = r->err ? SCMP_ACT_ERRNO((uint32_t)r->err) : SCMP_ACT_ALLOW;
	struct scmp_arg_cmp cmp;
	switch (r->kind) {
	case RULE_ANY:
		return seccomp_rule_add(ctx, action, r->nr, 0);
	case RULE_WHEN:
		cmp = (struct scmp_arg_cmp)SCMP_CMP(r->arg, SCMP_CMP_MASKED_EQ, r->mask, r->value);
		return seccomp_rule_add_array(ctx, action, r->nr, 1, &cmp);
	case RULE_SELF:
		/* No fork is allowed, so the pid cannot change under the filter. */
		cmp = (struct scmp_arg_cmp)SCMP_CMP(r->arg, SCMP_CMP_EQ, (uint64_t)getpid());
		return seccomp_rule_add_array(ctx, action, r->nr, 1, &cmp);
	}
	return -EINVAL;
}

static int build(scmp_filter_ctx ctx)
{
	/* Other ABIs' calls (i386 int 0x80, x32) die outright: none is listed. */
	int r = seccomp_attr_set(ctx, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS);
	if (!r)
		r = seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 1);
	if (!r)
		r = seccomp_attr_set(ctx, SCMP_FLTATR_CTL_TSYNC, 1);
	for (int i = 0; i < NRULES && !r; i++)
		r = add_rule(ctx, &rules[i]);
	return r;
}

int vmm_seccomp_install(int report_fd_arg)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_sigsys;
	sa.sa_flags = SA_SIGINFO;
	sigfillset(&sa.sa_mask);	/* nothing else runs in the way of the exit */
	report_fd = report_fd_arg;
	/* Before the filter: a trap with no handler would kill us unreported. */
	if (sigaction(SIGSYS, &sa, NULL) < 0)
		return -errno;
	scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_TRAP);
	if (!ctx)
		return -ENOMEM;
	int r = build(ctx);
	if (!r)
		r = seccomp_load(ctx);	/* a positive thread id: TSYNC failed there */
	seccomp_release(ctx);
	return r > 0 ? -EAGAIN : r;
}

int vmm_seccomp_allowlist(const char **names, int max)
{
	const char *prev = NULL;
	int n = 0;
	for (int i = 0; i < NRULES; i++) {
		/* Refused calls are not allowed ones; a call's lines are adjacent. */
		if (rules[i].err || (prev && !strcmp(prev, rules[i].name)))
			continue;
		prev = rules[i].name;
		if (n < max)
			names[n] = prev;
		n++;
	}
	return n;
}

int vmm_seccomp_syscall_name(int nr, char *buf, uint64_t len)
{
	char *name = seccomp_syscall_resolve_num_arch(SCMP_ARCH_NATIVE, nr);
	if (!name)
		return -ENOENT;
	size_t n = strlen(name);
	int r = n < len ? (int)n : -ENAMETOOLONG;
	if (r >= 0)
		memcpy(buf, name, n + 1);
	free(name);
	return r;
}
