/*
 * guard.c - the SIGBUS handler behind vmm_guard (see guard.h).
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include "guard.h"

__thread struct vmm_guard *vmm_guard_top __attribute__((tls_model("initial-exec")));

static pthread_once_t once = PTHREAD_ONCE_INIT;
static struct sigaction previous;	/* SIGBUS's handler before ours */

static int holds(const struct vmm_mem *mem, const void *addr)
{
	const uint8_t *p = addr;
	for (int i = 0; i < mem->n; i++)
		if (p >= mem->r[i].hva && p < mem->r[i].hva + mem->r[i].size)
			return 1;
	return 0;
}

/* Not ours: what would have happened without us. */
static void chain(int sig, siginfo_t *si, void *uc)
{
	if (previous.sa_flags & SA_SIGINFO) {
		previous.sa_sigaction(sig, si, uc);
		return;
	}
	if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
		previous.sa_handler(sig);
		return;
	}
	if (previous.sa_handler == SIG_IGN && si->si_code <= 0)
		return;	/* a SIGBUS someone sent, and ignored before us */
	/* The default action: die of it (with a core where enabled).  A fault
	 * happens again when we return, now fatally; a sent signal is re-sent. */
	struct sigaction dfl;
	memset(&dfl, 0, sizeof(dfl));
	dfl.sa_handler = SIG_DFL;
	sigaction(sig, &dfl, NULL);
	if (si->si_code <= 0)
		raise(sig);
}

/* Runs on the faulting thread.  BUS_ADRERR is a page past the end of its
 * file; other codes (hardware memory errors, alignment) are not ours. */
static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
	if (si->si_code == BUS_ADRERR) {
		for (struct vmm_guard *g = vmm_guard_top; g; g = g->prev) {
			if (!holds(g->mem, si->si_addr))
				continue;
			g->fault_addr = si->si_addr;
			vmm_guard_top = g->prev;	/* inner guards die with their frames */
			siglongjmp(g->jb, 1);
		}
	}
	chain(sig, si, uc);
}

static void install(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_sigbus;
	/* NODEFER and an empty mask: the jump does not restore the signal mask
	 * (sigsetjmp(jb, 0): no system call per guard), so the handler must
	 * block nothing, or SIGBUS would stay blocked and the next one kill us.
	 * ONSTACK: on the thread's alternate stack if it has one. */
	sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGBUS, &sa, &previous);
}

void vmm_guard_init(void)
{
	pthread_once(&once, install);
}

void vmm_guard_probe(const struct iovec *iov, int n)
{
	for (int i = 0; i < n; i++) {
		const volatile uint8_t *p = iov[i].iov_base;
		uint64_t len = iov[i].iov_len;
		if (!len)
			continue;
		/* The first byte, then the first byte of each following page. */
		uint64_t step = 4096 - ((uintptr_t)p & 4095);
		(void)p[0];
		for (uint64_t off = step; off < len; off += 4096)
			(void)p[off];
	}
}

void vmm_guard_thread_sigset(sigset_t *set)
{
	sigfillset(set);
	sigdelset(set, SIGBUS);
	sigdelset(set, SIGSEGV);
	sigdelset(set, SIGFPE);
	sigdelset(set, SIGILL);
	/* seccomp's trap (seccomp.c): blocked, the kernel would reset its
	 * handler to the default and kill the process with no report. */
	sigdelset(set, SIGSYS);
}
