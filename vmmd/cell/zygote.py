"""The zygote: forks cell workers in milliseconds.

The daemon forks the zygote first thing, while it is still one thread with
vmmd and the C core imported and nothing of the API running.  The zygote
stays single-threaded: it waits on its socket for "spawn" calls, forks a
child per call (which jails itself and becomes the cell's worker:
`_worker_main`), answers with the child's pid, reaps its children and
tells the daemon each one's exit status (a notice: a call to the daemon
with seq 0, method "exited", args [pid, wait status]).  It dies with the
daemon (PR_SET_PDEATHSIG), and its workers die with it.

A spawn passes three fds: the worker's end of its socketpair, the open
empty directory that becomes its root, and the write end of the pipe its
seccomp trap handler reports on.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import os
import select
import signal
import socket
import sys
import threading
from collections.abc import Callable

from vmmd._proto.vmmd.v1 import cell_pb2 as cpb
from vmmd.cell import wire
from vmmd.errors import NativeError
from vmmd.log import get_logger
from vmmd.record import Record

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


class WorkerJail(Record):
    """What a worker is made: who it runs as and its limits."""

    cell: str
    uid: int
    gid: int
    nofile: int = 4096
    test_hooks: bool = False


def _die_with_parent() -> None:
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Zygote:
    """The daemon's handle on its zygote: spawn() and exit notices."""

    def __init__(self, sock: socket.socket, pid: int,
                 on_exit: Callable[[int, int], None]) -> None:
        self._sock = sock
        self.pid = pid
        self._on_exit = on_exit
        self._lock = threading.Lock()  # one spawn at a time: replies come in order
        self._replies: list[tuple[cpb.CellFrame, list[int]]] = []
        self._cv = threading.Condition()
        self._seq = 0
        self._dead = False
        self._closed = False  # close() was called: the reader's end is expected
        self.log = get_logger(__name__)
        self._reader = threading.Thread(target=self._read, name="zygote", daemon=True)

    @classmethod
    def fork(cls, on_exit: Callable[[int, int], None], *, test_hooks: bool = False) -> Zygote:
        """Fork the zygote: call while the daemon has no other thread."""
        assert threading.active_count() == 1, "the zygote must be forked before any thread"
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (ours, theirs):
            s.set_inheritable(False)
        pid = os.fork()
        if pid == 0:  # the zygote
            code = 1
            try:
                ours.close()
                _die_with_parent()
                code = _zygote_main(theirs, test_hooks)
            finally:
                os._exit(code)
        theirs.close()
        z = cls(ours, pid, on_exit)
        z._reader.start()
        return z

    def spawn(self, jail: WorkerJail, sock_fd: int, root_fd: int, report_fd: int) -> int:
        """Fork a worker; its pid."""
        with self._lock:
            if self._dead:
                raise NativeError("spawn a cell worker: the zygote is gone", errno.ESRCH)
            self._seq += 1
            fds: list[int] = []
            args = [wire.encode(a, fds) for a in (jail.cell, jail.uid, jail.gid, jail.nofile,
                                                  wire.Fd(sock_fd), wire.Fd(root_fd),
                                                  wire.Fd(report_fd))]
            wire.send(self._sock, cpb.CellFrame(version=wire.CELL_PROTOCOL_VERSION, seq=self._seq,
                                                call=cpb.CellCall(method="spawn", args=args)), fds)
            with self._cv:
                if not self._cv.wait_for(lambda: self._replies or self._dead, timeout=10):
                    raise NativeError("spawn a cell worker: the zygote did not answer",
                                      errno.ETIMEDOUT)
                if not self._replies:
                    raise NativeError("spawn a cell worker: the zygote is gone", errno.ESRCH)
                frame, rfds = self._replies.pop(0)
        for fd in rfds:
            os.close(fd)
        r = frame.reply
        if r.errno:
            raise NativeError(f"spawn a cell worker: {r.error}", r.errno)
        return int(wire.decode(r.results[0], []))

    def _read(self) -> None:
        while True:
            try:
                frame, fds = wire.recv(self._sock)
            except (OSError, wire.ProtocolError) as e:
                if self._closed:  # our own close(): expected, not news
                    self.log.debug("zygote.closed")
                else:
                    self.log.error("zygote.lost", error=str(e))
                with self._cv:
                    self._dead = True
                    self._cv.notify_all()
                return
            if frame.WhichOneof("body") == "reply":
                with self._cv:
                    self._replies.append((frame, fds))
                    self._cv.notify_all()
            elif frame.call.method == "exited":
                pid, status = (wire.decode(a, []) for a in frame.call.args)
                try:
                    self._on_exit(pid, status)
                except Exception:
                    self.log.exception("zygote.exit_listener_failed")

    def close(self) -> None:
        """The zygote exits when its socket closes; its workers die with it."""
        self._closed = True
        self._sock.close()
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


# ---- inside the zygote ----
def _zygote_main(sock: socket.socket, test_hooks: bool) -> int:
    # Everything a worker runs is imported here, once: a worker's root is an
    # empty directory, where no module can be found.
    import vmmd.cell.worker  # noqa: F401, PLC0415
    import vmmd.native.jail  # noqa: F401, PLC0415
    import vmmd.native.seccomp  # noqa: F401, PLC0415
    if test_hooks:
        from vmmd.cell import testhooks  # noqa: F401, PLC0415 - before any jail: no host paths after
    # Objects from here on are never scanned by the GC (and so not written
    # to): a forked worker shares their pages with the zygote instead of
    # copying each one the first time a collection walks it.
    gc.freeze()
    devnull = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *a: None)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides; Ctrl-C reaches us too
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        try:
            ready = {fd for fd, _ in poller.poll()}
        except InterruptedError:
            ready = set()
        if wake_r in ready:
            while True:
                try:
                    os.read(wake_r, 512)
                except BlockingIOError:
                    break
        _reap(sock)
        if sock.fileno() in ready:
            try:
                frame, fds = wire.recv(sock)
            except (OSError, wire.ProtocolError):
                return 0  # the daemon is gone
            try:
                reply = _spawn(frame.call, fds, sock, devnull, test_hooks)
            except Exception as e:  # noqa: BLE001 - answered, the zygote goes on
                reply = cpb.CellReply(errno=errno.EINVAL, error=str(e)[:200])
            finally:
                for fd in fds:
                    os.close(fd)
            wire.send(sock, cpb.CellFrame(version=wire.CELL_PROTOCOL_VERSION, seq=frame.seq,
                                          reply=reply), [])


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        args = [wire.encode(pid, []), wire.encode(status, [])]
        wire.send(sock, cpb.CellFrame(version=wire.CELL_PROTOCOL_VERSION, seq=0,
                                      call=cpb.CellCall(method="exited", args=args)), [])


def _spawn(call: cpb.CellCall, fds: list[int], zsock: socket.socket, devnull: int,
           test_hooks: bool) -> cpb.CellReply:
    if call.method != "spawn":
        raise ValueError(f"no zygote method {call.method[:40]!r}")
    cell, uid, gid, nofile, sock_fd, root_fd, report_fd = (wire.decode(a, fds)
                                                           for a in call.args)
    jail = WorkerJail(cell, uid, gid, nofile, test_hooks)
    pid = os.fork()
    if pid == 0:
        code = 120
        try:
            zsock.close()
            code = _worker_main(jail, sock_fd.fd, root_fd.fd, report_fd.fd, devnull)
        except BaseException as e:  # noqa: BLE001 - whatever it was, the worker ends here
            try:
                print(f"vmmd cell {cell}: worker failed: {e!r}", file=sys.stderr)
            except Exception:  # noqa: BLE001
                pass
        finally:
            os._exit(code)
    return cpb.CellReply(results=[wire.encode(pid, [])])


def _worker_main(jail: WorkerJail, sock_fd: int, root_fd: int, report_fd: int,
                 devnull: int) -> int:
    """In the new child: jail, filter, serve."""
    from vmmd.cell.worker import Worker  # noqa: PLC0415 - imported by the zygote already
    from vmmd.native.jail import enter_jail  # noqa: PLC0415
    from vmmd.native.seccomp import install_seccomp  # noqa: PLC0415

    signal.set_wakeup_fd(-1)
    for s in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE):
        signal.signal(s, signal.SIG_DFL)
    _die_with_parent()
    os.setsid()
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    keep = {0, 1, 2, sock_fd, root_fd, report_fd}
    for fd in _open_fds():
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
    # The socket object first: making it asks getsockname(), which the filter refuses.
    sock = socket.socket(fileno=sock_fd)
    enter_jail(root_fd, jail.uid, jail.gid, nofile=jail.nofile)  # closes root_fd
    install_seccomp(report_fd)
    Worker(sock, test_hooks=jail.test_hooks).serve()
    return 0


def _open_fds() -> list[int]:
    """The fds open now (before the jail: /proc is still there)."""
    try:
        return [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(3, 1024))


def exit_cause(status: int) -> tuple[int | None, str]:
    """A wait status in words: (signal number or None, text)."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return sig, f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return sig, f"killed by signal {sig}"
    return None, f"exited with status {os.WEXITSTATUS(status)}"
