"""The user's model serving design, rebuilt to run, as a baseline for bench_predictor.py.

Our own code, working the way the tutorial's ``OptimizedModelServer`` and ``RequestBatcher`` do:

- ``SeedModelServer.predict_single``: ``torch.tensor(list)``, ``unsqueeze``, ``torch.no_grad()``,
  ``.cpu().numpy().tolist()``, one forward per request; ``predict_async`` runs it in a
  ``ThreadPoolExecutor(max_workers=4)``; ``predict_batch`` converts the whole batch with
  ``torch.tensor(list_of_lists)``; warm-up with ten forwards.
- ``SeedRequestBatcher``: a deque and a *threading* lock held across ``await``; every request
  schedules its own ``sleep(max_wait_time)`` task; a full queue processes a batch inline; the
  batch function runs on the event loop thread.

One deliberate change: the tutorial's lock is a ``threading.Lock``, which ``_process_batch``
re-acquires while ``add_request`` (or ``_schedule_batch_processing``) already holds it. On one
event loop thread that blocks forever: run as written, the tutorial's batcher deadlocks on its
first batch (checked: two requests, ``batch_size=4``, ``max_wait_time=0.01`` hang until killed).
We use an ``RLock`` so it runs; holding it across ``await`` then excludes nothing (every
coroutine runs on the lock's owning thread), exactly the tutorial's effective behaviour.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch


class SeedModelServer:
    """Like the tutorial's OptimizedModelServer (device, eval, warm-up, single/batch/async)."""

    def __init__(
        self, model: torch.nn.Module, batch_size: int = 32, threads: int | None = None
    ) -> None:
        self.model = model
        self.batch_size = batch_size
        # threads=None is the tutorial (torch's default in every thread); the benchmark passes 1
        # so that the comparison is about batching and caching, not about thread oversubscription
        self.executor = (
            ThreadPoolExecutor(max_workers=4)
            if threads is None
            else ThreadPoolExecutor(
                max_workers=4, initializer=torch.set_num_threads, initargs=(threads,)
            )
        )
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.model.eval()
        dummy = torch.randn(1, 784).to(self.device)
        with torch.no_grad():
            for _ in range(10):
                self.model(dummy)

    def predict_single(self, input_data: list[float]) -> dict[str, Any]:
        start = time.time()
        tensor = torch.tensor(input_data, dtype=torch.float32).to(self.device)
        if tensor.dim() == 1:
            tensor = tensor.unsqueeze(0)
        with torch.no_grad():
            prediction = self.model(tensor).cpu().numpy().tolist()
        return {
            "prediction": prediction,
            "inference_time": time.time() - start,
            "device": str(self.device),
        }

    def predict_batch(self, batch_data: list[list[float]]) -> dict[str, Any]:
        start = time.time()
        tensor = torch.tensor(batch_data, dtype=torch.float32).to(self.device)
        with torch.no_grad():
            predictions = self.model(tensor).cpu().numpy().tolist()
        elapsed = time.time() - start
        return {
            "predictions": predictions,
            "batch_size": len(batch_data),
            "inference_time": elapsed,
            "throughput": len(batch_data) / max(elapsed, 1e-9),
        }

    async def predict_async(self, input_data: list[float]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.predict_single, input_data)

    def close(self) -> None:
        self.executor.shutdown(wait=False)


class SeedRequestBatcher:
    """Like the tutorial's RequestBatcher (see the module doc for the one change: RLock)."""

    def __init__(
        self,
        process: Callable[[list[Any]], list[Any]],
        batch_size: int = 32,
        max_wait_time: float = 0.1,
    ) -> None:
        self.process = process
        self.batch_size = batch_size
        self.max_wait_time = max_wait_time
        self.batch_queue: deque[dict[str, Any]] = deque()
        self.lock = threading.RLock()
        self.batch_sizes: list[int] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def add_request(self, request_data: Any, request_id: str) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        with self.lock:
            self.batch_queue.append(
                {
                    "data": request_data,
                    "request_id": request_id,
                    "future": future,
                    "timestamp": time.time(),
                }
            )
            if len(self.batch_queue) >= self.batch_size:
                await self._process_batch()
            else:
                task = asyncio.create_task(self._schedule_batch_processing())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return await future

    async def _schedule_batch_processing(self) -> None:
        await asyncio.sleep(self.max_wait_time)
        with self.lock:
            if self.batch_queue:
                await self._process_batch()

    async def _process_batch(self) -> None:
        if not self.batch_queue:
            return
        batch, futures = [], []
        with self.lock:
            for _ in range(min(len(self.batch_queue), self.batch_size)):
                request = self.batch_queue.popleft()
                batch.append(request["data"])
                futures.append(request["future"])
        self.batch_sizes.append(len(batch))
        try:
            results = await self._process_batch_data(batch)
            for i, future in enumerate(futures):
                if i < len(results):
                    future.set_result(results[i])
                else:
                    future.set_exception(Exception("Batch processing error"))
        except Exception as e:
            for future in futures:
                future.set_exception(e)

    async def _process_batch_data(self, batch_data: list[Any]) -> list[Any]:
        return self.process(batch_data)  # on the event loop thread, as the tutorial's would


def seed_batch_fn(server: SeedModelServer) -> Callable[[list[Any]], list[Any]]:
    """The batch function the tutorial would plug in: its own predict_batch."""

    def process(batch: list[Any]) -> list[Any]:
        return list(server.predict_batch(batch)["predictions"])

    return process


__all__ = ["SeedModelServer", "SeedRequestBatcher", "seed_batch_fn"]
