"""How the online server's processes and sockets run (grade/release/server.py): worker processes on one
listening socket, and responses sent in one write.

- :func:`supervise` binds the port once and runs N copies of a server command (worker processes),
  each handed the listening socket: the kernel gives each new connection to one of them. A worker
  that exits ends the whole server (the others are stopped, the exit status is passed on) so that
  the container's restart policy starts it afresh; SIGTERM/SIGINT stop every worker gracefully, and
  a supervisor that dies (even by SIGKILL) takes its workers with it (:func:`die_with_parent`).
  The workers share prometheus_client's multi-process folder, so that any of them can answer the
  metrics of all.
- :class:`OneWriteTransport` holds an HTTP response's head until its body is written and sends
  both in one write: one packet, and one wake-up of the waiting client, per response instead of two
  (on a virtual machine each wake-up is a costly exit to the host; benchmarks/README.md).
- :func:`available_cpus`: the cores this process may use (the container's CPU limit, else the
  affinity mask), the default number of workers.
- :class:`Coalescer` answers the calls that reach one event loop together with one call of a
  function over all of them (dynamic batching without a wait: a call alone is answered at once).

Nothing here knows about models: the server's logic lives in grade/release/serving.py.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from grade.core.errors import InputError

log = logging.getLogger("grade.core.http_server")

#: the environment variable that puts prometheus_client in its multi-process mode: a folder of metric
#: files every worker writes and any worker sums for ``GET /metrics``
METRICS_DIR_VAR = "PROMETHEUS_MULTIPROC_DIR"
#: how long a stopping worker may drain its connections before it is killed
STOP_GRACE_S = 30.0


def available_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """Cores this process may use: the cgroup (v2) CPU quota rounded up, when one is set (a
    container's CPU limit), else the CPU affinity mask."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path(cgroup_root, "cpu.max").read_text().split()
    except (OSError, ValueError):
        return cores
    if quota == "max":
        return cores
    return max(1, min(cores, math.ceil(int(quota) / int(period))))


def listening_socket(port: int, host: str = "0.0.0.0", backlog: int = 2048) -> socket.socket:
    """A TCP socket listening on ``host:port`` that child processes inherit (:class:`InputError` naming
    the port when it cannot be bound: in use, or not allowed)."""
    try:
        sock = socket.create_server((host, port), backlog=backlog)  # SO_REUSEADDR on POSIX
    except OSError as e:
        raise InputError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock


#: prctl's option that sends the calling process a signal when its parent dies (linux/prctl.h)
PR_SET_PDEATHSIG = 1


@functools.cache
def _prctl():
    """libc's prctl, or None where there is none (not Linux)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(parent_pid: int) -> None:
    """Run in a worker between fork and exec: SIGTERM to it when its supervisor ``parent_pid`` dies, however
    it dies (a SIGKILL too), so that no worker keeps serving a port nobody supervises; and exit at once if
    the supervisor died before this call."""
    prctl = _prctl()
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def supervise(command: Sequence[str], workers: int, port: int, fd_flag: str = "--listen-fd",
              ready_flag: str | None = None) -> int:
    """Run ``workers`` copies of ``command`` (argv) on one listening socket on ``port``, passed to each
    as ``fd_flag FD``; until SIGTERM/SIGINT (exit status 0) or until a worker exits (its status, or 1;
    the others are stopped first).

    With ``ready_flag``, the first worker is given ``ready_flag FD``, a pipe it writes to once it is
    ready to serve, and the others start after that: a start that fails (bad input, no model) fails in
    one worker, whose status is returned and whose message is the only one."""
    sock = listening_socket(port)
    env = dict(os.environ)
    metrics_dir = None
    if not env.get(METRICS_DIR_VAR):
        metrics_dir = tempfile.mkdtemp(prefix="grade-serve-metrics-")
        env[METRICS_DIR_VAR] = metrics_dir
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    argv = [*command, fd_flag, str(sock.fileno())]
    _prctl()  # looked up here, not between fork and exec
    procs: list[subprocess.Popen] = []

    def start(extra: Sequence[str] = (), fds: tuple[int, ...] = ()) -> subprocess.Popen:
        procs.append(subprocess.Popen([*argv, *extra], env=env, pass_fds=(sock.fileno(), *fds),
                                      preexec_fn=functools.partial(die_with_parent, os.getpid())))
        return procs[-1]

    status = 0
    try:
        if ready_flag:
            read_end, write_end = os.pipe()
            first = start([ready_flag, str(write_end)], (write_end,))
            os.close(write_end)
            ready = _wait_ready(read_end, first, stop)
            if not ready:
                return 0 if stop.is_set() else first.wait() or 1
        while len(procs) < workers:
            start()
        log.info("serving on port %d with %d worker processes (%s)", port, workers,
                 ", ".join(str(p.pid) for p in procs))
        while not stop.wait(0.5):
            ended = [p for p in procs if p.poll() is not None]
            if ended:
                status = ended[0].returncode or 1
                log.error("worker %d exited with status %s: stopping the server", ended[0].pid,
                          ended[0].returncode)
                break
    finally:
        _stop_all(procs)
        sock.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return status


def _wait_ready(read_end: int, proc: subprocess.Popen, stop: threading.Event) -> bool:
    """True once ``proc`` writes to the pipe ``read_end``; False when it exits first (or closes its end
    without writing) or on ``stop``."""
    import select

    try:
        while not stop.is_set():
            if select.select([read_end], [], [], 0.5)[0]:
                return os.read(read_end, 1) == b"1"
            if proc.poll() is not None:
                return False
        return False
    finally:
        os.close(read_end)


def signal_ready(fd: int | None) -> None:
    """In the first worker of :func:`supervise` (``ready_flag``): tell the supervisor it is ready."""
    if fd is not None:
        os.write(fd, b"1")
        os.close(fd)


def _stop_all(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to every worker still running (each drains its connections), SIGKILL after the grace."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class OneWriteTransport:
    """An asyncio transport that holds a written HTTP response head (``HTTP/1.1 NNN ...\\r\\n\\r\\n``,
    not an interim 1xx) and sends it with the next write, the body's: the ASGI server writes the
    head when the application starts its response and the body when it sends it, two writes that
    each wake the waiting client. A held head is written before anything else the connection does
    (close, end of file) and when its response completes (:func:`one_write_http_protocol`: a HEAD
    answer has no body); everything else is the wrapped transport's."""

    __slots__ = ("_transport", "_head")

    def __init__(self, transport) -> None:
        self._transport = transport
        self._head: bytes | None = None

    def write(self, data) -> None:
        if self._head is not None:
            data, self._head = self._head + data, None
        elif data[:9] == b"HTTP/1.1 " and data[9:10] != b"1" and data[-4:] == b"\r\n\r\n":
            self._head = bytes(data)
            return
        self._transport.write(data)

    def writelines(self, chunks) -> None:
        self.write(b"".join(chunks))

    def flush(self) -> None:
        """Write a held head now."""
        if self._head is not None:
            head, self._head = self._head, None
            self._transport.write(head)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


@functools.cache
def one_write_http_protocol():
    """uvicorn's httptools HTTP protocol on a :class:`OneWriteTransport` (imports uvicorn)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class OneWriteHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(OneWriteTransport(transport))

        def on_response_complete(self) -> None:
            # a response without a body (HEAD) writes nothing after its head: send the head now,
            # not when the kept-alive connection next writes or closes
            self.transport.flush()
            super().on_response_complete()

    return OneWriteHttpToolsProtocol


class Coalescer:
    """Calls that are ready in the same turn of the event loop, answered by one call of ``answer_all``.

    ``await submit(item)`` queues ``item`` and, for the first item of a turn, schedules one flush
    behind the tasks already ready to run: every request whose bytes arrived in the same turn has
    queued its item by then. The flush calls ``answer_all(items)`` (at most ``max_size`` units by
    ``size_of``, one item at least) and hands each caller its answer, or raises the answer when it is
    an exception. Nothing waits for a batch to fill: an idle server answers a lone call at once,
    and a busy one finds the calls that arrived while it was answering the previous group. That is
    where the gain is: the per-call cost of the model call (checks, transform, a TorchScript call)
    is paid once per group.
    """

    def __init__(self, answer_all: Callable[[list], list], max_size: int,
                 size_of: Callable[[object], int] = lambda item: 1) -> None:
        self.answer_all = answer_all
        self.max_size = max(1, max_size)
        self.size_of = size_of
        self._queued: list[tuple[object, asyncio.Future]] = []

    async def submit(self, item):
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        self._queued.append((item, answer))
        if len(self._queued) == 1:
            loop.call_soon(self._flush)
        return await answer

    def _flush(self) -> None:
        queued, self._queued = self._queued, []
        start = 0
        while start < len(queued):  # groups of at most max_size units, in arrival order
            end, size = start + 1, self.size_of(queued[start][0])
            while end < len(queued) and size + self.size_of(queued[end][0]) <= self.max_size:
                size += self.size_of(queued[end][0])
                end += 1
            self._answer(queued[start:end])
            start = end

    def _answer(self, group: list[tuple[object, asyncio.Future]]) -> None:
        try:
            answers = self.answer_all([item for item, _ in group])
        except Exception as e:  # a failure of the whole call: every caller of the group gets it
            answers = [e] * len(group)
        for (_, future), answer in zip(group, answers, strict=True):
            if future.done():  # its caller went away
                continue
            if isinstance(answer, BaseException):
                future.set_exception(answer)
            else:
                future.set_result(answer)
