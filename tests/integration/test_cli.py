"""`triphase generate` as a user runs it: real process, real model, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def triphase(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "triphase.cli", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_generate_json(loaded_model):
    proc = triphase("generate", "--prompt", "What is the capital of France?", "--chat", "--max-tokens", "12",
                    "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert "Paris" in result["text"]
    assert result["text"] == loaded_model.tokenizer.decode(result["token_ids"])
    assert result["prompt_tokens"] > 10 and result["completion_tokens"] == len(result["token_ids"]) <= 12
    assert result["timings"]["total_s"] > 0


def test_generate_streams_text_and_reports_speed():
    proc = triphase("generate", "--prompt", "Once upon a time", "--max-tokens", "8", "--ignore-eos")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.split()) >= 3  # the continuation, streamed to stdout
    assert "tokens/s decode" in proc.stderr


def corrupt_gguf(tmp_path):
    from triphase.common.models.files import bundled_model_path

    with open(bundled_model_path(), "rb") as handle:
        data = handle.read(4096)  # header and part of the metadata, then nothing
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data)
    return path


def unsupported_gguf(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("case", ["missing", "not-a-model", "truncated", "unsupported", "bad-flag-value"])
def test_errors_are_one_line_without_traceback(case, tmp_path, loaded_model):
    if case == "missing":
        args, expected = ["--model", str(tmp_path / "nope.gguf")], "model not found"
    elif case == "not-a-model":
        (tmp_path / "x.bin").write_bytes(b"hello world")
        args, expected = ["--model", str(tmp_path / "x.bin")], "neither a GGUF file"
    elif case == "truncated":
        args, expected = ["--model", str(corrupt_gguf(tmp_path))], "corrupted GGUF"
    elif case == "unsupported":
        args, expected = ["--model", str(unsupported_gguf(tmp_path))], "unsupported architecture 'gpt2'"
    else:
        args, expected = ["--max-tokens", "-3"], "max_tokens must be at least 1"
    proc = triphase("generate", "--prompt", "hi", *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("flags, expected", [
    (["--port", "-1"], "--port -1: a port is in 1..65535"),
    (["--prometheus", "--prometheus-port", "70000"], "--prometheus-port 70000: a port is in 1..65535"),
    (["--prometheus", "--prometheus-port", "TAKEN"], "cannot listen on 127.0.0.1:"),
    # the SLO whose rules its Prometheus loads is bounded as the CRD bounds it, before any worker starts
    (["--prometheus", "--ttft-slo", "5000"], "--ttft-slo: Input should be less than or equal to 3600"),
    (["--prometheus", "--slo-percentile", "20"], "--slo-percentile: Input should be greater than or equal to 50"),
])
def test_up_rejects_a_bad_port_before_starting_anything(flags, expected):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        flags = [str(taken.getsockname()[1]) if flag == "TAKEN" else flag for flag in flags]
        with socket.socket() as free:  # the router port, free unless a case says otherwise
            free.bind(("127.0.0.1", 0))
            router_port = str(free.getsockname()[1])
        proc = triphase("up", "--engine", "sim", "--port", router_port, *flags, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr


def test_device_flags_are_checked_before_anything_starts():
    """A fraction outside (0, 1] is refused by `up` itself (it was only refused by each worker, after
    start), and the sim engine does not accept a GPU it would never use."""
    proc = triphase("up", "--engine", "sim", "--gpu-memory-fraction", "1.5", timeout=60)
    assert proc.returncode == 2 and "--gpu-memory-fraction must be in (0, 1], got 1.5" in proc.stderr
    proc = triphase("worker", "--engine", "sim", "--device", "cuda", "--port", "0", timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "the sim engine computes nothing" in lines[0], proc.stderr
