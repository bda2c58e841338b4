"""The one place that calls setns(2).

`setns` moves only the calling thread, and python-iptables caches its table handles per process, so
netns work done from arbitrary threads corrupts silently (rules land in the wrong namespace). All
in-pod work therefore runs on one dedicated worker thread that enters the pod netns, runs the job and
always returns to the host netns. If it ever cannot return, the worker refuses all further work:
running host work inside a pod netns would be far worse than failing loudly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import errno
import fcntl
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


class NetnsError(OSError):
    """A path or fd is not a usable network namespace."""


class NetnsWorkerBroken(RuntimeError):
    """The worker could not return to the host netns and refuses work; the process must restart."""


def open_netns(path: str) -> int:
    """Open a netns file (e.g. /proc/<pid>/ns/net or /var/run/netns/x) and prove it is a netns."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetnsError(exc.errno, f"cannot open netns {path}: {exc.strerror}") from exc
    try:
        nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as exc:
        os.close(fd)
        raise NetnsError(exc.errno, f"{path} is not a namespace file: {exc.strerror}") from exc
    if nstype != CLONE_NEWNET:
        os.close(fd)
        raise NetnsError(errno.EINVAL, f"{path} is a namespace of type {nstype:#x}, not a network namespace")
    return fd


def netns_identity(fd: int) -> tuple[int, int]:
    """(st_dev, st_ino) of a namespace fd: equal pairs mean the same namespace."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def current_netns_identity() -> tuple[int, int]:
    """Identity of the calling thread's netns (thread-self, since setns is per thread)."""
    st = os.stat("/proc/thread-self/ns/net")
    return st.st_dev, st.st_ino


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"setns(fd={fd}, CLONE_NEWNET) failed: {os.strerror(err)}")


def join_main_thread_netns() -> None:
    """Move the calling thread into the netns of the process's main thread (`/proc/self` is the
    thread-group leader), which never leaves home in this agent. For helper threads: a thread
    starts in its creator's netns, and one started from a pod job would otherwise keep that pod's
    netns alive for as long as it lives."""
    fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd)
    finally:
        os.close(fd)


@dataclass
class _Job:
    netns_fd: int | None  # None = run in the host netns (serialises host-side libiptc use too)
    fn: Callable[[], Any]
    future: concurrent.futures.Future[Any]


_STOP = object()


class NetnsWorker:
    """One thread that runs jobs inside other network namespaces, one job at a time."""

    def __init__(self, name: str = "netns-worker") -> None:
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._broken: str | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._host_fd = -1
        self._host_identity: tuple[int, int] = (0, 0)
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            raise self._start_error

    @property
    def host_identity(self) -> tuple[int, int]:
        """Identity of the netns the worker returns to between jobs."""
        return self._host_identity

    @property
    def broken(self) -> str | None:
        """Why the worker refuses work, or None while healthy."""
        return self._broken

    def call(self, netns_fd: int, fn: Callable[[], T]) -> T:
        """Run `fn` inside `netns_fd` on the worker and wait for its result (any thread but the worker)."""
        return self._submit(netns_fd, fn).result()

    async def run(self, netns_fd: int, fn: Callable[[], T]) -> T:
        """Like `call`, but awaitable: the event loop keeps running while the worker is busy."""
        future: concurrent.futures.Future[T] = self._submit(netns_fd, fn)
        return await asyncio.wrap_future(future)

    def call_host(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the worker in the host netns; for host-side libiptc use, which shares its caches."""
        return self._submit(None, fn).result()

    async def run_host(self, fn: Callable[[], T]) -> T:
        future: concurrent.futures.Future[T] = self._submit(None, fn)
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Stop the thread after queued jobs finish; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self) -> NetnsWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _submit(self, netns_fd: int | None, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        if threading.current_thread() is self._thread:
            raise RuntimeError("NetnsWorker job submitted from the worker itself (would deadlock)")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._broken is not None:
                raise NetnsWorkerBroken(self._broken)
            if self._closed:
                raise RuntimeError("NetnsWorker is closed")
            self._queue.put(_Job(netns_fd, fn, future))
        return future

    def _main(self) -> None:
        try:
            self._host_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            self._host_identity = netns_identity(self._host_fd)
        except BaseException as exc:  # surfaced to the constructor
            self._start_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    break
                assert isinstance(item, _Job)
                if self._broken is not None:
                    item.future.set_exception(NetnsWorkerBroken(self._broken))
                    continue
                if item.future.set_running_or_notify_cancel():
                    self._run_job(item)
        finally:
            os.close(self._host_fd)

    def _run_job(self, job: _Job) -> None:
        try:
            if job.netns_fd is not None:
                _setns(job.netns_fd)  # on failure we never left: report and carry on
        except BaseException as exc:
            job.future.set_exception(exc)
            return
        try:
            result = job.fn()
        except BaseException as exc:
            outcome: tuple[bool, Any] = (False, exc)
        else:
            outcome = (True, result)
        finally:
            # Always, also after host jobs: a job that called setns itself must not leak its netns.
            try:
                self._return_home()
            except NetnsWorkerBroken as broken:
                outcome = (False, broken)
        ok, value = outcome
        if ok:
            job.future.set_result(value)
        else:
            job.future.set_exception(value)

    def _return_home(self) -> None:
        """Back to the host netns, proven by identity; failure poisons the worker for good."""
        try:
            _setns(self._host_fd)
            if current_netns_identity() != self._host_identity:
                raise NetnsError(errno.EIO, "thread is not in the host netns after setns")
        except BaseException as exc:
            with self._lock:
                self._broken = f"cannot return to the host netns: {exc}"
            raise NetnsWorkerBroken(self._broken) from exc
