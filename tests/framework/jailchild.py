"""A cell worker in miniature, for tests/native/test_jail.py: run as

    python -m tests.framework.jailchild STEP ROOT_DIR REPORT_FD [ARG]

from the repository root, by root, in a fresh (so single-threaded) process.
It opens what a broker would pass (/dev/kvm, the guest file, its own
/proc/self/status to read later), enters the jail in ROOT_DIR as JAIL_UID,
then, unless STEP is "jail-only-ptrace", installs the filter reporting to
REPORT_FD, and does STEP.  Findings go to stdout as one JSON object; a step
that the filter kills prints nothing after its "before" line.

The guest: 32-bit protected mode (the PVH boot state vmmd's loader makes)
writing GUEST_TEXT to the UART, then cli; hlt.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import socket
import sys
import time
from typing import Any

from vmmd.native import NativeVm, enter_jail, install_seccomp, testhooks
from vmmd.vm.boot.cpu import boot_cpu_state

JAIL_UID = JAIL_GID = 200123
GUEST_TEXT = b"JAIL-OK\n"
GUEST_ENTRY = 0x200000
RAM = 4 << 20
LIBC = ctypes.CDLL(None)  # before the jail: loading a library opens files
KEXEC_LOAD = 246  # x86-64; never on the allowlist


def guest_code() -> bytes:
    code = bytes([0x66, 0xBA, 0xF8, 0x03])  # mov dx, 0x3f8 (COM1 data)
    for c in GUEST_TEXT:
        code += bytes([0xB0, c, 0xEE])  # mov al, c; out dx, al
    return code + bytes([0xFA, 0xF4])  # cli; hlt


def errno_of(fn: Any) -> int:
    try:
        fn()
    except OSError as e:
        return e.errno or 0
    return 0


def run_guest(kvm_fd: int, guest_fd: int) -> dict[str, Any]:
    regs, writes = boot_cpu_state(GUEST_ENTRY, pvh=True)
    with NativeVm.from_kvm_fd(kvm_fd) as vm:
        vm.add_ram(0, RAM)
        for gpa, data in writes:
            vm.write(gpa, data)
        vm.load_file(GUEST_ENTRY, guest_fd, 0, os.fstat(guest_fd).st_size, ("guest",))
        vm.create_vcpus(1)
        vm.set_boot_regs(0, regs)
        vm.start()
        out, pos = b"", 0
        deadline = time.monotonic() + 20
        while GUEST_TEXT not in out and time.monotonic() < deadline:
            data, pos = vm.console_read(pos)
            out += data
            time.sleep(0.01)
        vm.stop()
        return {"console": out.decode(errors="replace"), "threads_after_stop": vm.thread_count()}


def main() -> None:
    step, root_dir, report_fd = sys.argv[1], sys.argv[2], int(sys.argv[3])
    arg = sys.argv[4] if len(sys.argv) > 4 else ""
    kvm_fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    guest_fd = os.open(arg, os.O_RDONLY | os.O_CLOEXEC) if step == "vm" else -1
    status_fd = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
    root_fd = os.open(root_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    found: dict[str, Any] = {}
    enter_jail(root_fd, JAIL_UID, JAIL_GID, nofile=256, nproc=64)
    # The jail alone (the filter refuses openat, so after it nothing is seen).
    found["listdir"] = os.listdir("/")
    found["jail_open_errno"] = errno_of(lambda: os.open("/etc/shadow", os.O_RDONLY))
    if step == "jail-only-ptrace":
        found["ptrace"] = testhooks.ptrace_attach(int(arg))
    else:
        install_seccomp(report_fd)
    print(json.dumps({"before": step}), flush=True)
    if step == "status":
        found["status"] = os.pread(status_fd, 8192, 0).decode()
        found["open_errno"] = errno_of(lambda: os.open("/etc/shadow", os.O_RDONLY))
        found["hook_open"] = testhooks.open_path("/etc/shadow", os.O_RDONLY)
        found["fstat_ok"] = os.fstat(kvm_fd).st_rdev != 0
    elif step == "vm":
        found.update(run_guest(kvm_fd, guest_fd))
    elif step == "execve":
        found["execve"] = testhooks.execve("/bin/true")
    elif step == "syscall":
        found["syscall"] = testhooks.raw_syscall(KEXEC_LOAD)
    elif step == "mmap-exec":
        found["mapped"] = len(mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC))
    elif step == "fork":
        found["forked"] = os.fork()
    elif step == "unix-socket":  # virtio-vsock's host sockets: AF_UNIX only
        # libc's socket(), as the C core calls it (Python's socket object
        # also asks getsockname, which the worker never needs)
        found["unix"] = LIBC.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0) >= 0
    elif step == "inet-socket":
        found["inet"] = LIBC.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
    elif step == "ptrace":
        found["ptrace"] = testhooks.ptrace_attach(int(arg))
    print(json.dumps(found), flush=True)


if __name__ == "__main__":
    main()
