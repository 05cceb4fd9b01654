"""The triphase.dev/v1alpha1 API: ServingDeployment and ServingPool, as pydantic models.

These models are the source of truth. `crd.py` renders them into the CustomResourceDefinitions under
deploy/crds/ (structural schemas, descriptions for `kubectl explain`, enums, bounds and CEL rules that
the API server enforces), and the operator parses every object it reads with them.

Who writes what (exactly one writer per field):
- ServingDeployment.spec: the user. .status: the operator.
- ServingPool.spec.replicas: the operator sets it when it creates the pool (from the deployment's pool
  replicas) and afterwards only `kubectl scale`, an HPA/KEDA or the planner change it; the operator
  never overwrites it. ServingPool.spec.role / .deployment: the operator. ServingPool.status: the operator.
- Pod label `triphase.dev/role`: the role the pod was created with (operator); the role a worker reports
  at runtime is what pools are counted by (router/worker), so a runtime role switch is never undone.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

from triphase.common import labels

GROUP = "triphase.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
POOL_ROLES = ("encode", "prefill", "decode")


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


def _free_form(description: str) -> Any:
    return Field(default=None, description=description,
                 json_schema_extra={"type": "object", "x-kubernetes-preserve-unknown-fields": True})


# ------------------------------------------------------------------------------ model
class ModelSource(_Model):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "self.source != 'path' || has(self.path)", "message": "source path needs path"},
        {"rule": "self.source != 'pvc' || has(self.pvc)", "message": "source pvc needs pvc (a claim name)"},
        {"rule": "self.source != 'image' || has(self.image)", "message": "source image needs image"},
    ]})

    source: Literal["bundled", "path", "pvc", "image"] = Field(
        description="Where the weights come from: the model bundled in the image, a path in the container, "
                    "a PersistentVolumeClaim, or an OCI image mounted as a volume.")
    path: str | None = Field(default=None, description="File or directory of the model (inside the volume for "
                                                       "pvc and image sources).", max_length=4096)
    pvc: str | None = Field(default=None, description="Name of the PersistentVolumeClaim holding the model.",
                            max_length=253)
    image: str | None = Field(default=None, description="OCI image reference holding the model files.",
                              max_length=1024)
    format: Literal["gguf", "safetensors"] | None = Field(
        default=None, description="File format the model must have: a GGUF file (gguf) or a directory of "
                                  "*.safetensors files; workers refuse to start on anything else. Default: either.")
    tokenizer: str | None = Field(default=None, description="A tokenizer.json, a directory holding one (with "
                                                            "tokenizer_config.json), or a GGUF file, used by the "
                                                            "router and the workers instead of the model's own "
                                                            "tokenizer. A relative path is inside the model's "
                                                            "volume (pvc and image sources).", max_length=4096)
    served_name: str | None = Field(default=None, description="The `model` name clients send (default: the file "
                                                              "name).", max_length=256)


# ------------------------------------------------------------------------------ router
class SecretKeyRef(_Model):
    name: str = Field(description="Secret name.", min_length=1, max_length=253)
    key: str = Field(default="api-key", description="Key within the Secret.", min_length=1, max_length=253)


class RouterTls(_Model):
    secret_name: str = Field(description="A kubernetes.io/tls Secret (tls.crt, tls.key) in the deployment's "
                                         "namespace, e.g. written by a cert-manager Certificate: the API is "
                                         "served over HTTPS with it, reloaded when it is renewed.",
                             min_length=1, max_length=253)


class RouterService(_Model):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(default="ClusterIP",
                                                                   description="Kubernetes Service type.")
    port: int = Field(default=8000, ge=1, le=65535, description="Service port of the OpenAI API.")


class RouterSpec(_Model):
    replicas: int = Field(default=1, ge=1, le=64, description="Router replicas.")
    service: RouterService = Field(default_factory=RouterService, description="How the API is exposed.")
    routing_policy: Literal["kv-aware", "least-loaded", "round-robin"] = Field(
        default="kv-aware", description="How requests are placed: prefix-cache overlap against load, least "
                                        "loaded, or round robin.")
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Clients must send one of the keys in this Secret's key as a bearer token "
                                  "(one key per line, optionally `NAME KEY`: request metrics are labelled with "
                                  "the name); edits to the Secret take effect without a restart.")
    tls: RouterTls | None = Field(default=None, description="Serve the API over HTTPS (default: plain HTTP, for "
                                                            "a TLS-terminating ingress or mesh in front).")


# ------------------------------------------------------------------------------ pools
class Toleration(_Model):
    key: str | None = Field(default=None, description="Taint key the toleration applies to.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal.")
    value: str | None = Field(default=None, description="Taint value (operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(default=None,
                                                                                  description="Taint effect.")
    toleration_seconds: int | None = Field(default=None, description="How long NoExecute is tolerated.")


class EnvVar(_Model):
    name: str = Field(description="Variable name.", min_length=1, max_length=256)
    value: str = Field(default="", description="Value.")


_QUANTITIES: JsonDict = {
    "type": "object",
    "maxProperties": 16,
    "additionalProperties": {
        "x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}],
        "x-kubernetes-validations": [{"rule": "!string(self).startsWith('-')",
                                      "message": "resource quantities must not be negative"}],
    },
}


class Resources(_Model):
    requests: dict[str, int | str] | None = Field(default=None, description="Minimum resources, e.g. cpu, memory.",
                                                  json_schema_extra=_QUANTITIES)
    limits: dict[str, int | str] | None = Field(default=None, description="Maximum resources; `nvidia.com/gpu` "
                                                                          "asks for GPUs.",
                                                json_schema_extra=_QUANTITIES)


class EngineOptions(_Model):
    max_batched_tokens: int = Field(default=512, ge=16, le=1 << 20, description="Per-step token budget (chunked "
                                                                                "prefill chunk size).")
    max_num_seqs: int = Field(default=64, ge=1, le=4096, description="Requests running at once per worker.")
    kv_cache_mib: int | None = Field(default=None, ge=16, le=1 << 22,
                                     description="KV cache per worker, MiB (default: 1024 on the CPU; on a GPU, "
                                                 "gpuMemoryFraction of the memory the weights leave free).")
    gpu_memory_fraction: float = Field(default=0.9, gt=0, le=1,
                                       description="Workers with GPUs (`nvidia.com/gpu` in the pool's limits) "
                                                   "and no kvCacheMib: the share of the GPU memory free after "
                                                   "the weights that the KV cache and step buffers may use.")
    dtype: Literal["bfloat16", "float32"] = Field(default="bfloat16", description="Compute dtype.")


class PoolSpec(_Model):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
         "message": "minReplicas must be <= maxReplicas"},
        {"rule": "!has(self.minReplicas) || self.minReplicas <= self.replicas",
         "message": "minReplicas must be <= replicas"},
        {"rule": "!has(self.maxReplicas) || self.replicas <= self.maxReplicas",
         "message": "replicas must be <= maxReplicas"},
    ]})

    replicas: int = Field(default=1, ge=0, le=1000, description="Workers in this pool at creation; afterwards "
                                                                "the ServingPool's /scale owns the count.")
    min_replicas: int | None = Field(default=None, ge=0, le=1000, description="Lower bound for autoscaling.")
    max_replicas: int | None = Field(default=None, ge=0, le=1000, description="Upper bound for autoscaling.")
    resources: Resources = Field(default_factory=Resources, description="Container resources of each worker.")
    node_selector: dict[str, str] | None = Field(default=None, description="Node labels the workers must match.")
    tolerations: list[Toleration] | None = Field(default=None, description="Taints the workers tolerate.")
    affinity: dict[str, Any] | None = _free_form("Pod affinity rules (core/v1 Affinity).")
    env: list[EnvVar] | None = Field(default=None, description="Extra environment of the worker container.")
    engine: EngineOptions = Field(default_factory=EngineOptions, description="Engine settings of the workers.")


class Pools(_Model):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "has(self.decode)", "message": "at least one pool must decode: add pools.decode"},
    ]})

    encode: PoolSpec | None = Field(default=None, description="Workers that turn images into embeddings (with "
                                    "autoscaling: sized by image throughput up to maxReplicas; without it fixed).")
    prefill: PoolSpec | None = Field(default=None, description="Workers that prefill prompts (compute-bound; "
                                                               "sized for TTFT).")
    decode: PoolSpec | None = Field(default=None, description="Workers that generate tokens (memory-bound; sized "
                                                              "for TPOT). Without a prefill pool they prefill too.")


# ------------------------------------------------------------------------------ SLOs and loops
class KvTransfer(_Model):
    backend: Literal["nixl", "grpc"] = Field(default="nixl", description="nixl: decode workers READ the KV "
                                                                         "worker-to-worker; grpc: streamed.")


class Slo(_Model):
    ttft_seconds: float = Field(default=2.0, gt=0, le=3600, description="Time to first token target.")
    tpot_seconds: float = Field(default=0.1, gt=0, le=60, description="Time per output token target.")
    percentile: float = Field(default=90, ge=50, le=99.99, description="Percentile the targets apply to.")
    attainment_target: float = Field(default=0.9, gt=0, le=1, description="Fraction of requests that must meet "
                                                                          "both targets.")


class Autoscaling(_Model):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "!self.enabled || has(self.prometheusUrl)", "message": "enabled needs prometheusUrl"},
    ]})

    enabled: bool = Field(default=False, description="Run the planner: the prefill and decode pools' replicas "
                                                     "follow the demand and the TTFT/TPOT percentiles Prometheus "
                                                     "measures (each pool within minReplicas..maxReplicas, which "
                                                     "are then required).")
    interval_seconds: int = Field(default=60, ge=5, le=3600, description="Planner period; also the window its "
                                                                         "rates and percentiles are measured over.")
    prometheus_url: str | None = Field(default=None, description="Base URL of a Prometheus that scrapes this "
                                                                 "deployment (the PodMonitor the operator creates, "
                                                                 "or an equivalent job keeping the "
                                                                 "triphase_dev_deployment and namespace labels).",
                                       max_length=2048,
                                       json_schema_extra={"x-kubernetes-validations": [
                                           {"rule": "self.matches('^https?://[^\\\\s]+$')",
                                            "message": "must be an http:// or https:// URL"}]})
    stabilization_seconds: int = Field(default=300, ge=0, le=86400, description="A pool shrinks only when every "
                                                                                "recommendation over this long "
                                                                                "agrees (growth is immediate).")
    profile_config_map: str | None = Field(
        default=None, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Name of a ConfigMap in the deployment's namespace whose key `profile.json` holds a "
                    "`triphase profile` of the workers: decode capacity (streams per worker at the TPOT "
                    "target) comes from it instead of being fitted to what the workers report, and prefill "
                    "capacity until Prometheus has measured a rate, so both are known before the workers "
                    "have run any load. Re-read every interval; while it is missing or not a profile the "
                    "planner uses what the workers report (a Warning Event says why).")


class RoleSwitching(_Model):
    enabled: bool = Field(default=False, description="Run the operator's role balancer: workers of the prefill "
                                                     "and decode pools switch roles in place as the load shifts, "
                                                     "against spec.slo (TTFT for the prefill backlog, TPOT for "
                                                     "decode steps).")
    max_switches_per_minute: int = Field(default=2, ge=0, le=600, description="Rate limit of role switches "
                                                                             "(0: none).")
    min_per_role: int = Field(default=1, ge=0, le=1000, description="Ready workers prefill and decode each keep at "
                                                                   "least.")


class ServingDeploymentSpec(_Model):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "!has(self.autoscaling) || !self.autoscaling.enabled || "
                 "((!has(self.pools.decode) || has(self.pools.decode.maxReplicas)) && "
                 "(!has(self.pools.prefill) || has(self.pools.prefill.maxReplicas)))",
         "message": "autoscaling.enabled needs maxReplicas on the prefill and decode pools"},
        {"rule": "!has(self.autoscaling) || !self.autoscaling.enabled || !has(self.pools.decode) || "
                 "!has(self.pools.decode.minReplicas) || self.pools.decode.minReplicas >= 1",
         "message": "autoscaling keeps at least one decode worker: pools.decode.minReplicas must be >= 1"},
        {"rule": "!has(self.pools.encode) || self.model.source != 'bundled'",
         "message": "an encode pool needs a model that takes images (a LLaVA-style directory); the bundled "
                    "SmolLM2 takes none"},
    ]})

    model: ModelSource = Field(description="The model to serve.")
    image: str = Field(default="ghcr.io/triphase/triphase:latest", description="Container image of router and "
                                                                               "workers.", min_length=1)
    router: RouterSpec = Field(default_factory=RouterSpec, description="The OpenAI-compatible front end.")
    pools: Pools = Field(description="Worker pools by role.")
    kv_transfer: KvTransfer = Field(default_factory=KvTransfer, description="KV hand-off from prefill to decode.")
    slo: Slo = Field(default_factory=Slo, description="Service level objectives (conditions, planner).")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling, description="The slow loop: pool sizes.")
    role_switching: RoleSwitching = Field(default_factory=RoleSwitching, description="The fast loop: worker roles.")


# ------------------------------------------------------------------------------ status
class Condition(_Model):
    type: str = Field(description="Ready, Progressing, Degraded or SLOMet.")
    status: Literal["True", "False", "Unknown"] = Field(description="Condition status.")
    reason: str = Field(default="", description="CamelCase reason.")
    message: str = Field(default="", description="Human-readable detail.")
    last_transition_time: str | None = Field(default=None, description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(default=None, description="Generation this condition describes.")


class PoolStatus(_Model):
    desired: int = Field(default=0, description="Replicas the pool's ServingPool asks for.")
    ready: int = Field(default=0, description="Worker pods Running and Ready.")
    by_role: dict[str, int] | None = Field(default=None, description="Ready workers by the role they report now.")


class ScalingDecision(_Model):
    time: str | None = Field(default=None, description="When (RFC 3339).")
    pool: str | None = Field(default=None, description="Which pool.")
    from_replicas: int | None = Field(default=None, description="Replicas before.")
    to_replicas: int | None = Field(default=None, description="Replicas after.")
    reason: str | None = Field(default=None, description="Why.")


class ServingDeploymentStatus(_Model):
    observed_generation: int | None = Field(default=None, description="Last spec generation reconciled.")
    conditions: list[Condition] | None = Field(default=None, description="Ready, Progressing, Degraded, SLOMet.",
                                               json_schema_extra={"x-kubernetes-list-type": "map",
                                                                  "x-kubernetes-list-map-keys": ["type"]})
    pools: dict[str, PoolStatus] | None = Field(default=None, description="Per pool: desired, ready, by role.")
    ready_summary: dict[str, str] | None = Field(default=None, description="ready/desired per role, for printing.")
    endpoint: str | None = Field(default=None, description="In-cluster URL of the OpenAI API.")
    last_scaling_decision: ScalingDecision | None = Field(default=None, description="The planner's last change.")
    kopf: dict[str, Any] | None = Field(
        default=None, description="The operator's own records: the spec it last handled (how it tells a spec change) "
        "and the progress of a handler it is retrying.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})


class ServingPoolSpec(_Model):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": f"!has(self.selector) || self.selector == '{labels.DEPLOYMENT}=' + self.deployment + "
                 f"',{labels.COMPONENT}=worker,{labels.ROLE}=' + self.role",
         "fieldPath": ".selector",
         "message": f"selector must select the pool's own pods: {labels.DEPLOYMENT}=<deployment>,"
                    f"{labels.COMPONENT}=worker,{labels.ROLE}=<role>"},
    ]})

    deployment: str = Field(description="The owning ServingDeployment.", min_length=1, max_length=253)
    role: Literal["encode", "prefill", "decode"] = Field(description="The role its workers start with.")
    replicas: int = Field(default=1, ge=0, le=1000, description="Desired workers (the /scale subresource).")
    selector: str | None = Field(default=None, max_length=400,
                                 description="Label selector of the pool's pods, which /scale reports (an "
                                             "autoscaler finds the pods by it); written by the operator.")


class ServingPoolStatus(_Model):
    replicas: int = Field(default=0, description="Worker pods that exist.")
    ready_replicas: int = Field(default=0, description="Worker pods Running and Ready.")
