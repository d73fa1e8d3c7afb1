"""The simulated engine: a FIFO waiting queue, a running batch, one prefill lane, timed decode.

Cost model (all times are the event loop's monotonic clock):
- A request waits in FIFO order until the batch has room (``max_running``) and the cache can
  hold it (`PrefixCache.admit`). The head of the queue blocks the rest, as in vLLM's FCFS
  scheduler. Admission looks up the prefix cache at that moment, so a request that waited
  behind another with the same prefix hits the blocks that one stored.
- Prefill is compute-bound: one lane per worker, taken in admission order. A request's
  prefill costs one forward pass (``decode_ms_per_token``) plus ``prefill_us_per_token`` for
  each prompt token not served from the cache, and starts when the lane is free. The first
  token comes out when its prefill ends, so TTFT = queueing + waiting for the lane + own
  prefill: it grows with uncached tokens and with load.
- Decode is memory-bound and batched: every running request makes one token per
  ``decode_ms_per_token`` after its first, whatever the batch size.
- The lane is booked when a request is admitted; if that request is aborted before its
  prefill starts, the booked time is not given back (a small pessimism under churn).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from worker.sim.cache import Allocation, PrefixCache
from worker.sim.config import SimConfig
from worker.sim.tokenizer import filler_token

FinishReason = Literal["length", "abort"]


@dataclass(eq=False)
class SimRequest:
    """One inference request as the engine sees it."""

    request_id: str
    prompt: list[int]
    block_hashes: list[bytes]
    max_tokens: int
    salt: str | None
    arrival: float
    admitted: asyncio.Future[None]
    cached_tokens: int | None = None
    """Prompt tokens served from the cache; None until admitted."""
    admitted_at: float | None = None
    first_token_at: float = 0.0
    """When the first token is (or was) due."""
    allocation: Allocation | None = field(default=None, repr=False)
    kv_generated: int = 0
    """Generated tokens whose KV has been accounted in the cache."""
    finished_at: float | None = None
    finish_reason: FinishReason | None = None


class EngineObserver(Protocol):
    """Receives the engine's events (the metrics implement it)."""

    def on_admitted(self, request: SimRequest) -> None: ...

    def on_first_token(self, request: SimRequest) -> None: ...

    def on_tokens(self, request: SimRequest, count: int) -> None: ...

    def on_finished(self, request: SimRequest, reason: FinishReason) -> None: ...


class Engine:
    """Schedules simulated requests over a `PrefixCache` and paces their tokens."""

    def __init__(self, config: SimConfig, cache: PrefixCache, observer: EngineObserver) -> None:
        self._cache = cache
        self._observer = observer
        self._max_running = config.max_running
        self._prefill_s_per_token = config.prefill_us_per_token / 1e6
        self._decode_s = config.decode_ms_per_token / 1e3
        self._waiting: deque[SimRequest] = deque()
        self._running: set[SimRequest] = set()
        self._lane_free_at = 0.0

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def new_request(
        self,
        request_id: str,
        prompt: list[int],
        max_tokens: int,
        salt: str | None,
    ) -> SimRequest:
        """Build a request (hashing its prompt blocks now, as vLLM does on arrival)."""
        loop = asyncio.get_running_loop()
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if len(prompt) + max_tokens - 1 > self._cache.num_blocks * self._cache.block_size:
            # It could never be admitted; the HTTP layer's max_model_len check prevents this.
            raise ValueError("prompt plus completion exceed the whole KV cache")
        return SimRequest(
            request_id=request_id,
            prompt=prompt,
            block_hashes=self._cache.hasher.chain(prompt, salt),
            max_tokens=max_tokens,
            salt=salt,
            arrival=loop.time(),
            admitted=loop.create_future(),
        )

    async def run(self, request: SimRequest, *, interval: float) -> AsyncGenerator[int, None]:
        """Queue ``request`` and yield how many tokens exist so far, as time passes.

        Yields at the first token, then at most once per ``interval`` seconds (all tokens
        due by then at once), ending with ``max_tokens``. Closing the iterator early, or
        cancelling its consumer, aborts the request and frees its blocks.
        """
        loop = asyncio.get_running_loop()
        self._waiting.append(request)
        self._schedule()
        try:
            await request.admitted
            await _sleep_until(loop, request.first_token_at)
            self._observer.on_first_token(request)
            produced = 1
            self._observer.on_tokens(request, 1)
            yield produced
            last_yield = loop.time()
            while produced < request.max_tokens:
                next_due = request.first_token_at + produced * self._decode_s
                await _sleep_until(loop, max(next_due, last_yield + interval))
                now = loop.time()
                if self._decode_s > 0:
                    due = 1 + math.floor((now - request.first_token_at) / self._decode_s)
                else:
                    due = request.max_tokens
                # Never stall on float rounding: we slept at least until the next token's time.
                due = min(request.max_tokens, max(due, produced + 1))
                self._commit_decode(request, due)
                self._observer.on_tokens(request, due - produced)
                produced = due
                last_yield = now
                yield produced
            self._finish(request, "length")
        finally:
            if request.finish_reason is None:
                self._abort(request)

    # ---- scheduling --------------------------------------------------------------------

    def _schedule(self) -> None:
        while self._waiting and len(self._running) < self._max_running:
            request = self._waiting[0]
            allocation = self._cache.admit(
                request.prompt, request.block_hashes, request.salt, request.max_tokens
            )
            if allocation is None:
                return
            self._waiting.popleft()
            now = asyncio.get_running_loop().time()
            request.allocation = allocation
            request.cached_tokens = allocation.hit_tokens
            request.admitted_at = now
            uncached = len(request.prompt) - allocation.hit_tokens
            prefill = self._decode_s + uncached * self._prefill_s_per_token
            start = max(now, self._lane_free_at)
            request.first_token_at = start + prefill
            self._lane_free_at = request.first_token_at
            self._running.add(request)
            self._observer.on_admitted(request)
            if not request.admitted.done():
                request.admitted.set_result(None)

    def _commit_decode(self, request: SimRequest, produced: int) -> None:
        # The newest token is returned but not yet fed back, so its KV does not exist yet.
        target = produced - 1
        if request.allocation is None or target <= request.kv_generated:
            return
        new_tokens = [filler_token(i) for i in range(request.kv_generated, target)]
        request.kv_generated = target
        self._cache.grow(request.allocation, new_tokens)

    def _finish(self, request: SimRequest, reason: FinishReason) -> None:
        request.finish_reason = reason
        request.finished_at = asyncio.get_running_loop().time()
        self._running.discard(request)
        if request.allocation is not None:
            self._cache.release(request.allocation)
        self._observer.on_finished(request, reason)
        self._schedule()

    def _abort(self, request: SimRequest) -> None:
        if request in self._running:
            self._finish(request, "abort")
            return
        request.finish_reason = "abort"
        try:
            self._waiting.remove(request)
        except ValueError:
            pass
        else:
            # The head may have been what blocked the queue.
            self._schedule()
        if not request.admitted.done():
            request.admitted.cancel()


async def _sleep_until(loop: asyncio.AbstractEventLoop, when: float) -> None:
    delay = when - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)
