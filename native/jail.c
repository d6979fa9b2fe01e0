/*
 * jail.c - vmm_jail_enter: mount namespace, pivot_root into an empty
 * directory, rlimits, capabilities, uid/gid, no_new_privs (see jail.h).
 */
#define _GNU_SOURCE	/* unshare, setresuid, open_tree, move_mount */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <sched.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/capability.h>

#include "jail.h"

static int err(int r)
{
	return r < 0 ? -errno : 0;
}

static int set_limit(int resource, uint64_t value)
{
	struct rlimit rl = { .rlim_cur = value, .rlim_max = value };
	return err(setrlimit(resource, &rl));
}

/* No core files at all (they would hold guest RAM); the others when asked. */
static int set_limits(const struct vmm_jail *j)
{
	int r = set_limit(RLIMIT_CORE, 0);
	if (!r && j->nofile)
		r = set_limit(RLIMIT_NOFILE, j->nofile);
	if (!r && j->nproc)
		r = set_limit(RLIMIT_NPROC, j->nproc);
	return r;
}

/*
 * The new root.  The directory must be a mount's root for pivot_root, so
 * it is bind-mounted onto itself - but root_fd names it in the host's
 * namespace, and a mount call refuses a path of another namespace.  So:
 * cwd to it first (unshare carries cwd over to the new namespace's copy of
 * that mount), clone "." there with open_tree, attach the clone on ".",
 * and step into the clone (plain "." would stay under it: a lookup of "."
 * does not cross mounts).  pivot_root(".", ".") then stacks the old root
 * under the new one, and the detach takes it away.
 */
static int pivot_into(int root_fd)
{
	int tree = -1;
	int r = err(fchdir(root_fd));
	if (!r)
		r = err(unshare(CLONE_NEWNS));
	/* Nothing we mount or unmount propagates back to the host. */
	if (!r)
		r = err(mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL));
	if (!r) {
		tree = open_tree(AT_FDCWD, ".", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC);
		r = tree < 0 ? -errno : 0;
	}
	if (!r)
		r = err(move_mount(tree, "", AT_FDCWD, ".", MOVE_MOUNT_F_EMPTY_PATH));
	if (!r)
		r = err(fchdir(tree));
	if (!r)
		r = err((int)syscall(SYS_pivot_root, ".", "."));
	if (!r)
		r = err(umount2(".", MNT_DETACH));
	if (!r)
		r = err(chdir("/"));
	/* Nothing in the root may be written, run, or grant anything. */
	if (!r)
		r = err(mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID |
			      MS_NODEV | MS_NOEXEC, NULL));
	if (tree >= 0)
		close(tree);
	return r;
}

/* The whole bounding set, without reading cap_last_cap (a host path): the
 * kernel answers EINVAL past its last capability. */
static int drop_bounding_set(void)
{
	for (unsigned long cap = 0;; cap++) {
		if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0)
			continue;
		return errno == EINVAL && cap > 0 ? 0 : -errno;
	}
}

static int caps(int op, struct __user_cap_data_struct data[2])
{
	struct __user_cap_header_struct h = { .version = _LINUX_CAPABILITY_VERSION_3 };
	return err((int)syscall(op, &h, data));
}

/* setresuid away from root clears effective and permitted, not inheritable
 * (nor anything, under SECBIT_NO_SETUID_FIXUP): clear all three, then read
 * them back. */
static int clear_caps(void)
{
	struct __user_cap_data_struct d[2];
	memset(d, 0, sizeof(d));
	int r = caps(SYS_capset, d);
	if (!r)
		r = caps(SYS_capget, d);
	for (int i = 0; i < 2 && !r; i++)
		if (d[i].effective || d[i].permitted || d[i].inheritable)
			r = -EPERM;
	return r;
}

static int become(uint32_t uid, uint32_t gid)
{
	uid_t ruid, euid, suid;
	int r = err(setgroups(0, NULL));
	if (!r)
		r = err(setresgid(gid, gid, gid));
	if (!r)
		r = err(setresuid(uid, uid, uid));
	if (!r)
		r = err(getresuid(&ruid, &euid, &suid));
	if (!r && (ruid != uid || euid != uid || suid != uid))
		r = -EPERM;
	return r;
}

int vmm_jail_enter(const struct vmm_jail *j)
{
	/* Root is what the jail takes away: a cell never runs as it. */
	if (j->uid == 0 || j->gid == 0 || j->uid == (uint32_t)-1 || j->gid == (uint32_t)-1) {
		close(j->root_fd);
		return -EINVAL;
	}
	int r = set_limits(j);	/* raising NOFILE may need CAP_SYS_RESOURCE */
	if (!r)
		r = pivot_into(j->root_fd);
	close(j->root_fd);	/* a way back to the host tree (jail.h) */
	if (!r)
		r = drop_bounding_set();
	if (!r)
		r = err(prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0));
	if (!r)
		r = become(j->uid, j->gid);
	if (!r)
		r = clear_caps();
	if (!r)
		r = err(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0));
	/* After the uid change, which resets it to the fs.suid_dumpable sysctl. */
	if (!r)
		r = err(prctl(PR_SET_DUMPABLE, 0, 0, 0, 0));
	return r;
}
