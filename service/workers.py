"""Several server processes on one port: a supervisor and its workers (``tta-serve serve --workers N``).

One process shares the GIL between the HTTP event loop and the model threads; N processes use N
cores. Each worker binds the same host:port with ``SO_REUSEPORT`` (the kernel spreads connections
over them) and serves the full app. Worker 0 leads every adapting model, the others serve its
published weights (``service/local_replication.py``, through a run directory the supervisor creates,
on /dev/shm where there is one).

The supervisor (the parent process) checks the configuration and the port before any worker starts,
so a bad one is reported once; starts worker 0 first (it trains or loads a cold model cache alone, and
a model that cannot load stops start-up after one message) and the others once it serves; restarts a
worker that dies, unless workers die more than ``MAX_RESTARTS`` times within ``RESTART_WINDOW_S``
(then it stops all, exit 1); and forwards SIGTERM/SIGINT to the workers, which finish their requests.
Workers exit with their supervisor even when it is SIGKILLed (``PR_SET_PDEATHSIG``); only its run
directory (a few small files) is then left behind.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from types import FrameType
from typing import Any

from service.errors import ConfigError, ModelLoadError
from service.settings import Settings

log = logging.getLogger("tta_serve.workers")

MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
STOP_TIMEOUT_S = 30.0
WORKER_HEADER = "x-tta-worker"  # names the worker that answered, on every response


def check_workers(settings: Settings) -> None:
    """Refuse what several workers cannot serve, before any process starts (ConfigError says why)."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigError("workers > 1 needs SO_REUSEPORT (Linux); set workers: 1")
    if settings.redis_url is not None:
        raise ConfigError("workers > 1 replicate through a local run directory and cannot be combined with "
                          "redis_url (Redis replication) yet: run one worker per replica (workers: 1) with Redis, "
                          "or unset redis_url")
    if settings.grpc_port is not None:
        raise ConfigError("grpc_port is served by one process: set workers: 1 to serve gRPC")


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEPORT, not yet listening (the server listens once it
    serves, so the kernel sends a starting worker no connection)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


def _something_listens(host: str, port: int) -> bool:
    """Whether a server already answers on host:port (another SO_REUSEPORT server would share it silently)."""
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    try:
        with socket.create_connection((target, port), timeout=0.5):
            return True
    except OSError:
        return False


def make_run_dir() -> Path:
    """A private directory for the published states: on /dev/shm (memory) where there is one.

    Its name holds the supervisor's pid, so the next supervisor removes what a SIGKILLed one left.
    """
    shm = Path("/dev/shm")
    base = Path(shm if shm.is_dir() and os.access(shm, os.W_OK) else tempfile.gettempdir())
    for stale in base.glob("tta-serve-*-*"):
        owner = stale.name.split("-")[2]
        if owner.isdigit() and stale.is_dir() and stale.stat().st_uid == os.getuid() and not _alive(int(owner)):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"tta-serve-{os.getpid()}-", dir=base))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# ---------------------------------------------------------------------------------------------- workers
def worker_main(settings: Settings, index: int, run_dir: Path, log_level: str, ready: Connection,
                supervisor: int) -> None:
    """One worker process: bind, load the models (worker 0 leads), serve; exit 2 if it cannot start."""
    import logging.config

    import uvicorn

    from service.composition import build_registry, routing_for_app
    from service.http.app import create_app
    from service.local_replication import local_peers
    from service.logs import logging_config
    from service.metrics import ServiceMetrics
    from service.worker_metrics import WorkerMetrics, socket_path

    logging.config.dictConfig(logging_config(settings.log_format, log_level))
    _exit_with_parent(supervisor)
    try:
        sock = bind_socket(settings.host, settings.port)
        sibling = socket_path(run_dir, index)  # where the other workers collect this one's metrics
        sibling.unlink(missing_ok=True)  # left by a killed predecessor
        sibling_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sibling_sock.bind(str(sibling))
        metrics = ServiceMetrics()
        registry = build_registry(settings, metrics, local_peers(run_dir, index))
        routing = routing_for_app(settings, registry, metrics)
    except Exception as exc:
        expected = isinstance(exc, ConfigError | ModelLoadError | OSError)  # their message says it all
        log.error("worker %s: cannot start: %s", index, exc, exc_info=not expected)
        sys.exit(2)
    app = create_app(settings, registry, metrics)
    app.state.routing = routing
    app.state.worker_metrics = WorkerMetrics(run_dir, index, settings.resolved_workers())
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                            log_config=logging_config(settings.log_format, log_level),
                            headers=[(WORKER_HEADER, str(index))])

    class ReadyServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            ready.send(os.getpid())  # listening now: the supervisor may start the next worker

    ReadyServer(config).run(sockets=[sock, sibling_sock])


def _exit_with_parent(supervisor: int) -> None:
    """Ask Linux for SIGTERM when the supervisor dies (even by SIGKILL), so no worker outlives it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: a supervisor killed with SIGKILL leaves its workers
        log.warning("workers cannot follow their supervisor's death on this OS")
    if os.getppid() != supervisor:  # it died before we asked
        sys.exit(1)


@dataclass
class Worker:
    index: int
    process: Any  # multiprocessing's SpawnProcess
    ready_conn: Connection
    ready: bool = False


class Supervisor:
    """Starts, watches, restarts and stops the worker processes (see the module's docstring)."""

    def __init__(self, settings: Settings, count: int, log_level: str, run_dir: Path) -> None:
        self.settings = settings
        self.count = count
        self.log_level = log_level
        self.run_dir = run_dir
        self.workers: dict[int, Worker] = {}
        self.stopping: int | None = None  # the signal that asked to stop
        self._ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._restarts: deque[float] = deque()

    def run(self) -> int:
        """Serve until a signal (exit 0), a failed start (2) or a crash loop (1)."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            if not self._start_all():
                return 0 if self.stopping else 2
            log.info("serving on %s:%s with %d workers (worker 0 adapts; pids %s); run directory %s",
                     self.settings.host, self.settings.port, self.count,
                     [w.process.pid for w in self.workers.values()], self.run_dir)
            return self._watch()
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # ------------------------------------------------------------------ start
    def _spawn(self, index: int) -> Worker:
        reader, writer = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(target=worker_main, name=f"tta-serve-worker-{index}",
                                    args=(self.settings, index, self.run_dir, self.log_level, writer, os.getpid()))
        process.start()
        writer.close()  # the child holds it now: its death reads as end of file here
        worker = Worker(index, process, reader)
        self.workers[index] = worker
        return worker

    def _start_all(self) -> bool:
        """Worker 0 first (a cold model cache is built once), then the others together."""
        if not self._wait_ready([self._spawn(0)]):
            return False
        return self._wait_ready([self._spawn(i) for i in range(1, self.count)])

    def _wait_ready(self, starting: list[Worker]) -> bool:
        pending = {w.index: w for w in starting}
        while pending and self.stopping is None:
            waitables: list[Any] = [self._wake_r]
            for w in pending.values():
                waitables += [w.ready_conn, w.process.sentinel]
            wait(waitables)
            for index, w in list(pending.items()):
                if self._read_ready(w):
                    del pending[index]
                elif not w.process.is_alive():
                    log.error("worker %s failed to start (%s); stopping (its error is logged above)",
                              index, _exit_text(w.process.exitcode))
                    return False
        return self.stopping is None

    @staticmethod
    def _read_ready(worker: Worker) -> bool:
        if not worker.ready and worker.ready_conn.poll():
            with contextlib.suppress(EOFError, OSError):
                worker.ready_conn.recv()
                worker.ready = True
        return worker.ready

    # ------------------------------------------------------------------ watch and restart
    def _watch(self) -> int:
        while self.stopping is None:
            waitables: list[Any] = [self._wake_r]
            for w in self.workers.values():
                waitables.append(w.process.sentinel)
                if not w.ready:
                    waitables.append(w.ready_conn)
            wait(waitables)
            for w in list(self.workers.values()):
                if not w.ready and self._read_ready(w):
                    log.warning("worker %s (pid %s) serves again", w.index, w.process.pid)
                if self.stopping is None and not w.process.is_alive() and not self._restart(w):
                    return 1
        return 0

    def _restart(self, dead: Worker) -> bool:
        now = time.monotonic()
        self._restarts.append(now)
        while self._restarts and now - self._restarts[0] > RESTART_WINDOW_S:
            self._restarts.popleft()
        role = "leader" if dead.index == 0 else "follower"
        if len(self._restarts) > MAX_RESTARTS:
            log.critical("worker %s (pid %s, %s) %s: workers died %d times within %.0f s; stopping all workers",
                         dead.index, dead.process.pid, role, _exit_text(dead.process.exitcode),
                         len(self._restarts), RESTART_WINDOW_S)
            return False
        log.error("worker %s (pid %s, %s) %s; restarting it", dead.index, dead.process.pid, role,
                  _exit_text(dead.process.exitcode))
        dead.ready_conn.close()
        self._spawn(dead.index)
        return True

    # ------------------------------------------------------------------ stop
    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.stopping is not None:  # a second signal: do not wait for graceful shutdowns
            for w in self.workers.values():
                if w.process.is_alive():
                    w.process.kill()
            return
        self.stopping = signum
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _stop_all(self) -> None:
        """SIGTERM to every worker (uvicorn finishes in-flight requests), SIGKILL after STOP_TIMEOUT_S."""
        alive = [w for w in self.workers.values() if w.process.is_alive()]
        if alive:
            log.info("stopping %d workers", len(alive))
        for w in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for w in alive:
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                log.error("worker %s (pid %s) did not stop within %.0f s; killing it", w.index, w.process.pid,
                          STOP_TIMEOUT_S)
                w.process.kill()
                w.process.join()
        for w in self.workers.values():
            w.ready_conn.close()


def _exit_text(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def serve_workers(settings: Settings, log_level: str) -> int:
    """Run ``settings.resolved_workers()`` worker processes on one port; returns the exit code.

    Raises ConfigError (before any worker starts) for a configuration or port they cannot serve.
    """
    check_workers(settings)
    count = settings.resolved_workers()
    if settings.port and _something_listens(settings.host, settings.port):
        raise ConfigError(f"cannot listen on {settings.host}:{settings.port}: a server already answers there")
    try:  # held until the end: the port stays ours (also port 0's choice) while workers restart
        reservation = bind_socket(settings.host, settings.port)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from None
    port = reservation.getsockname()[1]
    settings = settings.model_copy(update={"port": port, "workers": count})
    run_dir = make_run_dir()
    try:
        return Supervisor(settings, count, log_level, run_dir).run()
    finally:
        reservation.close()
        shutil.rmtree(run_dir, ignore_errors=True)
