"""common/stack.py: the worker and router command lines it makes are read back by their own parsers
as the values it was given (the operator, `triphase up` and the Ray application all start from it)."""

from __future__ import annotations

import argparse

from triphase.common.images import ImageLimits
from triphase.common.stack import Engine, Stack
from triphase.router import main as router_main
from triphase.workers import main as worker_main

STACK = Stack(model="/models/m.gguf", tokenizer="/models/tok", model_format="gguf", served_name="m",
              kv_transfer="grpc", drain_timeout_s=12.5, images=ImageLimits(1000, 2000, 3), routing_policy="round-robin")
ENGINE = Engine(dtype="float32", engine="sim", device="cpu", kv_cache_mib=64, max_num_seqs=8, max_batched_tokens=128,
                sim={"sim_decode_ms": 7.0, "sim_prefill_per_token_ms": 0.5})


def parse(add_arguments, argv: list[str]) -> argparse.Namespace:  # type: ignore[no-untyped-def]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_a_worker_reads_back_what_the_stack_says() -> None:
    command, *argv = STACK.worker_args("decode", ENGINE)
    args = parse(worker_main.add_arguments, argv)
    assert command == "worker"
    assert (args.role, args.model, args.tokenizer, args.model_format, args.served_model_name) == \
        ("decode", "/models/m.gguf", "/models/tok", "gguf", "m")
    assert (args.kv_transfer, args.drain_timeout) == ("grpc", 12.5)
    assert (args.image_max_bytes, args.image_max_pixels, args.image_max_count) == (1000, 2000, 3)
    assert (args.dtype, args.engine, args.device, args.kv_cache_mib, args.max_num_seqs, args.max_batched_tokens) == \
        ("float32", "sim", "cpu", 64, 8, 128)
    assert (args.sim_decode_ms, args.sim_prefill_per_token_ms) == (7.0, 0.5)


def test_a_router_reads_back_what_the_stack_says() -> None:
    command, *argv = STACK.router_args()
    args = parse(router_main.add_arguments, argv)
    assert command == "router"
    assert (args.model, args.tokenizer, args.served_model_name, args.routing_policy, args.drain_timeout) == \
        ("/models/m.gguf", "/models/tok", "m", "round-robin", 12.5)
    assert (args.image_max_bytes, args.image_max_pixels, args.image_max_count) == (1000, 2000, 3)


def test_what_is_left_unset_stays_the_components_default() -> None:
    defaults = parse(worker_main.add_arguments, [])
    args = parse(worker_main.add_arguments, Stack().worker_args("both", Engine())[1:])
    assert vars(args) == {**vars(defaults), "role": "both"}
