"""A pool of decoder worker processes: FIFO task hand-out, and a crashed or hung worker is killed and replaced."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import signal
from multiprocessing.connection import Connection

from mmserve.media.errors import MediaError
from services.decoder.tasks import WorkerSettings, run_worker

log = logging.getLogger(__name__)


class WorkerCrashed(RuntimeError):
    """The worker died while running the task (FFmpeg crashed on the media, or it was killed)."""


class WorkerTimeout(RuntimeError):
    """The task ran past its time limit; the worker was killed."""


class WorkerError(RuntimeError):
    """The task failed in the worker for a reason other than bad media."""


def _context() -> multiprocessing.context.BaseContext:
    """forkserver: workers fork from a clean server that has PyAV and Pillow imported (no torch: the CPU path
    resizes with Pillow), never from the gRPC process."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["services.decoder.worker"])
    return ctx


class _Worker:
    def __init__(self, ctx, settings: WorkerSettings):
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=run_worker, args=(child, settings), daemon=True,
                                   name="mmserve-decoder-worker")
        self._child = child

    def start(self) -> None:
        self.process.start()
        self._child.close()

    def stop(self, timeout_s: float) -> None:
        """Closes the pipe (the worker exits at EOF), killing it if it does not exit in time."""
        self.conn.close()
        self.process.join(timeout_s)
        if self.process.is_alive():
            self.kill()

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


class _NotStarted(Exception):
    """The worker was already dead when handed the task (it never acknowledged it)."""


def _roundtrip(conn: Connection, task) -> tuple:
    try:
        conn.send(task)
        conn.recv()  # the worker acknowledges before touching the media
    except (EOFError, OSError):
        raise _NotStarted() from None
    return conn.recv()


def _describe(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


class WorkerPool:
    """num_workers processes; run() hands each task to the next idle worker in arrival order."""

    def __init__(self, num_workers: int, settings: WorkerSettings, task_timeout_s: float = 120.0):
        self.num_workers = num_workers
        self.settings = settings
        self.task_timeout_s = task_timeout_s
        self._ctx = _context()
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._workers: set[_Worker] = set()
        # One blocking send/recv per busy worker; killing a worker unblocks its thread.
        self._io = concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix="decoder-io")
        self.num_replaced = 0  # workers killed or found dead and started afresh

    async def start(self) -> None:
        """Starts every worker (the first start also boots the fork server)."""
        await asyncio.gather(*(self._spawn() for _ in range(self.num_workers)))

    async def _spawn(self) -> None:
        worker = _Worker(self._ctx, self.settings)
        await asyncio.to_thread(worker.start)
        self._workers.add(worker)
        self._idle.put_nowait(worker)

    async def _replace(self, worker: _Worker) -> None:
        self._workers.discard(worker)
        await asyncio.to_thread(worker.kill)
        self.num_replaced += 1
        await self._spawn()

    async def run(self, task, timeout_s: float | None = None) -> tuple[object, float]:
        """Runs task on the next idle worker: (result, ms inside the worker). The worker is killed after timeout_s
        (default task_timeout_s). A cancelled caller's task finishes in the background, so the worker goes back
        to the pool in a known state."""
        worker = await self._idle.get()
        call = asyncio.ensure_future(self._call(worker, task, timeout_s or self.task_timeout_s))
        call.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even if nobody awaits
        return await asyncio.shield(call)

    async def _call(self, worker: _Worker, task, timeout_s: float):
        loop = asyncio.get_running_loop()
        for attempt in range(self.num_workers + 1):
            if attempt:
                worker = await self._idle.get()
            try:
                reply = await asyncio.wait_for(loop.run_in_executor(self._io, _roundtrip, worker.conn, task),
                                               timeout_s)
                break
            except _NotStarted:
                # Died while idle (killed, out of memory): not this task's fault, so try a fresh worker.
                log.warning("decoder worker %d was found dead; replacing it", worker.process.pid)
                await self._replace(worker)
            except TimeoutError:
                log.warning("decoder worker %d timed out after %.0f s; replacing it", worker.process.pid, timeout_s)
                await self._replace(worker)
                raise WorkerTimeout(f"decoding took longer than the {timeout_s:g} s limit") from None
            except (EOFError, OSError):
                await asyncio.to_thread(worker.process.join, 5)
                code = worker.process.exitcode
                log.warning("decoder worker %d died (exit code %s); replacing it", worker.process.pid, code)
                await self._replace(worker)
                raise WorkerCrashed(f"the decoder process crashed on this media ({_describe(code)})") from None
        else:
            raise WorkerError("no decoder worker could be started")
        self._idle.put_nowait(worker)
        status, *payload = reply
        if status == "ok":
            return payload[0], payload[1]
        if status == "invalid":
            raise MediaError(payload[0])
        raise WorkerError(payload[0])

    async def close(self) -> None:
        """Stops every worker."""
        workers, self._workers = list(self._workers), set()
        await asyncio.gather(*(asyncio.to_thread(w.stop, 5.0) for w in workers))
        self._io.shutdown(wait=False, cancel_futures=True)
