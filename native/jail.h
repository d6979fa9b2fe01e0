/*
 * jail.h - a cell's jail: what a freshly forked worker does to itself,
 * while still root and single-threaded, before it touches a guest.
 *
 * vmm_jail_enter (declared with struct vmm_jail in vmmcore.h) gives the
 * process a mount namespace whose only content is an empty, read-only,
 * noexec directory the broker made for the cell; no capabilities, not even
 * in the bounding set; the cell's own uid and gid, no supplementary groups;
 * no_new_privs; not dumpable (a same-uid process cannot ptrace it, and no
 * core file holds guest RAM); RLIMIT_CORE 0 always, RLIMIT_NOFILE and
 * RLIMIT_NPROC as asked.  Each step is checked; the first failure is
 * returned as -errno and the process must then exit: it is half jailed.
 *
 * Host fds stay open across it: the broker's passed fds (/dev/kvm, disks,
 * taps) are the point.  A directory fd from outside the new root would be
 * a way back out (openat(fd, "..") walks the host tree), so root_fd is
 * closed here, and the caller must hold no other one.
 */
#ifndef VMM_JAIL_H
#define VMM_JAIL_H
#include "vmmcore.h"

#endif
