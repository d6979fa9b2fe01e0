/*
 * testhooks.h - escape attempts for the cell tests (tests/native/test_jail.py),
 * built only into test builds as vmmd.native._testhooks (build.py here; the
 * Makefile's test target), never into the core: they do what a compromised
 * worker would try, from C, so the test sees the jail and the filter answer
 * the very system call.  Each returns the call's result or -errno.  Also
 * the module's cdef: plain declarations only.
 */
int vmm_test_open(const char *path, int flags);
int vmm_test_execve(const char *path);	/* returns only on failure */
int vmm_test_ptrace_attach(int pid);	/* detaches again if it got in */
long vmm_test_syscall(long nr);		/* nr with all-zero arguments */
