/*
 * seccomp_allow.h - THE list of system calls a jailed cell worker may make
 * (seccomp.c).  Review every change to it: a line here is kernel surface a
 * hostile guest that broke the VMM can reach.  Anything not listed traps
 * (SIGSYS: the worker reports the call to the broker and exits 159).
 *
 * Measured with strace -f on the KVM tier (boot, pause, snapshot, restore,
 * virtio-blk and -net micro-guests), keeping only what a worker does once
 * Python has imported everything and the broker has passed every fd: no
 * paths are opened, no processes made, no sockets created but virtio-vsock's
 * Unix stream sockets (connected relative to a directory fd the broker
 * passed; the jail has no other directory to reach).
 *
 * One line a call: VMM_SYSCALL(name, rule, who needs it and why).  Rules:
 *   ANY		any arguments
 *   WHEN(a, m, v)	argument a satisfies (a & m) == v; a call may have
 *			several WHEN lines (any one of them allows it)
 *   SELF(a)		argument a is this process's pid (fixed: no fork)
 *   REFUSE(e)		fails with errno e without running - for calls the
 *			Python runtime makes on its own and copes with
 *			failing; not counted as allowed
 *   REFUSE_WHEN(a, m, v, e)  the same when (a & m) == v; a call that has
 *			WHEN lines needs this form (libseccomp lets an
 *			unconditional rule win over conditional ones)
 * The filter sees registers only, never memory: path strings and clone3's
 * struct cannot be checked, which is why the jail (jail.c), not this list,
 * keeps paths harmless.
 */

/* ---- fds the broker passed: disks, taps, sockets, eventfds, pipes ---- */
VMM_SYSCALL(read, ANY, "Python I/O; eventfd and timerfd reads (events, console, I/O thread)")
VMM_SYSCALL(write, ANY, "Python I/O; console out_fd; eventfd kicks; the SIGSYS report")
VMM_SYSCALL(readv, ANY, "virtio-net: a frame from the tap into a guest chain")
VMM_SYSCALL(writev, ANY, "virtio-net: a guest chain to the tap")
VMM_SYSCALL(preadv, ANY, "virtio-blk reads")
VMM_SYSCALL(pwritev, ANY, "virtio-blk writes")
VMM_SYSCALL(pread64, ANY, "vmm_mem_load_fd: kernel and initrd into guest RAM")
VMM_SYSCALL(pwrite64, ANY, "vmm_vm_write_memory: snapshot memory file")
VMM_SYSCALL(lseek, ANY, "vmm_mem_load_fd SEEK_DATA/SEEK_HOLE; Python file objects")
VMM_SYSCALL(fdatasync, ANY, "virtio-blk FLUSH")
VMM_SYSCALL(fsync, ANY, "snapshot writer: the memory and state fds it was passed")
VMM_SYSCALL(ftruncate, ANY, "snapshot writer: pre-size the memory file (holes for zero pages)")
VMM_SYSCALL(close, ANY, "everyone")
VMM_SYSCALL(fcntl, ANY, "vmm_vm_create_fd F_DUPFD_CLOEXEC; Python O_NONBLOCK, FD_CLOEXEC")
VMM_SYSCALL(dup, ANY, "Python os.dup (devices keep their own duplicates via fcntl)")
VMM_SYSCALL(dup3, ANY, "Python os.dup2(inheritable=False)")
/* glibc's fstat is newfstatat(fd, "", AT_EMPTY_PATH).  A path stat comes
 * from Python's linecache formatting a traceback: ENOENT, not a dead worker. */
VMM_SYSCALL(newfstatat, WHEN(3, AT_EMPTY_PATH, AT_EMPTY_PATH), "Python fstat (fd only)")
VMM_SYSCALL(newfstatat, REFUSE_WHEN(3, AT_EMPTY_PATH, 0, ENOENT),
	    "Python linecache stat()s source paths: none here")
/* The worker opens nothing; Python tries source files for tracebacks. */
VMM_SYSCALL(openat, REFUSE(EACCES), "Python traceback source lines: refused, never run")

/* ---- ioctl: KVM's own type, and the few others the core and Python use ---- */
VMM_SYSCALL(ioctl, WHEN(1, 0xff00, 0xae00), "every KVM ioctl (type 0xAE: /dev/kvm, VM, vCPU fds)")
VMM_SYSCALL(ioctl, WHEN(1, 0xffffffff, TUNSETOFFLOAD), "virtio-net: offloads the guest accepted")
VMM_SYSCALL(ioctl, WHEN(1, 0xffffffff, TCGETS), "Python isatty() when wrapping an fd in a file")
VMM_SYSCALL(ioctl, WHEN(1, 0xffffffff, FIONBIO), "Python socket setblocking()/settimeout()")

/* ---- memory ---- */
VMM_SYSCALL(mmap, WHEN(2, PROT_EXEC, 0), "guest RAM, kvm_run, malloc, thread stacks; never executable")
VMM_SYSCALL(mprotect, WHEN(2, PROT_EXEC, 0), "guest RAM inside its guard pages; glibc stack guards")
VMM_SYSCALL(munmap, ANY, "teardown of RAM and kvm_run; malloc")
VMM_SYSCALL(mremap, ANY, "glibc realloc of large blocks (Python buffers)")
VMM_SYSCALL(madvise, ANY, "glibc: freed thread stacks and malloc arenas")
VMM_SYSCALL(brk, ANY, "glibc malloc")

/* ---- threads: vCPUs, the I/O thread, Python's ---- */
/* glibc tries clone3 first and falls back to clone on ENOSYS: clone's flags
 * are a register the filter can check, so only threads, never processes. */
VMM_SYSCALL(clone3, REFUSE(ENOSYS), "glibc pthread_create: fall back to clone")
VMM_SYSCALL(clone, WHEN(0, CLONE_THREAD, CLONE_THREAD), "pthread_create: threads only, no fork")
VMM_SYSCALL(set_robust_list, ANY, "glibc: every new thread")
VMM_SYSCALL(rseq, ANY, "glibc: every new thread")
VMM_SYSCALL(futex, ANY, "mutexes, condition variables, joins; the GIL")
VMM_SYSCALL(exit, ANY, "a thread ends")
VMM_SYSCALL(exit_group, ANY, "the worker ends; the SIGSYS handler")

/* ---- signals ---- */
VMM_SYSCALL(rt_sigaction, ANY, "kick, SIGBUS guard and SIGSYS handlers; Python's signal module")
VMM_SYSCALL(rt_sigprocmask, ANY, "core threads block process signals; glibc")
VMM_SYSCALL(rt_sigreturn, ANY, "returning from any handler (the vCPU kick)")
VMM_SYSCALL(restart_syscall, ANY, "the kernel restarts a sleep or poll after a stop signal")
VMM_SYSCALL(tgkill, SELF(0), "pthread_kill: the vCPU kick; raise(): only this process")
VMM_SYSCALL(getpid, ANY, "glibc pthread_kill, raise")
VMM_SYSCALL(prctl, WHEN(0, 0xffffffff, PR_SET_NAME), "a thread names itself (vcpu<N>, vmio)")
VMM_SYSCALL(gettid, ANY, "glibc raise; Python threading")

/* ---- waiting and time ---- */
VMM_SYSCALL(poll, ANY, "Python: socket timeouts, select.poll on the broker socket")
VMM_SYSCALL(epoll_create1, ANY, "the I/O thread's epoll")
VMM_SYSCALL(epoll_ctl, ANY, "the I/O thread: queues, taps, timers")
VMM_SYSCALL(epoll_wait, ANY, "the I/O thread's loop; Python selectors")
VMM_SYSCALL(eventfd2, ANY, "events, console notify, irqfds, ioeventfds, the I/O wake fd")
VMM_SYSCALL(timerfd_create, ANY, "console flush timer, halt watchdog")
VMM_SYSCALL(timerfd_settime, ANY, "console flush timer, halt watchdog")
VMM_SYSCALL(clock_gettime, ANY,
	    "pause deadlines, event times, host realtime at kvmclock (a syscall without the vDSO)")
VMM_SYSCALL(clock_nanosleep, ANY, "Python time.sleep")
VMM_SYSCALL(getrandom, ANY,
	    "Python os.urandom, random, hash seeds; virtio-rng: guest requests, GRND_NONBLOCK")

/* ---- the broker socket (connected before the jail; fds come as SCM_RIGHTS) ---- */
VMM_SYSCALL(recvmsg, ANY, "requests and passed fds from the broker")
VMM_SYSCALL(sendmsg, ANY, "replies to the broker")
VMM_SYSCALL(recvfrom, ANY, "Python socket.recv")
VMM_SYSCALL(sendto, ANY, "Python socket.send")

/* ---- virtio-vsock (virtio_vsock.c): host sockets of the guest's connections ---- */
VMM_SYSCALL(accept4, ANY, "vsock: host clients on the listener the broker bound")
VMM_SYSCALL(socket, WHEN(0, 0xffffffff, AF_UNIX), "vsock: a guest connect's Unix socket (no other family)")
VMM_SYSCALL(connect, ANY, "vsock: a guest connect to <uds>_<port>, a name relative to the cwd")
VMM_SYSCALL(unshare, WHEN(0, 0xffffffff, CLONE_FS), "vsock: the I/O thread's own cwd (nothing else unshared)")
VMM_SYSCALL(fchdir, ANY, "vsock: the I/O thread's cwd to the uds directory fd the broker passed")
VMM_SYSCALL(shutdown, ANY, "vsock: the guest's SHUTDOWN passed on to the host socket")
