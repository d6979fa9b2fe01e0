/*
 * testhooks.c - see testhooks.h.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testhooks.h"

int vmm_test_open(const char *path, int flags)
{
	int fd = open(path, flags | O_CLOEXEC);
	return fd < 0 ? -errno : fd;
}

int vmm_test_execve(const char *path)
{
	char *const argv[] = { (char *)path, NULL };
	char *const envp[] = { NULL };
	execve(path, argv, envp);
	return -errno;
}

int vmm_test_ptrace_attach(int pid)
{
	if (ptrace(PTRACE_ATTACH, pid, NULL, NULL) < 0)
		return -errno;
	/* In: leave the tracee as it was. */
	waitpid(pid, NULL, __WALL);
	ptrace(PTRACE_DETACH, pid, NULL, NULL);
	return 0;
}

long vmm_test_syscall(long nr)
{
	long r = syscall(nr, 0, 0, 0, 0, 0, 0);
	return r < 0 ? -errno : r;
}
