"""The serving engine: continuous batching over a fixed set of KV-cache slots.

One scheduler thread owns the model. Each request takes a free slot: its prompt is prefilled alone (padded to a
power-of-two bucket, so a handful of prompt shapes compile once each) into that slot's rows of a cache
[max_batch, max_len]; then every step decodes one token for all busy slots together. Requests join and leave
at step boundaries, so a short answer never waits for a long one and a new request waits at most one step.
A step's attention reads only the cache positions its longest answer has reached (a power-of-two view), so
a long --max-model-len costs only the requests that use it. Every bucket and view compiles once, at start.
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigmodel_cli import parallel
from bigmodel_cli.evaluate.generate import pick
from bigmodel_cli.model.params import LoadedModel

MIN_BUCKET = 16  # the shortest padded prompt: shorter buckets would only add compilations

# What a request is told after each token: (token id, finish reason or None). The reason is "stop" (a stop
# token), "length" (max_tokens reached) or "error" (token is then -1 and the engine's last error says why).
Emit = Callable[[int, str | None], None]


@dataclass(eq=False)
class Request:
    """One sequence to decode, as the HTTP layer hands it over; `cancel()` frees its slot at the next step."""

    prompt: list[int]  # token ids, at least one
    max_tokens: int  # new tokens at most; prompt + max_tokens <= the engine's max_len
    emit: Emit
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0  # with the same seed and prompt, the same tokens (whatever else is being decoded)
    stop_ids: frozenset[int] = frozenset()  # tokens that end the answer (EOS, a template's end of turn)
    generated: int = field(default=0, init=False)
    cancelled: bool = field(default=False, init=False)

    def cancel(self) -> None:
        self.cancelled = True


def _pick_row(logits, seed, index, temperature, top_p):
    """The next token from one row of logits [V], sampled with the request's own key for its index-th token."""
    key = jax.random.fold_in(jax.random.key(seed), index)
    return pick(logits[None], key, temperature, 0, top_p)[0]


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _prefill(graphdef, params, cache, slot, tokens, length, seed, temperature, top_p):
    """Prefill tokens [P] (the first `length` real) into cache row `slot`; returns (first new token, cache)."""
    model = nnx.merge(graphdef, params)
    cache_len = jax.tree.leaves(cache)[0].shape[-3]
    row = model.init_cache(1, cache_len)  # the slot's whole row is rewritten: no stale keys survive
    logits, row = model.decode(tokens[None], row, jnp.zeros((1,), jnp.int32), last=length[None] - 1)  # [1,1,V]
    token = _pick_row(logits[0, 0], seed, 0, temperature, top_p)
    # Keys and values are [B,S,K,E] per layer, or [L,B,S,K,E] stacked (model.scan_layers): B is 4th from last.
    cache = jax.tree.map(lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new, slot, buf.ndim - 4), cache, row)
    return token, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "view"), donate_argnames=("cache",))
def _step(graphdef, params, cache, tokens, positions, seeds, counts, temperature, top_p, *, view):
    """One decode step for every slot: tokens [B] at positions [B] -> next tokens [B] and the cache.

    Attention reads only the cache's first `view` positions (all positions < view): a step costs what the
    longest answer in the batch needs, not the whole --max-model-len."""
    model = nnx.merge(graphdef, params)
    part = jax.tree.map(lambda buf: jax.lax.slice_in_dim(buf, 0, view, axis=buf.ndim - 3), cache)  # [..,B,view,K,E]
    logits, part = model.decode(tokens[:, None], part, positions)  # [B,1,V]
    cache = jax.tree.map(lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new, 0, buf.ndim - 3), cache, part)
    return jax.vmap(_pick_row)(logits[:, 0], seeds, counts, temperature, top_p), cache


def bucket(length: int, max_len: int) -> int:
    """The padded length for `length` tokens (a prompt, or the cache positions a step reads): a power of two,
    at least MIN_BUCKET, at most max_len."""
    return min(max(MIN_BUCKET, 1 << (length - 1).bit_length()), max_len)


class Engine:
    """Decodes submitted requests together on a scheduler thread; `submit` is safe from any thread."""

    def __init__(self, loaded: LoadedModel, max_batch: int, max_len: int):
        self.loaded, self.max_batch, self.max_len = loaded, max_batch, max_len
        self._slots: list[Request | None] = [None] * max_batch
        self._last = np.zeros(max_batch, np.int32)  # each slot's last token, fed at the next step
        self._waiting: deque[Request] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self.last_error = ""
        self.peak_active = 0  # the most slots busy at once so far: above 1, requests were batched
        self.cancelled = 0  # requests whose slot was freed before they finished (a client gone, a stop string)
        with parallel.activate(loaded.mesh):
            model = nnx.merge(loaded.graphdef, loaded.params)
            self._cache = jax.jit(model.init_cache, static_argnums=(0, 1))(max_batch, max_len)
        self._thread = threading.Thread(target=self._loop, name="bigmodel-serve-engine", daemon=True)

    # ---- the HTTP side ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Compile every prefill bucket and step view (so that no request waits on a compilation), then start."""
        size = MIN_BUCKET
        while True:
            self._run_prefill(0, [0] * min(size, self.max_len - 1))
            self._run_step(view=min(size, self.max_len))
            if size >= self.max_len:
                break
            size *= 2
        self._thread.start()

    def submit(self, request: Request) -> Request:
        if not request.prompt or len(request.prompt) + request.max_tokens > self.max_len:
            raise ValueError("the HTTP layer must refuse prompts that do not fit a slot")
        with self._wake:
            self._waiting.append(request)
            self._wake.notify()
        return request

    def active(self) -> int:
        """Slots holding a request (a cancelled one until the next step frees it)."""
        return sum(r is not None for r in self._slots)

    def waiting(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    # ---- the scheduler thread -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self.active():
                    self._wake.wait()
                if self._closed:
                    return
            try:
                self._free_cancelled()
                self._admit()
                if self.active():
                    self._advance()
            except Exception as err:  # an XLA failure must not kill the server: fail the requests it hit
                self.last_error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                for slot, request in enumerate(self._slots):
                    if request is not None:
                        self._slots[slot] = None
                        request.emit(-1, "error")

    def _free_cancelled(self) -> None:
        for slot, request in enumerate(self._slots):
            if request is not None and request.cancelled:
                self._slots[slot] = None
                self.cancelled += 1
        with self._wake:  # a request cancelled while waiting never takes a slot
            self._waiting = deque(r for r in self._waiting if not r.cancelled)

    def _admit(self) -> None:
        """Prefill waiting requests into free slots, oldest first."""
        for slot in range(self.max_batch):
            if self._slots[slot] is not None:
                continue
            with self._wake:
                if not self._waiting:
                    return
                request = self._waiting.popleft()
            self._slots[slot] = request  # in its slot before prefill: a failure there reaches it as an error
            token = self._run_prefill(slot, request.prompt, request)
            self.peak_active = max(self.peak_active, self.active())
            self._deliver(slot, request, token)

    def _advance(self) -> None:
        """One decode step for all busy slots."""
        tokens = self._run_step()
        for slot, request in enumerate(self._slots):
            if request is not None and not request.cancelled:
                self._deliver(slot, request, int(tokens[slot]))

    def _deliver(self, slot: int, request: Request, token: int) -> None:
        """Hand a new token to its request; a finished request leaves its slot."""
        request.generated += 1
        self._last[slot] = token
        finish = "stop" if token in request.stop_ids else "length" if request.generated >= request.max_tokens else None
        if finish:
            self._slots[slot] = None
        request.emit(token, finish)

    def _run_prefill(self, slot: int, prompt: list[int], request: Request | None = None) -> int:
        padded = np.zeros(bucket(len(prompt), self.max_len), np.int32)
        padded[: len(prompt)] = prompt
        request = request or Request(prompt, 1, lambda *_: None)
        with parallel.activate(self.loaded.mesh):
            token, self._cache = _prefill(
                self.loaded.graphdef,
                self.loaded.params,
                self._cache,
                np.int32(slot),
                padded,
                np.int32(len(prompt)),
                np.uint32(request.seed),
                np.float32(request.temperature),
                np.float32(request.top_p),
            )
        return int(token)

    def _run_step(self, view: int = 0) -> np.ndarray:
        busy = [r if r is not None and not r.cancelled else None for r in self._slots]
        # A free slot decodes a dummy token at position 0 of its own row, which its next prefill rewrites.
        positions = np.array([len(r.prompt) + r.generated - 1 if r else 0 for r in busy], np.int32)
        with parallel.activate(self.loaded.mesh):
            tokens, self._cache = _step(
                self.loaded.graphdef,
                self.loaded.params,
                self._cache,
                np.where([r is not None for r in busy], self._last, 0).astype(np.int32),
                positions,
                np.array([r.seed if r else 0 for r in busy], np.uint32),
                np.array([r.generated if r else 0 for r in busy], np.int32),
                np.array([r.temperature if r else 0.0 for r in busy], np.float32),
                np.array([r.top_p if r else 1.0 for r in busy], np.float32),
                view=view or bucket(int(positions.max()) + 1, self.max_len),
            )
        return np.asarray(tokens)
