"""The engine: step = schedule -> run -> update, plus stop checks, streaming output and KV hand-off.

Single-threaded by design: callers (the CLI, tests, the gRPC worker) drive `step()` from one
thread. Export/import is the seed of disaggregation: a prefill-only request keeps its blocks
pinned after its first token is sampled; another engine imports those blocks and decodes on.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from triphase.common.errors import UserError
from triphase.common.models.files import tokenizer_override
from triphase.common.models.tokenizer import Tokenizer
from triphase.common.models.vision import VisionConfig
from triphase.common.sampling import choice_seed
from triphase.workers.engine.block_pool import NoFreeBlocks
from triphase.workers.engine.detokenizer import IncrementalDetokenizer
from triphase.workers.engine.device import (
    DEFAULT_CPU_KV_MIB,
    check_fraction,
    gpu_kv_bytes,
    parse_device,
    resolve_device,
    step_reserve_bytes,
)
from triphase.workers.engine.grammar import Grammars
from triphase.workers.engine.kv_cache_manager import KVCacheManager, cdiv
from triphase.workers.engine.kv_layout import KvLayout
from triphase.workers.engine.model_runner import TORCH_DTYPES, ModelRunner
from triphase.workers.engine.multimodal import ImageInput, check_images
from triphase.workers.engine.rates import StepRates
from triphase.workers.engine.request import Request, RequestStatus
from triphase.workers.engine.sampling import SamplingParams
from triphase.workers.engine.scheduler import ScheduledRequest, Scheduler, SchedulerConfig
from triphase.workers.models.config import ModelConfig
from triphase.workers.models.decoder import DecoderModel
from triphase.workers.models.image_processing import ImageProcessor
from triphase.workers.models.loader import LoadedModel, load_model
from triphase.workers.models.vision import VisionEncoder

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: derived from kv_cache_bytes
    # None: DEFAULT_CPU_KV_MIB on the CPU; on a GPU, gpu_memory_fraction of what the weights leave free
    kv_cache_bytes: int | None = 1 << 30
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # None: the model's context length
    dtype: str = "float32"
    enable_prefix_caching: bool = True
    prefix_salt: bytes = b""  # the deployment's: salts the prefix-cache block hashes (block_hash.salted_root)
    # "dense": every matrix in `dtype`. "int4": also keep a GGUF file's Q4_0/Q4_1 matrices packed and
    # use them for steps of at most int4_max_tokens tokens (needs dtype bfloat16). "auto": int4 when
    # dtype is bfloat16 and the file has such matrices, else dense.
    weights: str = "dense"
    int4_max_tokens: int = 16  # measured crossover with dense bfloat16: ~20 rows (BENCHMARKS.md)
    device: str = "cpu"  # auto, cpu, cuda, cuda:N (engine/device.py)
    gpu_memory_fraction: float = 0.9

    def __post_init__(self) -> None:
        parse_device(self.device)
        check_fraction(self.gpu_memory_fraction)
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise UserError("the KV cache size must be positive")
        if self.dtype not in TORCH_DTYPES:
            raise UserError(f"unsupported dtype {self.dtype!r} (choose from {', '.join(TORCH_DTYPES)})")
        if self.weights not in ("dense", "int4", "auto"):
            raise UserError(f"unsupported weights mode {self.weights!r} (choose dense, int4 or auto)")
        if self.weights == "int4" and self.dtype != "bfloat16":
            raise UserError("int4 weights compute in bfloat16: use dtype bfloat16")
        if self.block_size < 1 or self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise UserError("block_size, max_num_batched_tokens and max_num_seqs must be positive")


def kv_layout_for(cfg: ModelConfig, config: EngineConfig, kv_bytes: int | None = None) -> KvLayout:
    """The KV tensor for a model: `num_kv_blocks`, or as many blocks as `kv_bytes` (default: the
    config's `kv_cache_bytes`, else the CPU default) holds."""
    one = KvLayout(1, cfg.num_hidden_layers, config.block_size, cfg.num_key_value_heads, cfg.head_dim, config.dtype)
    budget = kv_bytes or config.kv_cache_bytes or DEFAULT_CPU_KV_MIB << 20
    num_blocks = config.num_kv_blocks or max(1, budget // one.block_bytes)
    return dataclasses.replace(one, num_blocks=num_blocks)


def _kv_bytes(cfg: ModelConfig, config: EngineConfig, device: torch.device) -> int | None:
    """The KV budget: the config's, or on a GPU what the fraction of its free memory leaves."""
    if config.num_kv_blocks is not None or config.kv_cache_bytes is not None or device.type == "cpu":
        return config.kv_cache_bytes
    free, _ = torch.cuda.mem_get_info(device)
    reserve = step_reserve_bytes(max_batched_tokens=config.max_num_batched_tokens, max_num_seqs=config.max_num_seqs,
                                 hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                                 vocab_size=cfg.vocab_size, compute_bytes=TORCH_DTYPES[config.dtype].itemsize)
    return gpu_kv_bytes(free_bytes=free, fraction=config.gpu_memory_fraction, reserve_bytes=reserve)


def _int4(config: EngineConfig, device: torch.device) -> bool:
    """Whether to run GGUF 4-bit matrices packed. The packed kernel is the CPU one: on a GPU the weights
    are dequantized to the compute dtype at load (auto), and asking for int4 is an error."""
    if device.type != "cpu":
        if config.weights == "int4":
            raise UserError(f"int4 weights run on the CPU only; on {device} use --weights dense or auto "
                            "(dequantized to the compute dtype at load)")
        return False
    return config.weights == "int4" or (config.weights == "auto" and config.dtype == "bfloat16")


class StepFailed(Exception):
    """A step could not be computed; its requests were aborted and their blocks freed."""

    def __init__(self, request_ids: list[str], cause: Exception) -> None:
        super().__init__(f"step failed for {len(request_ids)} requests: {type(cause).__name__}: {cause}")
        self.request_ids = request_ids
        self.cause = cause


@dataclasses.dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None  # "stop", "length", "abort"
    logprobs: list[dict[int, float]] | None = None
    cached_tokens: int = 0  # on a request's first output: prompt tokens served by the prefix cache
    stop_reason: str | int | None = None  # when finished by a stop string or stop token: which one
    index: int = 0  # the choice (of SamplingParams.n) this output belongs to; `finished` is the choice's
    prompt_logprobs: list[dict[int, float]] | None = None  # on the first output, when asked for
    done: bool = False  # the request has ended: every one of its choices finished


@dataclasses.dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    num_cached_tokens: int
    ttft_s: float
    e2e_s: float
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float]] | None = None


@dataclasses.dataclass
class KvExport:
    """A prefilled request's KV, ready to move: metadata plus (for in-process or stream transfer) data."""

    request_id: str
    layout: KvLayout
    block_ids: list[int]  # in the source engine's tensor, in token order
    num_tokens: int  # tokens whose KV the blocks hold (the prompt)
    first_token_id: int
    first_logprobs: dict[int, float] | None = None
    data: torch.Tensor | None = None  # [len(block_ids), *block shape] when copied out


class Engine:
    # set for a model that takes images
    vision_config: VisionConfig | None = None
    vision: VisionEncoder | None = None
    image_processor: ImageProcessor | None = None

    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None) -> None:
        config = config or EngineConfig()
        cfg = loaded.config
        device = resolve_device(config.device)
        int4 = _int4(config, device) and bool(loaded.quantized)
        if config.weights == "int4" and not loaded.quantized:
            raise UserError("int4 weights need a GGUF file with Q4_0/Q4_1 matrices, loaded with keep_quantized")
        model = DecoderModel(cfg, loaded.weights, TORCH_DTYPES[config.dtype], loaded.quantized if int4 else None,
                             config.int4_max_tokens if int4 else 0, device=device)
        layout = kv_layout_for(cfg, config, _kv_bytes(cfg, config, device))
        self._setup(cfg, loaded.tokenizer, loaded.path, config, ModelRunner(model, layout))
        if loaded.vision is not None and loaded.image_processor is not None:
            self.vision_config = loaded.vision
            # float32 whatever the language model's dtype: the tower is small, and on CPU torch's bfloat16
            # convolutions run ~20x slower than float32 (MobileNetV2: 1.19 s vs 61 ms an image)
            tower = {k: v.to(device) for k, v in loaded.weights.items() if k.startswith(("vision.", "projector."))}
            self.vision = VisionEncoder(loaded.vision, tower, torch.float32)
            self.image_processor = loaded.image_processor
        logger.info("Engine on %s in %s (%s weights): %d KV blocks, %.0f MiB", self.device, config.dtype,
                    "int4" if int4 else "dense", layout.num_blocks, layout.total_bytes / 2**20)

    def _setup(self, cfg: ModelConfig, tokenizer: Tokenizer, path: str, config: EngineConfig,
               runner: ModelRunner) -> None:
        """Everything but the model: bookkeeping around `runner` (the torch model or a simulator)."""
        self.config = config
        self.model_config = cfg
        self.tokenizer = tokenizer
        self.model_path = path
        self.runner = runner
        self.model = runner.model
        self.device = runner.device
        self.layout = runner.layout
        self.kv = KVCacheManager(self.layout.num_blocks, config.block_size,
                                 enable_prefix_caching=config.enable_prefix_caching, prefix_salt=config.prefix_salt,
                                 sliding_window=cfg.uniform_window)
        max_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, max_len),
                                   self.kv)
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._choices: dict[str, list[Request]] = {}  # a request with n > 1: its choices still running
        self._stop_ids = frozenset(cfg.eos_token_ids) | frozenset(self.tokenizer.eos_token_ids)
        runner.stop_ids = self._stop_ids
        self.grammars = Grammars(self.tokenizer, cfg.vocab_size, sorted(self._stop_ids))
        self.num_steps = 0
        self.rates = StepRates()
        self._batches = itertools.count()

    @classmethod
    def from_path(cls, path: str | None = None, config: EngineConfig | None = None,
                  progress: Callable[..., Iterable[Any]] | None = None, tokenizer: str | None = None) -> Engine:
        """Load the model at `path` (None: the bundled one); `tokenizer` replaces its own
        (model_files.tokenizer_override)."""
        config = config or EngineConfig()
        kwargs = {"progress": progress} if progress is not None else {}
        keep = _int4(config, resolve_device(config.device))
        loaded = load_model(path, dtype=TORCH_DTYPES[config.dtype], keep_quantized=keep, **kwargs)
        if tokenizer is not None:
            loaded.tokenizer = tokenizer_override(tokenizer, loaded.tokenizer)
        return cls(loaded, config)

    @property
    def max_model_len(self) -> int:
        """Longest prompt + output: the context length, or the KV capacity if smaller."""
        return self.scheduler.max_len

    # ------------------------------------------------------------------ images
    @property
    def image_token_id(self) -> int | None:
        return self.vision_config.image_token_id if self.vision_config is not None else None

    def encode_images(self, images: Sequence[Any]) -> list[torch.Tensor]:
        """Embeddings [tokens_per_image, hidden] for each decoded RGB image (PIL), in host memory (the
        embedding cache and the wire hold them there); the tower runs on the engine's device."""
        if self.vision is None or self.image_processor is None:
            raise ValueError("this model takes no images")
        if not images:
            return []
        pixels = self.image_processor(images).to(self.device)
        return list(self.vision(pixels).to(TORCH_DTYPES[self.config.dtype]).cpu())

    def _check_images(self, token_ids: Sequence[int], images: Sequence[ImageInput], need_embeds: bool) -> None:
        check_images(token_ids, images, self.image_token_id, self.model_config.hidden_size, need_embeds)

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt_token_ids: Sequence[int], sampling: SamplingParams,
                    *, prefill_only: bool = False, output_offset: int = 0,
                    images: Sequence[ImageInput] = ()) -> Request:
        """Queue a request; raises ValueError for one that can never run (too long, empty).
        `output_offset`: the prompt ends with that many tokens another worker already generated for
        this request (a resumed request), so seeded sampling continues at the right index.
        `images`: the prompt's image placeholder runs with their embeddings."""
        if self.scheduler.find(request_id) is not None:
            raise ValueError(f"request {request_id!r} already exists")
        request = Request(request_id, prompt_token_ids, sampling, prefill_only=prefill_only,
                          images=[i.span for i in images], image_embeds=[i.embeds for i in images])
        self.scheduler.check(request)  # the length first: the checks below cost time per token
        if not 0 <= output_offset < request.num_prompt_tokens:
            raise ValueError(f"resumed output tokens ({output_offset}) must be fewer than the prompt's tokens")
        request.output_offset = output_offset
        self._check_token_ids(request.prompt_token_ids, "prompt")
        self._check_images(request.prompt_token_ids, images, need_embeds=True)
        self._check_sampling(sampling)
        if sampling.grammar:
            request.constraint = self.grammars.matcher(sampling.grammar, request.prompt_token_ids[
                request.num_prompt_tokens - output_offset :] if output_offset else ())
        self.scheduler.add(request)
        detok = self._detok[request_id] = IncrementalDetokenizer(self.tokenizer, sampling.stop)
        if output_offset:  # a resumed request: its text continues where the other worker's stopped
            detok.prime(request.prompt_token_ids[-output_offset:])
        return request

    def _check_sampling(self, sampling: SamplingParams) -> None:
        self._check_token_ids(sampling.stop_token_ids, "stop_token_ids")
        self._check_token_ids([t for t, _ in sampling.logit_bias], "logit_bias")

    def _check_token_ids(self, token_ids: Sequence[int], what: str) -> None:
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"{what} contains token ids outside the vocabulary (0..{vocab - 1})")

    def abort(self, request_id: str) -> bool:
        """Stop a request (every choice of it) and free its blocks at once (pinned ones included)."""
        choices = self._choices.pop(request_id, None)
        if choices:
            for choice in choices:
                if choice.index and self.scheduler.find(choice.request_id) is choice:
                    self.scheduler.finish(choice, RequestStatus.FINISHED_ABORTED)
                    self._detok.pop(choice.request_id, None)
        if self.scheduler.release(request_id):
            return True
        request = self.scheduler.find(request_id)
        if request is None:
            return False
        self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        self._detok.pop(request_id, None)
        return True

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[RequestOutput]:
        """One scheduler step: returns outputs for requests that produced a token or ended.

        If computing the step fails (the model, the sampler or a stop check raises), every request
        of the step is aborted (its blocks freed) and `StepFailed` names them; the other requests
        and the bookkeeping are intact, so the engine can go on stepping."""
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return []
        try:
            started = time.monotonic()
            samples = self.runner.execute(plan)
            self.rates.record(plan, time.monotonic() - started)
            self.num_steps += 1
            advanced = self.scheduler.update(plan, {rid: s.token_id for rid, s in samples.items()})
            now = time.monotonic()
            outputs = []
            for request in advanced:
                sample = samples[request.request_id]
                if sample.logprobs is not None:
                    request.logprobs.append(sample.logprobs)
                if request.constraint is not None and not request.constraint.consume(sample.token_id):
                    logger.error("%s: token %d does not follow its grammar", request.request_id, sample.token_id)
                if request.sampling.n > 1 and request.num_output_tokens == 1 and not request.prefill_only \
                        and request.index == 0:
                    self._fork(request)
                if request.first_token_time is None:
                    request.first_token_time = now
                outputs.append(self._emit(request, sample.token_id, sample.logprobs))
        except Exception as exc:
            failed = list(dict.fromkeys(item.request.parent_id for item in plan.scheduled))
            for request_id in failed:
                self.abort(request_id)
            raise StepFailed(failed, exc) from exc
        return outputs

    def _emit(self, request: Request, token: int, logprobs: dict[int, float] | None) -> RequestOutput:
        detok = self._detok[request.request_id]
        params = request.sampling
        reason: str | None = None
        text, matched = detok.add(token)
        if matched is not None:
            reason, request.stop_reason = "stop", matched
        elif token in params.stop_token_ids or (token in self._stop_ids and not params.ignore_eos):
            reason, request.stop_reason = "stop", token
        elif request.constraint is not None and (request.constraint.done or request.constraint.failed):
            reason = "stop"  # the grammar is complete: nothing may follow
        elif request.num_output_tokens >= params.max_tokens or request.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            text += detok.flush()
        prompt_logprobs = request.prompt_logprobs or None if request.num_output_tokens == 1 else None
        if request.prefill_only:
            self.scheduler.finish(request, RequestStatus.PREFILLED)
            return RequestOutput(request.request_id, [token], text, True, reason, [logprobs] if logprobs else None,
                                 request.num_cached_tokens, request.stop_reason, done=True,
                                 prompt_logprobs=prompt_logprobs)
        done = reason is not None
        if done:
            status = RequestStatus.FINISHED_STOPPED if reason == "stop" else RequestStatus.FINISHED_LENGTH
            self.scheduler.finish(request, status)
            self._detok.pop(request.request_id, None)
            choices = self._choices.get(request.parent_id)
            if choices is not None:
                choices.remove(request)
                done = not choices
                if done:
                    del self._choices[request.parent_id]
        cached = request.num_cached_tokens if request.num_output_tokens == 1 else 0
        return RequestOutput(request.parent_id, [token], text, reason is not None, reason,
                             [logprobs] if logprobs else None, cached, request.stop_reason, index=request.index,
                             done=done, prompt_logprobs=prompt_logprobs if request.index == 0 else None)

    def _fork(self, parent: Request) -> None:
        """Choices 1..n-1 of a request whose prompt is computed and whose first token (choice 0's) was
        just drawn: each shares the prompt's blocks (KVCacheManager.fork) and draws its own first token
        from the prompt's last position in the next step. Without a free block, a choice is queued as
        a new request instead (the prefix cache still shares the prompt's full blocks)."""
        choices = self._choices[parent.request_id] = [parent]
        for index in range(1, parent.sampling.n):
            sampling = dataclasses.replace(parent.sampling, n=1, seed=choice_seed(parent.sampling.seed, index))
            child = Request(f"{parent.request_id}#{index}", parent.prompt_token_ids, sampling,
                            images=parent.images, image_embeds=parent.image_embeds)
            child.parent_id, child.index, child.output_offset = parent.request_id, index, parent.output_offset
            if sampling.grammar:
                child.constraint = self.grammars.matcher(sampling.grammar)
            self._detok[child.request_id] = IncrementalDetokenizer(self.tokenizer, sampling.stop)
            choices.append(child)
            try:
                copy = self.kv.fork(parent, child)
            except NoFreeBlocks:
                self.scheduler.add(child)
                continue
            if copy is not None:
                self.runner.copy_blocks_from(self.runner, [copy[0]], [copy[1]])
            child.num_cached_tokens = parent.num_cached_tokens
            child.first_token_time = None
            self.scheduler.add_running(child)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams | Sequence[SamplingParams],
                 images: Sequence[Sequence[ImageInput]] | None = None) -> list[Completion]:
        """Run prompts to completion together (continuous batching); results in prompt order.
        `images`: each prompt's images, when there are any."""
        params = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
        if any(p.n > 1 for p in params):
            raise ValueError("generate() runs one choice per prompt; give requests with n > 1 to add_request")
        per_prompt = list(images) if images is not None else [()] * len(prompts)
        batch = next(self._batches)
        ids = [f"gen-{batch}-{i}" for i in range(len(prompts))]
        requests = {rid: self.add_request(rid, p, sp, images=im)
                    for rid, p, sp, im in zip(ids, prompts, params, per_prompt, strict=True)}
        texts = dict.fromkeys(ids, "")
        reasons: dict[str, str] = {}
        while len(reasons) < len(ids):
            for out in self.step():
                texts[out.request_id] += out.new_text
                if out.finished:
                    reasons[out.request_id] = out.finish_reason or "stop"
        done = time.monotonic()
        return [self._completion(requests[rid], texts[rid], reasons[rid], done) for rid in ids]

    @staticmethod
    def _completion(request: Request, text: str, reason: str, done: float) -> Completion:
        first = request.first_token_time or done
        return Completion(
            request.request_id, request.prompt_token_ids, request.output_token_ids, text, reason,
            request.num_cached_tokens, first - request.arrival_time, done - request.arrival_time,
            request.logprobs or None, request.prompt_logprobs or None,
        )

    def prompt_logits(self, token_ids: Sequence[int], chunk_size: int | None = None,
                      images: Sequence[ImageInput] = ()) -> torch.Tensor:
        """Teacher-forced float32 logits at every position [len(token_ids), vocab], computed through
        the paged cache in chunks of `chunk_size` tokens (default: the step budget)."""
        request = Request(f"score-{next(self._batches)}", token_ids, SamplingParams(max_tokens=1, temperature=0),
                          images=[i.span for i in images], image_embeds=[i.embeds for i in images])
        self.scheduler.check(request)
        self._check_images(token_ids, images, need_embeds=True)
        chunk = chunk_size or self.config.max_num_batched_tokens
        rows = []
        try:
            while request.num_computed_tokens < request.num_tokens:
                n = min(chunk, request.num_tokens - request.num_computed_tokens)
                if not self.kv.allocate_slots(request, n):
                    raise MemoryError("not enough free KV blocks to score this prompt")
                item = ScheduledRequest.of(request, n, self.kv.block_ids(request.request_id))
                rows.append(self.runner.logits(item))
                request.num_computed_tokens += n
        finally:
            self.kv.free(request.request_id)
        return torch.cat(rows)

    # ------------------------------------------------------------------ KV hand-off
    def prefill(self, request_id: str, prompt_token_ids: Sequence[int], sampling: SamplingParams,
                images: Sequence[ImageInput] = ()) -> KvExport:
        """Prefill only (stepping the engine until done) and describe the pinned KV for export."""
        request = self.add_request(request_id, prompt_token_ids, sampling, prefill_only=True, images=images)
        while request.status is not RequestStatus.PREFILLED:
            if request.status.finished:
                raise RuntimeError(f"request {request_id} ended during prefill ({request.status.value})")
            self.step()
        return self.export_kv(request_id)

    def export_kv(self, request_id: str, *, with_data: bool = False) -> KvExport:
        request = self.scheduler.pinned.get(request_id)
        if request is None:
            raise KeyError(f"no prefilled request {request_id!r} is pinned here")
        block_ids = self.kv.block_ids(request_id)[: cdiv(request.num_prompt_tokens, self.layout.block_size)]
        export = KvExport(request_id, self.layout, block_ids, request.num_prompt_tokens,
                          request.output_token_ids[0], request.logprobs[0] if request.logprobs else None)
        if with_data:
            export.data = self.runner.read_blocks(block_ids)
        return export

    def release_kv(self, request_id: str) -> bool:
        """The receiver has the blocks: unpin and free them."""
        self._detok.pop(request_id, None)
        return self.scheduler.release(request_id)

    def import_kv(self, request_id: str, prompt_token_ids: Sequence[int], sampling: SamplingParams,
                  export: KvExport, source: Engine | None = None,
                  images: Sequence[ImageInput] = ()) -> tuple[Request, RequestOutput]:
        """Adopt another engine's prefill: allocate blocks, copy the KV in (from `export.data`, or
        block-to-block from `source` in the same process), and decode from the next step on.
        `images`: the prompt's image spans (embeddings not needed: the KV holds them)."""
        if export.data is None and source is None:
            raise ValueError("the export carries no data and no source engine was given")
        request, dst = self.reserve_import(request_id, prompt_token_ids, sampling, export, images)
        # `dst` may cover only the live tail of the blocks (a sliding window: see KVCacheManager)
        if export.data is not None:
            self.runner.write_blocks(dst, export.data[len(export.block_ids) - len(dst):])
        elif source is not None:
            self.runner.copy_blocks_from(source.runner, export.block_ids[len(export.block_ids) - len(dst):], dst)
        return request, self.commit_import(request, export)

    def reserve_import(self, request_id: str, prompt_token_ids: Sequence[int], sampling: SamplingParams,
                       export: KvExport, images: Sequence[ImageInput] = ()) -> tuple[Request, list[int]]:
        """First half of an import: allocate blocks for the incoming KV; returns the blocks to fill, the
        last len(dst) of `export.block_ids` (all but those out of a sliding window). The request does
        not run until `commit_import`; a transport (NIXL) may write the blocks in between, from any
        thread, since no other request touches them. `cancel_import` frees them if the transfer fails."""
        request = self.check_import(request_id, prompt_token_ids, sampling, export, images)
        dst = self.kv.adopt_imported(request, export.num_tokens)
        if dst is None:
            raise MemoryError(f"no room for {len(export.block_ids)} KV blocks")
        return request, dst

    def check_import(self, request_id: str, prompt_token_ids: Sequence[int], sampling: SamplingParams,
                     export: KvExport, images: Sequence[ImageInput] = ()) -> Request:
        """Everything an import must satisfy before a block is allocated or a byte moved: raises
        ValueError for a description that does not fit this engine (layout, token and block counts,
        token ids outside the vocabulary, a prompt that could never run)."""
        if not self.layout.compatible_with(export.layout):
            raise ValueError("KV layouts differ between the engines")
        if export.num_tokens != len(prompt_token_ids):
            raise ValueError(f"export holds {export.num_tokens} tokens, prompt has {len(prompt_token_ids)}")
        if len(export.block_ids) != cdiv(export.num_tokens, self.layout.block_size):
            raise ValueError(f"{len(export.block_ids)} KV blocks cannot hold exactly {export.num_tokens} tokens "
                             f"of {self.layout.block_size} per block")
        if self.scheduler.find(request_id) is not None or self.kv.owns(request_id):
            raise ValueError(f"request {request_id!r} already exists")
        request = Request(request_id, prompt_token_ids, sampling, images=[i.span for i in images])
        self.scheduler.check(request)
        self._check_token_ids(request.prompt_token_ids, "prompt")
        self._check_images(request.prompt_token_ids, images, need_embeds=False)
        self._check_token_ids([export.first_token_id], "first_token_id")
        self._check_sampling(sampling)
        if sampling.grammar:  # the prefill worker drew the first token under it: continue from there
            request.constraint = self.grammars.matcher(sampling.grammar, [export.first_token_id])
        return request

    def cancel_import(self, request_id: str) -> None:
        self.kv.free(request_id)

    def commit_import(self, request: Request, export: KvExport) -> RequestOutput:
        """Second half: the blocks hold the KV; the request decodes from the next step on. Returns the
        output for the prefill's first token (which may already end the request)."""
        request.num_computed_tokens = export.num_tokens
        request.append_token(export.first_token_id)
        if export.first_logprobs is not None:
            request.logprobs.append(export.first_logprobs)
        self.kv.cache_computed_blocks(request)
        self._detok[request.request_id] = IncrementalDetokenizer(self.tokenizer, request.sampling.stop)
        self.scheduler.add_running(request)
        request.first_token_time = time.monotonic()
        if request.sampling.n > 1:
            self._fork(request)
        return self._emit(request, export.first_token_id, None)
