/*
 * seccomp.h - a cell worker's system call filter (seccomp.c), installed
 * after the jail (jail.h) and before the worker serves anything.
 *
 * The list is native/seccomp_allow.h, one reviewed line a call.  libseccomp
 * builds the BPF: it resolves names to this architecture's numbers, kills
 * calls of any other ABI (x32, i386), and orders the argument checks, which
 * hand-written BPF gets wrong easily.  The filter goes on every thread at
 * once (TSYNC) with no_new_privs; later threads inherit it.
 *
 * A call off the list traps: SIGSYS on the calling thread, whose handler
 * writes a struct vmm_seccomp_report (vmmcore.h) to the report fd - a pipe
 * the broker reads - and ends the process with status 128 + SIGSYS = 159.
 * A compromised worker could install its own SIGSYS handler and go on, but
 * the refused call never ran: the trap is the filter's answer, the report
 * only a courtesy to the broker.
 */
#ifndef VMM_SECCOMP_H
#define VMM_SECCOMP_H
#include "vmmcore.h"

#endif
