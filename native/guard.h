/*
 * guard.h - survive SIGBUS from guest RAM whose backing file shrank.
 *
 * A restored VM's RAM is its snapshot's memory file mapped MAP_PRIVATE.  If
 * someone truncates that file, every page past the new end is gone, and the
 * next access to one raises SIGBUS in whichever thread made it.  Code that
 * touches guest RAM runs inside a guard; a SIGBUS at an address inside the
 * guard's guest RAM jumps back to where the guard was entered, and the
 * caller fails that one VM instead of the whole process dying:
 *
 *	struct vmm_guard g;
 *	if (VMM_GUARD_ENTER(&g, mem) == 0)
 *		... touch guest RAM ...
 *	else
 *		... g.fault_addr vanished: stop this VM ...
 *	vmm_guard_leave(&g);
 *
 * Any other SIGBUS goes on to the handler that was there before ours (Python's
 * faulthandler, say) or gets the default action: a bug still kills the process.
 *
 * Process-wide state, the one exception to the core's "no globals": a signal
 * handler is per process, not per VM.  It is installed once, by vmm_mem_new(),
 * so before any guest RAM exists; a handler installed after it must chain to
 * it.  Each thread keeps a pointer to its innermost guard (initial-exec TLS:
 * a plain %fs load, safe in a signal handler, unlike __tls_get_addr).
 *
 * Cost: enter is three stores and sigsetjmp without the signal mask (no
 * system call); leave is one store.
 *
 * Rules for the code between enter and leave: enter and leave in one
 * function (the jump needs sigsetjmp's frame alive); locals changed in there
 * and read after a fault must be volatile; take no lock and allocate nothing
 * in there that the fault path does not release - the jump skips the rest.
 */
#ifndef VMM_GUARD_H
#define VMM_GUARD_H
#include <setjmp.h>
#include <signal.h>
#include <sys/uio.h>

#include "memory.h"

struct vmm_guard {
	sigjmp_buf jb;
	const struct vmm_mem *mem;	/* SIGBUS inside its regions jumps here */
	struct vmm_guard *prev;		/* the enclosing guard of this thread */
	void *fault_addr;		/* set by the handler before the jump */
};

extern __thread struct vmm_guard *vmm_guard_top __attribute__((tls_model("initial-exec")));

/* Once per process (pthread_once): the SIGBUS handler, chaining to the one before. */
void vmm_guard_init(void);

static inline void vmm_guard_push(struct vmm_guard *g, const struct vmm_mem *mem)
{
	g->mem = mem;
	g->fault_addr = NULL;
	g->prev = vmm_guard_top;
	vmm_guard_top = g;
}

/* 0 on entry; nonzero when coming back from a fault (the guard is then
 * already popped and g->fault_addr says where). */
#define VMM_GUARD_ENTER(g, m) (vmm_guard_push((g), (m)), sigsetjmp((g)->jb, 0))

static inline void vmm_guard_leave(struct vmm_guard *g)
{
	/* No access to guest RAM may move below this point. */
	__atomic_signal_fence(__ATOMIC_SEQ_CST);
	vmm_guard_top = g->prev;
}

/* A system call on guest buffers failed with EFAULT (the kernel does not
 * raise SIGBUS for its own accesses): touch each page of iov[0..n), so a
 * vanished one faults here, inside the caller's guard.  Returns if none did. */
void vmm_guard_probe(const struct iovec *iov, int n);

/* For the core's threads: every signal (they belong to Python's main thread)
 * except the synchronous fault signals (and SIGSYS, seccomp's trap) - a
 * fault while its signal is blocked kills the process without running any
 * handler, ours included. */
void vmm_guard_thread_sigset(sigset_t *set);

#endif
