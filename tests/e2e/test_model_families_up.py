"""A tiny random checkpoint of every family served by `triphase up` (prefill worker -> NIXL -> decode
worker, float32): greedy completions token for token equal to transformers on the same files. The
longer prompt exceeds the sliding window of Mixtral, Gemma 3 and Phi-3, so the decode worker's
sliding layers read a window of KV it received (for Mixtral and Phi-3, whose every layer slides,
only the live tail of the prompt's blocks is moved)."""

from __future__ import annotations

import re
import urllib.request

import openai
import pytest
import torch

from tests.checkpoints import FAMILIES, build_checkpoint
from tests.checkpoints import TINY_VOCAB as VOCAB
from triphase.local.processes import triphase_up

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind", FAMILIES)
def test_greedy_completions_through_the_hand_off_equal_transformers(kind, tmp_path):
    reference = build_checkpoint(kind, tmp_path)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (7, 30)]
    expected = []
    for prompt in prompts:
        with torch.no_grad():
            out = reference.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                     attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        expected.append(out[0, len(prompt):].tolist())
    with triphase_up(["--model", str(tmp_path), "--dtype", "float32"], timeout=300) as (_, url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        for prompt, tokens in zip(prompts, expected, strict=True):
            reply = client.completions.create(model=tmp_path.name, prompt=prompt, max_tokens=16, temperature=0,
                                              logprobs=0, extra_body={"ignore_eos": True})
            assert [int(t[1:]) for t in reply.choices[0].logprobs.tokens] == tokens
        # The test tokenizer has no decoder the grammar engine can read: a clear 400, not a 500.
        with pytest.raises(openai.BadRequestError, match="structured output is not available"):
            client.completions.create(model=tmp_path.name, prompt=prompts[0], max_tokens=4,
                                      extra_body={"structured_outputs": {"regex": "w[0-9]+"}})
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            metrics = response.read().decode()
    moved = re.search(r'triphase_kv_transfer_bytes_total\{backend="nixl",model="[^"]+"\} (\S+)', metrics)
    assert moved and float(moved.group(1)) > 0
