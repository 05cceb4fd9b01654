"""The application's arguments (`args:` in a Serve config file, `serveConfigV2` of a RayService).

The shape follows Ray Serve LLM's `LLMConfig` where it fits: `model_loading_config` (model_id: the
name clients send; model_source: a GGUF file or Hugging Face directory on every node),
`engine_kwargs` (the engine's settings), `deployment_config` (the worker deployment's Serve options:
num_replicas, ray_actor_options, max_ongoing_requests, graceful_shutdown_timeout_s, ...), and
triphase's own: `slo`, `role_switching`, `autoscaling`, `kv_transfer`, `mtls`. Every field is checked
before anything starts; a wrong one is named with its path.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from triphase.common.stack import SIM_TIMING, Engine, Stack

# Serve options we set ourselves (the autoscaling policy, the role state) and so refuse from the user.
OWNED = {"autoscaling_config": "set `autoscaling` instead: its policy is triphase's planner",
         "user_config": "not used by triphase's deployments"}
INGRESS_ONGOING = 256 + 1024  # the router's default --max-in-flight + --max-queued
# What a replica of each deployment asks Ray for unless ray_actor_options says otherwise.
DEFAULT_ACTOR_OPTIONS = {"worker": {"num_cpus": 1}, "ingress": {"num_cpus": 1}, "control": {"num_cpus": 0}}


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelLoading(_Args):
    model_id: str | None = Field(default=None, min_length=1, max_length=256,
                                 description="the `model` clients send (default: the file's name)")
    model_source: str | None = Field(default=None, min_length=1, max_length=4096,
                                     description="GGUF file or Hugging Face directory, at this path on every node "
                                                 "(default: the bundled SmolLM2-135M)")
    tokenizer_source: str | None = Field(default=None, min_length=1, max_length=4096)


class EngineKwargs(_Args):
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    engine: Literal["torch", "sim"] = "torch"
    device: str | None = Field(default=None, pattern=r"^(auto|cpu|cuda(:[0-9]{1,2})?)$",
                               description="default: the GPU Ray gave the replica (num_gpus), else the CPU")
    kv_cache_mib: int | None = Field(default=None, ge=1, le=1 << 20)
    gpu_memory_fraction: float | None = Field(default=None, gt=0, le=1)
    max_num_seqs: int | None = Field(default=None, ge=1, le=4096)
    max_batched_tokens: int | None = Field(default=None, ge=16, le=1 << 20)
    sim: dict[str, float] = Field(default_factory=dict, description=f"sim engine timing: {', '.join(SIM_TIMING)}")

    @model_validator(mode="after")
    def _sim(self) -> EngineKwargs:
        unknown = set(self.sim) - set(SIM_TIMING)
        if unknown:
            raise ValueError(f"sim: unknown {sorted(unknown)}; known: {', '.join(SIM_TIMING)}")
        if self.sim and self.engine != "sim":
            raise ValueError("sim timing needs engine: sim")
        if any(not 0 <= v <= 60_000 for v in self.sim.values()):
            raise ValueError("sim timings are milliseconds in [0, 60000]")
        return self


class Slo(_Args):
    ttft_seconds: float = Field(default=2.0, gt=0, le=3600)
    tpot_seconds: float = Field(default=0.1, gt=0, le=60)
    percentile: float = Field(default=90, ge=50, le=99.99)


class RoleSwitching(_Args):
    enabled: bool = True
    max_switches_per_minute: int = Field(default=6, ge=1, le=600)
    min_per_role: int = Field(default=1, ge=0, le=1024)
    cooldown_seconds: float = Field(default=30.0, ge=0, le=3600)
    grace_seconds: float = Field(default=5.0, ge=0, le=600)


class Autoscaling(_Args):
    """The worker deployment's size from the planner's model (autoscaling.py); off: num_replicas."""

    enabled: bool = False
    min_replicas: int = Field(default=2, ge=1, le=1024)
    max_replicas: int = Field(default=8, ge=1, le=1024)
    interval_seconds: float = Field(default=10.0, ge=1, le=3600, description="how often the policy decides")
    stabilization_seconds: float = Field(default=60.0, ge=0, le=3600,
                                         description="a decrease must be recommended this long")

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class AppArgs(_Args):
    model_loading_config: ModelLoading = Field(default_factory=ModelLoading)
    engine_kwargs: EngineKwargs = Field(default_factory=EngineKwargs)
    deployment_config: dict[str, Any] = Field(default_factory=lambda: {"num_replicas": 2},
                                              description="the worker deployment's Serve options")
    ingress_deployment_config: dict[str, Any] = Field(default_factory=dict,
                                                      description="the OpenAI ingress deployment's Serve options")
    prefill_share: float = Field(default=0.5, gt=0, lt=1,
                                 description="the share of prefill among new workers' first roles")
    slo: Slo = Field(default_factory=Slo)
    role_switching: RoleSwitching = Field(default_factory=RoleSwitching)
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    kv_transfer: Literal["nixl", "grpc"] = "nixl"
    mtls: bool = Field(default=True, description="mTLS between the replicas with certificates of a CA made when "
                                                 "the application starts (its bundles travel over Ray's RPC)")
    routing_policy: Literal["kv-aware", "least-loaded", "round-robin"] = "kv-aware"
    drain_timeout_seconds: float = Field(default=30.0, ge=0, le=3600,
                                         description="on scale-down or shutdown: seconds a worker's streams may "
                                                     "take to finish before they are handed over")
    bind_host: str | None = Field(default=None, max_length=253,
                                  description="the address replicas listen on (default: the node's Ray address)")

    @model_validator(mode="after")
    def _deployments(self) -> AppArgs:
        for field in ("deployment_config", "ingress_deployment_config"):
            for key, why in OWNED.items():
                if key in getattr(self, field):
                    raise ValueError(f"{field}.{key}: {why}")
        replicas = self.deployment_config.get("num_replicas", 2)
        if not isinstance(replicas, int) or not 1 <= replicas <= 1024:
            raise ValueError("deployment_config.num_replicas must be a whole number in [1, 1024]")
        return self

    @classmethod
    def parse(cls, args: dict[str, Any] | None) -> AppArgs:
        """The arguments, or ValueError naming each wrong field by its path."""
        try:
            return cls.model_validate(args or {})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'args'}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"triphase.rayserve arguments: {problems}") from None

    @property
    def min_workers(self) -> int:
        if self.autoscaling.enabled:
            return self.autoscaling.min_replicas
        return int(self.deployment_config.get("num_replicas", 2))

    def stack(self) -> Stack:
        model = self.model_loading_config
        return Stack(model=model.model_source, tokenizer=model.tokenizer_source, served_name=model.model_id,
                     kv_transfer=self.kv_transfer, drain_timeout_s=self.drain_timeout_seconds,
                     routing_policy=self.routing_policy)

    def engine(self) -> Engine:
        kw = self.engine_kwargs
        return Engine(dtype=kw.dtype, engine=kw.engine, device=kw.device, kv_cache_mib=kw.kv_cache_mib,
                      gpu_memory_fraction=kw.gpu_memory_fraction, max_num_seqs=kw.max_num_seqs,
                      max_batched_tokens=kw.max_batched_tokens, sim=dict(kw.sim))

    def options(self, deployment: str) -> dict[str, Any]:
        """The Serve options of `deployment` (worker, ingress, control)."""
        given = {"worker": self.deployment_config, "ingress": self.ingress_deployment_config}.get(deployment, {})
        options = dict(given)
        options["ray_actor_options"] = {**DEFAULT_ACTOR_OPTIONS[deployment], **given.get("ray_actor_options", {})}
        if deployment == "ingress":
            # Serve queues what exceeds this in its proxy (default 5, where a request is a whole stream);
            # the router admits up to its --max-in-flight and queues --max-queued itself, answering 429
            # beyond, so Serve lets all of those through.
            options.setdefault("max_ongoing_requests", INGRESS_ONGOING)
        if deployment == "control":  # heartbeats and discovery, several a second: not worth a log line each
            options.setdefault("logging_config", {"enable_access_log": False})
            options.setdefault("max_ongoing_requests", 1000)  # short calls; every worker beats at once
        if deployment in ("worker", "ingress"):
            # Serve waits this long for a stopping replica's requests (the ingress) or its __del__ (a
            # worker drains its streams there) before it kills the replica.
            options.setdefault("graceful_shutdown_timeout_s", self.drain_timeout_seconds + 15)
        if deployment == "worker":
            options.setdefault("health_check_period_s", 5)
            if self.autoscaling.enabled:
                options.pop("num_replicas", None)
                options["autoscaling_config"] = self.autoscaling_config()
        return options

    def autoscaling_config(self) -> dict[str, Any]:
        """Serve's autoscaling_config for the workers: triphase's policy (autoscaling.py) within the bounds;
        no delays of Serve's own (the planner's stabilization holds decreases back)."""
        scaling = self.autoscaling
        return {"min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
                "initial_replicas": scaling.min_replicas, "upscale_delay_s": 0, "downscale_delay_s": 0,
                "policy": {"policy_function": "triphase.rayserve.autoscaling:SloPolicy",
                           "policy_kwargs": {"ttft_seconds": self.slo.ttft_seconds,
                                             "tpot_seconds": self.slo.tpot_seconds,
                                             "interval_s": scaling.interval_seconds,
                                             "stabilization_s": scaling.stabilization_seconds}}}
