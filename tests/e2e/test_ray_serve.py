"""triphase on Ray Serve: `serve run` of deploy/ray/serve.yaml on one local Ray instance (the module
shares it), with the official openai client.

The file as shipped, but float32 (the dtype the `triphase up` comparison runs), three workers (one
prefill and two decode, so that one decode worker can die and the other resume its streams) and the
tight SLOs and quick switches of tests/e2e/test_role_switching.py's real-model case. Checked: greedy
outputs equal `triphase up`'s, streamed and not; the prefill -> decode hand-off took NIXL; a decode
worker replica SIGKILLed mid-stream leaves the stream complete and identical (and Serve replaces the
replica); the role balancer switches a worker under a prompt-heavy load; deleting the application lets
a stream in flight finish, and Ctrl-C on `serve run` then leaves no replica running.
"""

from __future__ import annotations

import os
import signal
import threading
import urllib.request

import openai
import pytest
import ray
from ray import serve

from tests.chaos import PROMPTS
from tests.load import load_in_background
from tests.ray_local import config, local_ray, ready_workers, replica_processes, serve_run, wait_gone
from triphase.common.process.net import free_port, wait_until
from triphase.local.processes import triphase_up

pytestmark = pytest.mark.slow

APP = "triphase"
WORKERS = 3
ARGS = {
    "engine_kwargs": {"dtype": "float32", "kv_cache_mib": 64},
    "deployment_config": {"num_replicas": WORKERS},
    "slo": {"ttft_seconds": 0.5, "tpot_seconds": 0.03},
    "role_switching": {"enabled": True, "cooldown_seconds": 2, "max_switches_per_minute": 30, "grace_seconds": 0},
    "drain_timeout_seconds": 30,
}
TOKENS = 24


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with local_ray(tmp_path_factory.mktemp("ray")) as env:
        yield env


@pytest.fixture(scope="module")
def stack(cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    with serve_run(config(tmp, free_port(), **ARGS), cluster, tmp / "serve.log", WORKERS) as (proc, url):
        ray.init(address=cluster["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
        try:
            yield proc, url, serve.get_deployment_handle("Control", APP)
        finally:
            ray.shutdown()


def greedy(url: str, prompt: str, *, stream: bool, max_tokens: int = TOKENS) -> tuple[str, str]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    request = dict(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0)
    if stream:
        chunks = list(client.chat.completions.create(**request, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, next(c.choices[0].finish_reason for c in reversed(chunks) if c.choices)
    reply = client.chat.completions.create(**request)
    return reply.choices[0].message.content or "", reply.choices[0].finish_reason


def metric(worker: dict, name: str, **labels: str) -> float:
    host = worker["endpoint"].rsplit(":", 1)[0]
    with urllib.request.urlopen(f"http://{host}:{worker['metrics_port']}/metrics", timeout=5) as response:
        text = response.read().decode()
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(w in line for w in wanted))


def workers(control) -> list[dict]:
    return control.workers.remote().result(timeout_s=30)


def test_greedy_outputs_equal_triphase_up_streamed_and_not(stack) -> None:
    _, url, _ = stack
    on_ray = [greedy(url, p, stream=i % 2 == 1) for i, p in enumerate(PROMPTS[:4])]
    with triphase_up(["--dtype", "float32", "--kv-cache-mib", "64"]) as (_, up_url):
        locally = [greedy(up_url, p, stream=i % 2 == 1) for i, p in enumerate(PROMPTS[:4])]
    assert all(text for text, _ in on_ray), on_ray
    assert on_ray == locally


def test_the_hand_off_took_nixl(stack) -> None:
    _, url, control = stack
    greedy(url, PROMPTS[4], stream=False)
    decode = [w for w in workers(control) if w["role"] == "decode"]
    assert len(decode) == 2
    assert sum(metric(w, "triphase_kv_received_bytes_total", backend="nixl") for w in decode) > 0
    assert sum(metric(w, "triphase_kv_nixl_fallbacks_total") for w in decode) == 0


def test_a_worker_replica_killed_mid_stream_leaves_the_stream_identical(stack) -> None:
    _, url, control = stack
    prompt, tokens = "Tell me a long story about a turtle.", 64
    expected = greedy(url, prompt, stream=True, max_tokens=tokens)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    stream = client.chat.completions.create(model=client.models.list().data[0].id, stream=True, temperature=0,
                                            max_tokens=tokens, messages=[{"role": "user", "content": prompt}])
    pieces, finish, killed = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if killed is None and len(pieces) == 4:
            busy = [w for w in workers(control) if w["role"] == "decode"
                    and metric(w, "triphase_worker_running_requests") > 0]
            assert len(busy) == 1, busy
            killed = busy[0]
            os.kill(killed["pid"], signal.SIGKILL)
    assert killed is not None
    assert ("".join(pieces), finish) == expected
    # Serve replaces the replica; the directory forgets the dead one and lists the new one.
    wait_until(lambda: len(ready_workers(url)) == WORKERS and killed["endpoint"] not in
               {w["endpoint"] for w in ready_workers(url)}, 180, "a replacement worker replica")


def test_the_role_balancer_switches_a_worker_under_a_prompt_heavy_load(stack) -> None:
    _, url, control = stack
    before = control.switches.remote().result(timeout_s=30)

    def prefill_workers() -> int:
        return sum(w["role"] == "prefill" for w in ready_workers(url))

    assert prefill_workers() == 1
    # Long prompts of their own (no prefix-cache hits) for 2 tokens each saturate the prefill worker.
    with load_in_background(url, "Summarise this. " + "The quick brown fox jumps over the lazy dog. " * 120,
                            max_tokens=2, lanes=4, unique=True) as prompts:
        wait_until(lambda: prefill_workers() == 2, 120, "a decode worker switched to prefill")
    assert not prompts.failed, prompts.failed[:3]
    assert control.switches.remote().result(timeout_s=30) > before


def test_deleting_the_app_lets_a_stream_in_flight_finish_and_ctrl_c_leaves_nothing_running(stack) -> None:
    """`serve delete triphase` (here its Python form) drains: the proxies keep serving while the replicas
    stop, each after its requests. Ctrl-C on `serve run` then stops Serve itself. (Ctrl-C alone is
    Serve's shutdown, which kills the HTTP proxies at once and so cuts any request still in flight.)"""
    proc, url, _ = stack
    replicas = replica_processes()
    assert len(replicas) >= WORKERS + 2  # the workers, the control replica, the ingress
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    stream = client.chat.completions.create(model=client.models.list().data[0].id, stream=True, temperature=0,
                                            max_tokens=48, messages=[{"role": "user", "content": PROMPTS[5]}])
    pieces, finish, deleting = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if len(pieces) == 2 and deleting is None:
            deleting = threading.Thread(target=serve.delete, args=(APP,))
            deleting.start()
    assert deleting is not None
    deleting.join(timeout=120)
    assert finish == "length" and "".join(pieces)
    assert wait_gone(replicas, 60) == []
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 0
    assert replica_processes() == []


def test_the_planner_policy_grows_the_worker_deployment_under_load(cluster, tmp_path) -> None:
    """Sim workers (1000 prompt tokens/s each) under a prompt flood several workers' worth: Serve starts
    more worker replicas within the bounds, on the policy's decision (autoscaling.py)."""
    args = {"engine_kwargs": {"engine": "sim", "sim": {"sim_prefill_per_token_ms": 1.0}, "kv_cache_mib": 64},
            "deployment_config": {"ray_actor_options": {"num_cpus": 0.25}},
            "autoscaling": {"enabled": True, "min_replicas": 2, "max_replicas": 4, "interval_seconds": 2,
                            "stabilization_seconds": 30}}
    path = config(tmp_path, free_port(), **args)
    with serve_run(path, cluster, tmp_path / "serve.log", 2) as (_, url):
        assert len(ready_workers(url)) == 2
        with load_in_background(url, "hello " * 3000, max_tokens=2, lanes=12, unique=True) as prompts:
            wait_until(lambda: len(ready_workers(url)) >= 3, 120, "the worker deployment to grow")
        assert not prompts.failed, prompts.failed[:3]
        assert len(ready_workers(url)) <= 4
