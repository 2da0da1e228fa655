"""The continuous-batching engine: one thread owns the model and keeps its decode batch full.

Each iteration of the engine thread: apply cancellations, run one decode step over every running row at once
(slots 0..B-1 of the slot cache, each row at its own position), hand each row its token, free the rows that
finished, then admit waiting requests within the prefill token budget: they are prefilled together (prefill.py:
left-padded into batches of similar width, narrowest first, all their images through the vision tower and perceiver
in one call, image K/V once per request), copied into their slot(s) (n of them for n choices) and join the next
decode step; each batch's first tokens are handed out as soon as it is done. Requests are
tokenised, their images preprocessed and hashed and their structured-output constraint compiled (cached per
constraint) in the submitting thread, so bad input fails at `submit` and a slow compile never stalls the decode
steps. A constrained row's logits are masked to its grammar's allowed tokens where its token is chosen (`_emit`),
nowhere else.

Two caches skip repeated work: the image cache (image_cache.py) encodes each distinct image once, and the prefix
cache (prefix.py) lets a prompt that starts like a sequence some slot holds (a chat's next turn) reuse that slot's
K/V and prefill only the rest. Both decide inside the operations that change the slots (`prefill_into`, a decode
step, a release), as a deterministic function of them.

The decode step is eager over exactly the positions in use on CPU. With `compile` it has fixed shapes per
(batch bucket, length bucket), every image slot read: torch.compile'd with `compile=True`, and captured as a CUDA
graph per bucket on CUDA (`compile="auto"` captures the eager fixed-shape step there, without compiling).

On a tensor-parallel model (`from_pretrained(tp_plan="auto")`) one scheduler runs, on rank 0: the engine there
broadcasts each model-state operation (allocate, prefill, load, decode, release) before running it, and every
other rank runs `follow()`, which replays them on its shards (replicas.py). Sampling, grammar-free stop logic and
streams exist on rank 0 only; only rank 0 accepts requests.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import threading
import time
import uuid
from dataclasses import dataclass

import torch

from ..generation.compiling import compiled_for, fast_repeat
from ..generation.grammar import GrammarError, apply_bitmask_, compiler_for, fill_bitmask, new_bitmask
from ..generation.graphs import CudaGraphStep
from ..image_cache import ImageCache
from .events import FinishEvent, TokenEvent, TokenLogprob
from .inputs import encode_prompt
from .metrics import EngineMetrics
from .openmp import release_openmp_team
from .params import ContextLengthError, EngineDraining, SamplingParams
from .prefill import Emit, padded_tokens, pass_cost, prefill_into
from .prefix import PREFIX_MIN_TOKENS, prompt_record
from .replicas import Channel, DivergedError, decode_requests, encode_requests, heartbeat_interval
from .requests import Request, RequestStream, Row, make_deltas
from .sampler import choose, top_logprobs
from .scheduler import Scheduler
from .slots import SlotCache, slot_decode

LENGTH_BUCKET = 256  # fixed-shape steps attend to a multiple of this many positions


@dataclass
class EngineConfig:
    max_batch_size: int = 8  # decode slots
    max_model_len: int | None = None  # positions per slot; default: the model's max positions
    max_queue: int = 64  # waiting requests beyond which submit raises EngineOverloaded
    max_images_per_request: int = 4  # image slots per request (the image K/V buffers' size)
    prefill_token_budget: int = 2048  # prompt tokens prefilled between two decode steps
    # bytes the slot cache may take; with it, the slots are as many as fit (at most max_batch_size)
    cache_memory: int | None = None
    # True: fixed-shape steps, torch.compile'd, each bucket captured as a CUDA graph on CUDA; "auto": on CUDA the
    # fixed-shape steps as CUDA graphs without torch.compile, on CPU eager (the default there, by measurement)
    compile: bool | str = False
    # bytes of encoded images kept for reuse (the image cache; 0: off); per process
    image_cache_memory: int = 256 << 20
    # a prompt reuses the K/V of the longest prefix a slot holds (freed slots keep theirs, least recently used
    # given out first); False: every prompt is prefilled whole and the lowest free slots are used
    prefix_cache: bool = True

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "prefill_token_budget"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.max_images_per_request, int) or self.max_images_per_request < 0:
            raise ValueError(f"EngineConfig.max_images_per_request must be >= 0, got {self.max_images_per_request!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"EngineConfig.max_model_len must be an integer >= 2 or None, got {self.max_model_len!r}")
        if self.cache_memory is not None and (not isinstance(self.cache_memory, int) or self.cache_memory < 1):
            raise ValueError(f"EngineConfig.cache_memory must be a number of bytes >= 1 or None, got "
                             f"{self.cache_memory!r}")  # fmt: skip
        if not isinstance(self.image_cache_memory, int) or self.image_cache_memory < 0:
            raise ValueError(f"EngineConfig.image_cache_memory must be a number of bytes >= 0, got "
                             f"{self.image_cache_memory!r}")  # fmt: skip
        if self.compile not in (True, False, "auto"):
            raise ValueError(f"EngineConfig.compile must be True, False or 'auto', got {self.compile!r}")


class Engine:
    """Serves many requests on one model: `submit` returns a RequestStream; see the module docstring."""

    def __init__(self, model, processor=None, config: EngineConfig | None = None):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer if processor is not None else None
        self.config = config = config or EngineConfig()
        c = model.config
        limit = int(c.max_position_embeddings * c.rope_scaling_factor)
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's {limit} positions")
        self.max_model_len = config.max_model_len or limit
        self.device = model.device
        self.vocab_size = c.vocab_size + c.additional_vocab_size
        eos = c.eos_token_id
        self.eos_ids = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        num_slots = config.max_batch_size
        if config.cache_memory is not None:
            per_slot = SlotCache.bytes_per_slot(model, max_len=self.max_model_len,
                                                max_images=config.max_images_per_request)  # fmt: skip
            num_slots = min(num_slots, config.cache_memory // per_slot)
            if num_slots < 1:
                raise ValueError(
                    f"cache_memory {config.cache_memory} bytes holds no slot: one takes {per_slot} bytes "
                    f"({self.max_model_len} positions, {config.max_images_per_request} images); lower "
                    "max_model_len or max_images_per_request, or give more memory"
                )
        self.slots = SlotCache(model, num_slots=num_slots, max_len=self.max_model_len,
                               max_images=config.max_images_per_request, retain=config.prefix_cache)  # fmt: skip
        self.image_cache = ImageCache(config.image_cache_memory) if config.image_cache_memory else None
        self.seen = torch.zeros(num_slots, self.vocab_size, dtype=torch.bool, device=self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.seed()
        self.static = config.compile is True or (config.compile == "auto" and self.device.type == "cuda")
        self._steps: dict[tuple[int, int], object] = {}  # static steps per (batch bucket, length bucket)
        self.scheduler = Scheduler(max_queue=config.max_queue, prefill_token_budget=config.prefill_token_budget)
        self.metrics = EngineMetrics()
        self._rows: dict[int, Row] = {}  # slot -> row (engine thread only)
        self._deferred: list[int] | None = None  # slots freed during a prefill, released after it
        self._running_requests = 0
        self._cond = threading.Condition()
        self._cancelled: set[RequestStream] = set()
        self._thread: threading.Thread | None = None
        self._draining = self._stopping = self._abort = False
        self._ids = itertools.count()
        tp = getattr(model, "tensor_parallel", None)
        self._channel: Channel | None = None  # rank 0 of a tensor-parallel model: where operations are broadcast
        self.follower = False  # another rank: `follow()` replays rank 0's operations
        if tp is not None and tp.size > 1:
            settings = dict(dataclasses.asdict(config), num_slots=num_slots, max_model_len=self.max_model_len)
            tp.check_same(settings, "engine settings")
            self._channel, self.follower = (Channel(tp), False) if tp.is_main else (Channel(tp), True)

    # -- lifecycle --------------------------------------------------------------------------------------------------
    def start(self) -> Engine:
        """Start the engine thread (idempotent). The calling thread's idle OpenMP team is released first, so that
        the engine thread's parallel kernels run at full speed (see openmp.py)."""
        with self._cond:
            if self._thread is None and not self._stopping:
                release_openmp_team()
                self._thread = threading.Thread(target=self._loop, name="idefics-engine", daemon=True)
                self._thread.start()
        return self

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.shutdown(drain=exc_type is None)

    @property
    def draining(self) -> bool:
        return self._draining

    def shutdown(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; with `drain` finish the running and waiting ones, else cancel them; stop the thread."""
        with self._cond:
            self._draining = True
            if not drain:
                self._abort = True
            has_work = bool(self.scheduler.waiting) or bool(self._rows)
        if self._thread is None and drain and has_work:
            self.start()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            self._cancel_all()
            self.close_replicas()

    # -- submission -------------------------------------------------------------------------------------------------
    def submit(self, prompt, params: SamplingParams | None = None, *, request_id: str | None = None) -> RequestStream:
        """Queue a request; see the API notes in `idefics.serving`. Raises ValueError (ConstraintError for a
        constraint that does not compile), ContextLengthError, EngineOverloaded or EngineDraining."""
        if self.follower:
            raise RuntimeError("this rank replays rank 0's engine (follow()); submit requests on rank 0")
        if self._draining:
            raise EngineDraining("the engine is shutting down and accepts no new requests")
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if params.n > self.slots.num_slots:
            raise ValueError(f"SamplingParams.n is {params.n} but the engine has {self.slots.num_slots} slots")
        outside = sorted(k for k in params.logit_bias or {} if k >= self.vocab_size)
        if outside:
            raise ValueError(f"SamplingParams.logit_bias names token id {outside[0]}, outside the model's "
                             f"{self.vocab_size} ids")  # fmt: skip
        inputs = encode_prompt(prompt, self.processor, vocab_size=self.vocab_size, device=self.device)
        if inputs.num_images > self.config.max_images_per_request:
            raise ValueError(f"the prompt has {inputs.num_images} images; this engine takes at most "
                             f"{self.config.max_images_per_request} per request")  # fmt: skip
        t = inputs.input_ids.shape[1]
        if t + (params.max_tokens or 1) > self.max_model_len:
            raise ContextLengthError(
                max_model_len=self.max_model_len, prompt_tokens=t, max_tokens=params.max_tokens or 1
            )
        if params.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=self.max_model_len - t)
        grammar = None
        if params.constraint is not None:  # compiled (or found in the cache) here, never on the engine thread
            if self.tokenizer is None:
                raise ValueError("SamplingParams.constraint needs an engine with a processor (its tokenizer)")
            grammar = compiler_for(self.tokenizer, self.vocab_size).compile(params.constraint)
        request_id = request_id if request_id is not None else f"req-{uuid.uuid4().hex[:16]}"
        stream = RequestStream(request_id, t, params.n, self._cancel)
        record = prompt_record(inputs.input_ids, inputs.image_inputs.get("image_attention_mask"), inputs.image_keys)
        request = Request(request_id, inputs.input_ids, inputs.image_inputs, inputs.num_images, params, stream,
                          grammar=grammar, image_keys=inputs.image_keys, record=record)  # fmt: skip
        with self._cond:
            if self._draining:
                raise EngineDraining("the engine is shutting down and accepts no new requests")
            self.scheduler.add(request)
            self._cond.notify_all()
        if grammar is not None:
            self.metrics.constrained(grammar.constraint.kind)
        return stream

    def _cancel(self, stream: RequestStream) -> None:
        with self._cond:
            waiting = next((r for r in self.scheduler.waiting if r.stream is stream), None)
            if waiting is not None:
                self.scheduler.remove(waiting)
            else:
                self._cancelled.add(stream)
                self._cond.notify_all()
        if waiting is not None:
            self._finish_unstarted(waiting, "cancelled")

    def clear_caches(self) -> None:
        """Empty the image cache and the prefix records of free slots (e.g. before timing a cold run)."""
        self._broadcast("clear")
        if self.image_cache is not None:
            self.image_cache.clear()
        with self._cond:
            for slot in self.slots.free_slots:
                self.slots.forget(slot)

    # -- metrics ----------------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Requests running and waiting, slots, cache bytes, token counts, finish reasons, latency summaries, and
        the image and prefix caches' hits, misses, evictions and bytes."""
        with self._cond:
            waiting = len(self.scheduler.waiting)
            running, used = self._running_requests, self.slots.num_slots - self.slots.free
            prefix = {**self.slots.prefix_stats.snapshot(), "bytes": self.slots.retained_bytes,
                      "enabled": self.slots.retain}  # fmt: skip
        images = self.image_cache.stats() if self.image_cache is not None else {
            "hits": 0, "misses": 0, "evictions": 0, "entries": 0, "bytes": 0, "max_bytes": 0}  # fmt: skip
        return {"running": running, "waiting": waiting, "slots_used": used, "slots_total": self.slots.num_slots,
                "cache_bytes": self.slots.nbytes, **self.metrics.snapshot(), "image_cache": images,
                "prefix_cache": prefix}  # fmt: skip

    # -- the engine thread ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        wait = heartbeat_interval() if self._channel is not None else None
        while True:
            with self._cond:
                work = lambda: self._rows or self.scheduler.waiting or self._stopping or self._cancelled  # noqa: E731
                busy = self._cond.wait_for(work, timeout=wait)
                if self._abort or (self._stopping and not self._rows and not self.scheduler.waiting):
                    break
            if not busy:  # idle on a tensor-parallel model: tell the other ranks rank 0 is alive
                self._channel.send("heartbeat")
                continue
            try:
                self.step()
            except Exception as err:  # a bug must not leave streams waiting forever: end what was running
                self._fail_running(f"{type(err).__name__}: {err}")
        self._cancel_all()
        self.close_replicas()

    def close_replicas(self) -> None:
        """Tell the other ranks of a tensor-parallel model that this engine is done (their `follow()` returns)."""
        if self._channel is not None and not self.follower:
            self._channel.send("stop")
            self._channel = None

    # -- the other ranks of a tensor-parallel model --------------------------------------------------------------
    def follow(self) -> None:
        """Replay rank 0's operations on this rank's shards until rank 0's engine stops (see replicas.py). An
        operation that fails here failed on rank 0 too (the same inputs): it is skipped, as rank 0 skips it."""
        if not self.follower:
            raise RuntimeError("follow() runs on the ranks other than 0 of a tensor-parallel model")
        while True:
            op, args, tensors = self._channel.receive()
            if op == "stop":
                return
            try:
                if op == "prefill":
                    requests = decode_requests(args["requests"], tensors, self.device)
                    if args["allocate"]:
                        groups = self._allocate(requests)
                        if groups != args["slots"]:  # the same operations gave another slot: the ranks diverged
                            raise DivergedError(f"rank 0 gave slots {args['slots']}, this rank {groups}")
                    self._prefill(requests, args["slots"])
                elif op == "decode":
                    self._forward(args["tokens"], args["lengths"], args["b"], args["length"], args["images"],
                                  args["advance"])  # fmt: skip
                elif op == "forget":
                    self._forget(args["slot"])
                elif op == "release":
                    self._release(args["slot"])
                elif op == "clear":
                    self.clear_caches()
            except DivergedError:
                raise
            except Exception as err:  # noqa: BLE001
                print(f"idefics engine rank {self._channel.tp.rank}: {op} failed: {type(err).__name__}: {err}",
                      file=sys.stderr)  # fmt: skip

    # -- model-state operations (broadcast to the other ranks first, on a tensor-parallel model) ---------------------
    def _broadcast(self, op: str, args: dict | None = None, tensors: list[torch.Tensor] = ()) -> None:
        if self._channel is not None and not self.follower:
            self._channel.send(op, args, tensors)

    def _allocate(self, requests: list[Request]) -> list[list[int]]:
        """Slots for each request (n each; with the prefix cache, the slots holding their longest prefixes)."""
        with self._cond:
            return [self.slots.allocate(r.params.n, r.record) for r in requests]

    def _prefill(self, requests: list[Request], slots: list[list[int]], *, allocated: bool = False,
                 emit: Emit | None = None) -> torch.Tensor:  # fmt: skip
        """Prefill `requests` into their `slots` (allocated by `_allocate` just before, when `allocated`); returns
        each request's next-token logits (b, v), and hands each batch of them to `emit` as it is done (slots that
        its rows free are released after the whole prefill: the other ranks are still in it)."""
        if self._channel is not None and not self.follower:
            fields, tensors = encode_requests(requests)
            self._broadcast("prefill", {"requests": fields, "slots": slots, "allocate": allocated}, tensors)
        self._deferred = []
        try:
            return prefill_into(self.model, self.slots, requests, slots, self.image_cache, emit)
        finally:
            deferred, self._deferred = self._deferred, None
            for slot in deferred:
                self._release(slot)

    def _forget(self, slot: int) -> None:
        self._broadcast("forget", {"slot": slot})
        self.slots.forget(slot)

    def _release(self, slot: int) -> None:
        if self._deferred is not None:
            self._deferred.append(slot)
            return
        self._broadcast("release", {"slot": slot})
        self.slots.release(slot)

    @torch.inference_mode()
    def _forward(self, tokens: list[int], lengths: list[int], b: int, length: int, images: int,
                 advance: list[int]) -> torch.Tensor:  # fmt: skip
        """Logits (b, v) of one decode step over slots 0..b-1: `tokens` written at positions `lengths`; the slots in
        `advance` (the running ones) then hold one more position."""
        self._broadcast("decode", {"tokens": tokens, "lengths": lengths, "b": b, "length": length, "images": images,
                                   "advance": advance})  # fmt: skip
        self.slots.positions.copy_(torch.tensor(lengths))  # free slots write (unread) after what they hold
        token_tensor = torch.tensor(tokens, device=self.device)
        if self.static:
            logits = self._static_step(b, length)(token_tensor)
        else:
            logits = slot_decode(self.model, self.slots, token_tensor, b, length, images)  # (B, v)
        self.slots.advance(advance, [tokens[s] for s in advance])
        return logits

    def step(self) -> bool:
        """One iteration: cancellations, one decode step over the running rows, admissions. The engine thread
        calls it; without `start()` a caller may drive the engine with it (deterministic tests, offline batches).
        Returns whether work remains."""
        with self._cond:
            cancelled, self._cancelled = self._cancelled, set()
        for row in list(self._rows.values()):
            if row.request.stream in cancelled:
                row.request.stream.push([self._finish(row, "cancelled")])
        if self._rows:
            self._decode()
        self._admit()
        with self._cond:
            return bool(self._rows or self.scheduler.waiting)

    def _cancel_all(self) -> None:
        for row in list(self._rows.values()):
            row.request.stream.push([self._finish(row, "cancelled")])
        with self._cond:
            waiting = list(self.scheduler.waiting)
            self.scheduler.waiting.clear()
        for request in waiting:
            self._finish_unstarted(request, "cancelled")

    def _fail_running(self, message: str) -> None:
        for row in list(self._rows.values()):
            row.request.stream.push([self._finish(row, "error", error=message)])

    def _admit(self) -> None:
        if self._abort:
            return
        with self._cond:
            requests = self.scheduler.admit(free_slots=self.slots.free, cost=self._prefill_cost)
        if not requests:
            return
        slots = self._allocate(requests)  # only this thread changes the slots: no other admission in between
        started: set[int] = set()
        starting = False

        def emit(indices: list[int], logits: torch.Tensor) -> None:  # a batch's first tokens, as soon as it is done
            nonlocal starting
            starting = True
            started.update(indices)
            self._start([requests[i] for i in indices], [slots[i] for i in indices], logits)
            starting = False

        try:
            self._prefill(requests, slots, allocated=True, emit=emit)
        except Exception:  # one bad request must not fail the others: prefill each not started alone to find it
            if starting:  # not the prefill: handing out tokens failed, as it would have after it
                raise
            left = [i for i in range(len(requests)) if i not in started]
            for i in left:
                for slot in slots[i]:
                    self._forget(slot)
            if len(left) == 1:
                self._fail_prefill(requests[left[0]], slots[left[0]])
                return
            for i in left:
                try:
                    self._start([requests[i]], [slots[i]], self._prefill([requests[i]], [slots[i]]))
                except Exception:
                    self._fail_prefill(requests[i], slots[i])

    def _prefill_cost(self, requests: list[Request]) -> int:
        """Positions prefilled for these requests, padding included: the left-padded batches of those prefilled
        whole, and the right-aligned batches of the rest after the prefix a slot holds (as prefill_into runs them)."""
        whole, rest = [], []
        for r in requests:
            start = int(self.slots.shared_prefix(r.record).max()) if self.slots.retain else 0
            (rest if start >= PREFIX_MIN_TOKENS else whole).append(r.prompt_tokens - start)
        cost = pass_cost(self.device)
        return padded_tokens(whole, cost) + padded_tokens(rest, cost)

    def _fail_prefill(self, request: Request, slots: list[int]) -> None:
        err = sys.exc_info()[1]
        with self._cond:
            for slot in slots:
                self._forget(slot)
                self._release(slot)
        self._finish_unstarted(request, "error", error=f"{type(err).__name__}: {err}")

    def _start(self, requests: list[Request], slots: list[list[int]], logits: torch.Tensor) -> None:
        """Hand out each prefilled request's first tokens (it fills slots[i], n of them); logits (b, v)."""
        now = time.perf_counter()
        rows = []
        for request, group in zip(requests, slots, strict=True):
            t = request.prompt_tokens
            self.metrics.observe("queue_time", now - request.arrival_clock)
            with self.metrics.lock:
                self.metrics.prompt_tokens_total += t
            with self._cond:
                self._running_requests += 1
            for index, slot in enumerate(group):
                self.seen[slot] = False
                self.seen[slot, request.input_ids[0]] = True
                p = request.params
                generator = None
                if p.seed is not None and p.temperature > 0:
                    generator = torch.Generator(device=self.device).manual_seed(p.seed + index)
                eos = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids)
                rows.append(Row(request, index, slot, eos, make_deltas(self.tokenizer, p), generator, admitted=now))
        for row in rows:
            self._rows[row.slot] = row
        logits = logits[torch.tensor([requests.index(row.request) for row in rows], device=self.device)]
        self._emit(rows, logits)

    @torch.inference_mode()
    def _decode(self) -> None:
        slots = sorted(self._rows)
        lengths = self.slots.lengths
        b = slots[-1] + 1
        length = max(lengths[s] for s in slots) + 1
        images = max(self.slots.images[s] for s in slots)
        tokens = [0] * b
        for s in slots:
            tokens[s] = self._rows[s].tokens[-1]
        try:
            logits = self._forward(tokens, list(lengths), b, length, images, slots)  # (B, v)
        except Exception as err:
            self._fail_running(f"{type(err).__name__}: {err}")
            return
        if slots != list(range(b)):
            logits = logits[torch.tensor(slots, device=self.device)]
        self._emit([self._rows[s] for s in slots], logits)

    def _static_step(self, b: int, length: int):
        """The fixed-shape step for b rows: batch and length rounded up to their buckets (built once each)."""
        n = self.slots.num_slots
        bucket = min(n, 1 << (b - 1).bit_length())
        span = min(self.max_model_len, -(-length // LENGTH_BUCKET) * LENGTH_BUCKET)
        key = (bucket, span)
        if key not in self._steps:
            compiled = self.config.compile is True
            fn = compiled_for(slot_decode, self.model, self.device) if compiled else slot_decode
            images = self.config.max_images_per_request

            def step(tokens: torch.Tensor) -> torch.Tensor:
                return fn(self.model, self.slots, tokens, bucket, span, images)

            if self.device.type == "cuda":
                self._steps[key] = CudaGraphStep(step, bucket, self.device)
            else:
                self._steps[key] = fast_repeat(step) if compiled else step
        step = self._steps[key]
        return lambda tokens: step(torch.nn.functional.pad(tokens, (0, bucket - b)))[:b]

    # -- rows -------------------------------------------------------------------------------------------------------
    def _emit(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Choose each row's next token from logits (rows, v), stream it, finish the rows that are done."""
        index = torch.tensor([r.slot for r in rows], device=self.device)
        constrained = [(i, r.grammar) for i, r in enumerate(rows) if r.grammar is not None]
        if constrained:  # the other rows' logits stay untouched (their bitmask rows allow everything)
            bitmask = new_bitmask(len(rows), constrained[0][1].compiler)
            fill_bitmask(bitmask, constrained)
            apply_bitmask_(logits, bitmask)
        penalised = any(r.params.repetition_penalty != 1.0 for r in rows)
        seen = self.seen[index] if penalised else None
        tokens, logprobs = choose(logits, [r.sampling() for r in rows], seen=seen, generator=self.generator)
        self.seen[index, torch.tensor(tokens, device=self.device)] = True
        now = time.perf_counter()
        with self.metrics.lock:
            self.metrics.generation_tokens_total += len(rows)
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            events = self._advance(row, token, logprobs[i] if logprobs is not None else None, now)
            row.request.stream.push(events)

    def _advance(self, row: Row, token: int, logprobs: torch.Tensor | None, now: float) -> list:
        if row.first_token is None:
            row.first_token = now
            self.metrics.observe("ttft", now - row.request.arrival_clock)
        else:
            self.metrics.observe("itl", now - row.last_token)
        row.last_token = now
        row.tokens.append(token)
        try:  # a complete structured output that nothing can extend ends the row
            complete = row.grammar is not None and token not in row.eos and row.grammar.accept(token)
        except GrammarError as err:
            return [self._finish(row, "error", now=now, error=str(err))]
        text = row.deltas.push(token) if row.deltas is not None else ""
        reason = None
        if row.deltas is not None and row.deltas.stopped or token in row.eos or complete:
            reason = "stop"
        elif len(row.tokens) >= row.params.max_tokens:
            reason = "length"
        if reason is not None and row.deltas is not None and not row.deltas.stopped:
            text += row.deltas.finish()
        row.text += text
        entry = None
        if logprobs is not None and row.params.logprobs is not None:
            chosen, top = top_logprobs(logprobs, token, row.params.logprobs)
            entry = [TokenLogprob(token, self._token_text(token), chosen,
                                  [(i, self._token_text(i), lp) for i, lp in top])]  # fmt: skip
        events = [TokenEvent(row.index, [token], text, entry)]
        if reason is not None:
            events.append(self._finish(row, reason, now=now))
        return events

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False) if self.tokenizer is not None else ""

    def _finish(self, row: Row, reason: str, *, now: float | None = None, error: str | None = None) -> FinishEvent:
        """End a running row: free its slot, count it, build its FinishEvent."""
        now = now if now is not None else time.perf_counter()
        del self._rows[row.slot]
        with self._cond:
            self._release(row.slot)
            if not any(r.request is row.request for r in self._rows.values()):
                self._running_requests -= 1
        self.metrics.finished(reason)
        self.metrics.observe("e2e", now - row.request.arrival_clock)
        req = row.request
        return FinishEvent(row.index, reason, row.text, list(row.tokens), req.prompt_tokens, len(row.tokens),
                           row.timings(now), error)  # fmt: skip

    def _finish_unstarted(self, request: Request, reason: str, *, error: str | None = None) -> None:
        now = time.perf_counter()
        timings = {"arrival": request.arrival, "queue_time": now - request.arrival_clock,
                   "e2e": now - request.arrival_clock}  # fmt: skip
        for _ in range(request.params.n):
            self.metrics.finished(reason)
        request.stream.push([FinishEvent(i, reason, "", [], request.prompt_tokens, 0, dict(timings), error)
                             for i in range(request.params.n)])  # fmt: skip
