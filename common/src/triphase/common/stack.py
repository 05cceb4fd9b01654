"""One description of a serving stack, for the three runtimes that start one: the operator (pods),
`triphase up` (processes) and the Ray Serve application (replicas).

`Stack` says what is served and how: the model, each pool's engine settings, how KV moves, the image
limits, the drain time, the routing policy. `worker_args` and `router_args` turn it into the command
lines of `triphase worker` and `triphase router` (the flags of workers/main.py and router/main.py).
What differs between runtimes (addresses and ports, discovery, where certificates are mounted, the
model's path inside a volume) the caller adds after them; nothing here knows a runtime.
"""

from __future__ import annotations

import dataclasses

from triphase.common.images import ImageLimits

SIM_TIMING = ("sim_prefill_ms", "sim_prefill_per_token_ms", "sim_decode_ms", "sim_decode_per_seq_ms")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class Engine:
    """One pool's engine settings; None leaves the worker's own default."""

    dtype: str = "bfloat16"
    engine: str = "torch"  # or "sim": the timing model, no weights
    device: str | None = None  # cpu, cuda, cuda:N, auto
    kv_cache_mib: int | None = None
    gpu_memory_fraction: float | None = None
    max_num_seqs: int | None = None
    max_batched_tokens: int | None = None
    sim: dict[str, float] = dataclasses.field(default_factory=dict)  # SIM_TIMING names -> values

    def args(self) -> list[str]:
        args = ["--dtype", self.dtype, "--engine", self.engine]
        for name in ("device", "kv_cache_mib", "gpu_memory_fraction", "max_num_seqs", "max_batched_tokens"):
            value = getattr(self, name)
            if value is not None:
                args += [_flag(name), str(value)]
        for name in SIM_TIMING:
            if name in self.sim:
                args += [_flag(name), str(self.sim[name])]
        return args


@dataclasses.dataclass(frozen=True)
class Stack:
    """What every component of one deployment agrees on."""

    model: str | None = None  # None: the bundled model
    tokenizer: str | None = None
    model_format: str | None = None
    served_name: str | None = None
    kv_transfer: str | None = None  # nixl (default) or grpc
    drain_timeout_s: float | None = None
    images: ImageLimits | None = None
    routing_policy: str | None = None

    def _model_args(self) -> list[str]:
        args: list[str] = []
        for flag, value in (("--model", self.model), ("--tokenizer", self.tokenizer),
                            ("--served-model-name", self.served_name)):
            if value:
                args += [flag, value]
        return args

    def _common_args(self) -> list[str]:
        args = self._model_args()
        if self.drain_timeout_s is not None:
            args += ["--drain-timeout", f"{self.drain_timeout_s:g}"]
        if self.images is not None:
            args += ["--image-max-bytes", str(self.images.max_bytes), "--image-max-pixels",
                     str(self.images.max_pixels), "--image-max-count", str(self.images.max_images)]
        return args

    def worker_args(self, role: str, engine: Engine) -> list[str]:
        """`triphase worker` for one worker of `role`, before the runtime's own flags."""
        args = ["worker", "--role", role, *engine.args(), *self._common_args()]
        if self.model_format:
            args += ["--model-format", self.model_format]
        if self.kv_transfer:
            args += ["--kv-transfer", self.kv_transfer]
        return args

    def router_args(self) -> list[str]:
        """`triphase router`, before the runtime's own flags (discovery, addresses, certificates)."""
        args = ["router", *self._common_args()]
        if self.routing_policy:
            args += ["--routing-policy", self.routing_policy]
        return args
