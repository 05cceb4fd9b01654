"""The application's arguments: deploy/ray/serve.yaml's parse, wrong fields are named by path, and the
worker and router command lines come from the one stack description (common/stack.py)."""

from __future__ import annotations

import pytest
import yaml

from tests.ray_local import SERVE_YAML
from triphase.rayserve.config import AppArgs


def shipped() -> dict:
    return yaml.safe_load(SERVE_YAML.read_text())["applications"][0]["args"]


def test_the_shipped_serve_yaml_parses_into_a_worker_and_router_command_line() -> None:
    app = AppArgs.parse(shipped())
    assert app.stack().worker_args("prefill", app.engine()) == [
        "worker", "--role", "prefill", "--dtype", "bfloat16", "--engine", "torch", "--kv-cache-mib", "256",
        "--served-model-name", "SmolLM2-135M-Instruct", "--drain-timeout", "30", "--kv-transfer", "nixl"]
    assert app.stack().router_args() == ["router", "--served-model-name", "SmolLM2-135M-Instruct",
                                         "--drain-timeout", "30", "--routing-policy", "kv-aware"]
    assert app.min_workers == 2


@pytest.mark.parametrize(("change", "message"), [
    ({"engine_kwargs": {"dtype": "float16"}}, "engine_kwargs.dtype: Input should be 'float32' or 'bfloat16'"),
    ({"engine_kwargs": {"kv_cache_mib": 0}}, "engine_kwargs.kv_cache_mib: Input should be greater than or equal"),
    ({"engine_kwargs": {"device": "tpu"}}, "engine_kwargs.device: String should match pattern"),
    ({"engine_kwargs": {"sim": {"sim_decode_ms": 5}}}, "sim timing needs engine: sim"),
    ({"slo": {"ttft_seconds": 0}}, "slo.ttft_seconds: Input should be greater than 0"),
    ({"role_switching": {"enabled": True, "typo": 1}}, "role_switching.typo: Extra inputs are not permitted"),
    ({"deployment_config": {"autoscaling_config": {"min_replicas": 1}}},
     "deployment_config.autoscaling_config: set `autoscaling` instead"),
    ({"deployment_config": {"num_replicas": "auto"}}, "deployment_config.num_replicas must be a whole number"),
    ({"autoscaling": {"enabled": True, "min_replicas": 4, "max_replicas": 2}}, "min_replicas must not exceed"),
    ({"prefill_share": 1}, "prefill_share: Input should be less than 1"),
    ({"kv_transfer": "rdma"}, "kv_transfer: Input should be 'nixl' or 'grpc'"),
])
def test_a_wrong_argument_is_named_by_its_path(change, message) -> None:
    with pytest.raises(ValueError, match=r"^triphase\.rayserve arguments: ") as raised:
        AppArgs.parse({**shipped(), **change})
    assert message in str(raised.value)


def test_serve_options_keep_what_the_user_gave_and_add_the_drain_time() -> None:
    app = AppArgs.parse({**shipped(), "drain_timeout_seconds": 40,
                         "deployment_config": {"num_replicas": 3, "ray_actor_options": {"num_gpus": 1}}})
    worker = app.options("worker")
    assert worker["num_replicas"] == 3
    assert worker["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1}
    assert worker["graceful_shutdown_timeout_s"] == 55  # __del__ drains for up to 40 s first
    assert app.options("control")["ray_actor_options"] == {"num_cpus": 0}
    assert app.options("ingress")["ray_actor_options"] == {"num_cpus": 0.5}
    assert app.options("ingress")["max_ongoing_requests"] == 1280  # the router's own admission decides


def test_both_serve_configs_pass_rays_own_schema_and_ours() -> None:
    from ray.serve.schema import ServeDeploySchema

    from tests.ray_local import REPO

    service = yaml.safe_load((REPO / "deploy" / "ray" / "rayservice.yaml").read_text())
    for config in (yaml.safe_load(SERVE_YAML.read_text()), yaml.safe_load(service["spec"]["serveConfigV2"])):
        ServeDeploySchema.model_validate(config)
        (app,) = config["applications"]
        assert app["import_path"] == "triphase.rayserve:build_app"
        AppArgs.parse(app["args"])
