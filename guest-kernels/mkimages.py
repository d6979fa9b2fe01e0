#!/usr/bin/env python3
"""Build vmmd's guest test images from Debian's busybox-static (Python 3 stdlib only).

usage: guest-kernels/mkimages.py [OUT_DIR]        (default: <repo>/build/guest)

  OUT_DIR/initramfs.cpio.gz  newc cpio, gzip level 0 (see write_initramfs): /init (guest-kernels/init.sh), /bin/busybox with
                             symlinks for the APPLETS below, /dev/console and /dev/null device nodes, empty
                             /proc /sys /tmp /root /etc.
  OUT_DIR/rootfs.ext4        the same userland as a 64 MiB ext4 image (mkfs.ext4 -d; no mount, no
                             loop device); init at /sbin/init and /init. Device nodes are added
                             with debugfs, so no mknod is needed.

Both are byte-for-byte reproducible for the same inputs (fixed timestamps, UUID and hash seed).
They are rebuilt only when an input changes (init.sh, /bin/busybox, this script, mke2fs's version):
calling this every time is cheap. Needs busybox-static and e2fsprogs.
"""

import gzip
import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BUSYBOX = "/bin/busybox"
INIT = os.path.join(HERE, "init.sh")
ROOTFS_MIB = 64
EPOCH = 1704067200  # 2024-01-01 00:00:00 UTC: every timestamp in the images
FS_UUID = "5f1d7b1e-7a3c-4c55-9d3e-766d6d64a001"  # fixed, for reproducible images
FS_HASH_SEED = "5f1d7b1e-7a3c-4c55-9d3e-766d6d64a002"
FS_LABEL = "vmmd-root"

DIRS = ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "root", "etc",
        "mnt"]
# Symlinks to busybox: the applets init.sh runs plus a few for vmmd_init=shell. Debian's static
# busybox runs any applet from its shell without a link; each cpio entry costs boot time on PVM.
APPLETS = ["sh", "mount", "umount", "sleep", "setsid", "cttyhack", "reboot", "poweroff", "cat",
           "echo", "ls", "mkdir", "ps", "dmesg", "ip", "ifconfig", "udhcpc", "sync"]
# (path, type, major, minor, mode)
DEVICES = [("dev/console", "c", 5, 1, 0o600), ("dev/null", "c", 1, 3, 0o666)]


def die(msg):
    print(f"mkimages: ERROR: {msg}", file=sys.stderr)
    sys.exit(1)


def run(cmd, **kw):
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)
    except FileNotFoundError:
        die(f"{cmd[0]} not found (apt-get install e2fsprogs busybox-static)")
    except subprocess.CalledProcessError as e:
        die(f"{' '.join(cmd)} failed (exit {e.returncode}):\n{e.stdout}{e.stderr}")


def applet_paths():
    """Paths (relative to /) of the APPLETS, where busybox --list-full puts them."""
    where = {os.path.basename(p): p for p in run([BUSYBOX, "--list-full"]).stdout.split()}
    missing = [a for a in APPLETS if a not in where]
    if missing:
        die(f"{BUSYBOX} lacks applets {missing}")
    return sorted(where[a] for a in APPLETS)


def tree():
    """The userland as a sorted list of (path, kind, mode, data) entries, shared by both images.

    kind: 'dir', 'file' (data = bytes), 'link' (data = target), 'chr' (data = (major, minor)).
    """
    with open(BUSYBOX, "rb") as f:
        busybox = f.read()
    with open(INIT, "rb") as f:
        init = f.read()
    entries = [(d, "dir", 0o755, None) for d in DIRS]
    entries[DIRS.index("tmp")] = ("tmp", "dir", 0o1777, None)
    entries[DIRS.index("root")] = ("root", "dir", 0o700, None)
    entries += [(p, "chr", mode, (ma, mi)) for p, _, ma, mi, mode in DEVICES]
    entries.append(("bin/busybox", "file", 0o755, busybox))
    entries.append(("init", "file", 0o755, init))
    entries.append(("sbin/init", "link", 0o777, "/init"))
    have = {e[0] for e in entries}
    for p in applet_paths():
        if p not in have:
            entries.append((p, "link", 0o777, "/bin/busybox"))
    entries.sort(key=lambda e: e[0])
    return entries


# ------------------------------------------------------------------ initramfs (newc cpio)

def cpio_newc(entries):
    buf = io.BytesIO()

    def put(name, mode, data=b"", nlink=1, rdev=(0, 0), ino=0):
        name_b = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, nlink, EPOCH, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0]
        buf.write(b"070701" + b"".join(b"%08X" % v for v in fields))
        buf.write(name_b)
        buf.write(b"\0" * (-(110 + len(name_b)) % 4))
        buf.write(data)
        buf.write(b"\0" * (-len(data) % 4))

    for ino, (path, kind, mode, data) in enumerate(entries, start=1):
        if kind == "dir":
            put(path, stat.S_IFDIR | mode, nlink=2, ino=ino)
        elif kind == "file":
            put(path, stat.S_IFREG | mode, data, ino=ino)
        elif kind == "link":
            put(path, stat.S_IFLNK | mode, data.encode(), ino=ino)
        elif kind == "chr":
            put(path, stat.S_IFCHR | mode, rdev=data, ino=ino)
    put("TRAILER!!!", 0, nlink=1)
    return buf.getvalue()


def write_initramfs(entries, dest):
    raw = cpio_newc(entries)
    tmp = dest + ".tmp"
    with open(tmp, "wb") as f:
        # gzip level 0 (stored blocks): still a gzip initramfs (RD_GZIP), but the kernel's
        # inflate is a plain copy. On PVM hosts, where guest kernel code is emulated, inflating
        # the level-9 image took ~165 s of guest time; on hardware either costs milliseconds.
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=0, mtime=0) as gz:
            gz.write(raw)
    os.replace(tmp, dest)


# ------------------------------------------------------------------ rootfs (ext4)

def write_rootfs(entries, dest):
    with tempfile.TemporaryDirectory(prefix="vmmd-rootfs-") as stage:
        for path, kind, mode, data in entries:
            full = os.path.join(stage, path)
            if kind == "dir":
                os.makedirs(full, exist_ok=True)
            elif kind == "file":
                with open(full, "wb") as f:
                    f.write(data)
            elif kind == "link":
                os.symlink(data, full)
            # device nodes: added with debugfs below (no mknod, no root needed)
            if kind in ("dir", "file"):
                os.chmod(full, mode)
        tmp = dest + ".tmp"
        if os.path.exists(tmp):
            os.unlink(tmp)
        with open(tmp, "wb") as f:
            f.truncate(ROOTFS_MIB << 20)
        env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(EPOCH), SOURCE_DATE_EPOCH=str(EPOCH))
        run(["mkfs.ext4", "-q", "-F", "-L", FS_LABEL, "-U", FS_UUID,
             "-E", f"hash_seed={FS_HASH_SEED},root_owner=0:0", "-d", stage, tmp], env=env)
        # debugfs: add the device nodes, then make owner and timestamps of every inode fixed
        # (root-owned whoever builds, reproducible).
        cmds = []
        for path, _, major, minor, mode in DEVICES:
            parent, name = os.path.split(path)
            cmds += [f"cd /{parent}", f"mknod {name} c {major} {minor}", "cd /"]
            cmds.append(f"set_inode_field /{path} mode 0{stat.S_IFCHR | mode:o}")
        for path in ["/"] + ["/" + e[0] for e in entries]:
            for field in ("uid", "gid"):
                cmds.append(f"set_inode_field {path} {field} 0")
            for field in ("atime", "mtime", "ctime", "crtime"):
                cmds.append(f"set_inode_field {path} {field} @{EPOCH}")
        with tempfile.NamedTemporaryFile("w", suffix=".debugfs") as script:
            script.write("\n".join(cmds) + "\n")
            script.flush()
            out = run(["debugfs", "-w", "-f", script.name, tmp], env=env)
        if "rror" in out.stderr.replace("debugfs ", ""):
            die(f"debugfs failed: {out.stderr}")
        run(["e2fsck", "-fn", tmp], env=env)
        os.replace(tmp, dest)


# ------------------------------------------------------------------ main

def inputs_digest():
    h = hashlib.sha256(b"vmmd guest images v3\n")
    for path in (__file__, INIT, BUSYBOX):
        with open(path, "rb") as f:
            h.update(path.encode() + b"\0" + hashlib.sha256(f.read()).digest())
    h.update(run(["mkfs.ext4", "-V"]).stderr.encode())
    return h.hexdigest()


def main(argv):
    if len(argv) > 1 and argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0
    out = os.path.abspath(argv[1]) if len(argv) > 1 else os.path.join(REPO, "build", "guest")
    if not os.path.isfile(BUSYBOX):
        die(f"{BUSYBOX} not found (apt-get install busybox-static)")
    if shutil.which("mkfs.ext4") is None or shutil.which("debugfs") is None:
        die("mkfs.ext4/debugfs not found (apt-get install e2fsprogs)")
    os.makedirs(out, exist_ok=True)
    initramfs = os.path.join(out, "initramfs.cpio.gz")
    rootfs = os.path.join(out, "rootfs.ext4")
    stamp = os.path.join(out, ".images.stamp")
    digest = inputs_digest()
    try:
        with open(stamp) as f:
            current = f.read().strip() == digest
    except OSError:
        current = False
    if current and os.path.isfile(initramfs) and os.path.isfile(rootfs):
        print(f"mkimages: {initramfs}, {rootfs} up to date")
        return 0
    if os.path.exists(stamp):
        os.unlink(stamp)
    entries = tree()
    write_initramfs(entries, initramfs)
    write_rootfs(entries, rootfs)
    with open(stamp + ".tmp", "w") as f:
        f.write(digest + "\n")
    os.replace(stamp + ".tmp", stamp)
    print(f"mkimages: wrote {initramfs} ({os.path.getsize(initramfs)} bytes), "
          f"{rootfs} ({ROOTFS_MIB} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
