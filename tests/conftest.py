"""Shared fixtures: the bundled model loaded once per session, engines built from it, and the
Hugging Face transformers reference loading the same GGUF file."""

from __future__ import annotations

import os

import pytest
import torch

from triphase.common.models.files import bundled_model_path
from triphase.workers.engine.core import Engine, EngineConfig
from triphase.workers.models.loader import LoadedModel, load_model

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the ocean.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers greater than 10.",
    "How do I reverse a list in Python?",
    "Translate 'good morning' into Spanish.",
    "What is 17 times 3?",
    "Give me a name for a pet turtle.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What's a good way to start learning the guitar?",
    "Describe a cat to someone who has never seen one.",
]


@pytest.fixture(scope="session")
def loaded_model() -> LoadedModel:
    return load_model(None)


@pytest.fixture(scope="session")
def make_engine(loaded_model):
    """Build an engine over the already loaded weights (cheap: no file I/O)."""

    def build(**overrides) -> Engine:
        config = EngineConfig(**{"num_kv_blocks": 256, **overrides})
        return Engine(loaded_model, config)

    return build


@pytest.fixture(scope="session")
def hf_model():
    from transformers import AutoModelForCausalLM

    path = bundled_model_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="session")
def chat_prompt_ids(loaded_model) -> list[list[int]]:
    tok = loaded_model.tokenizer
    return [tok.encode_chat([{"role": "user", "content": p}]) for p in CHAT_PROMPTS]


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory):
    """A real control plane for the whole session (started on first use, stopped at the end)."""
    from tests.kube import start_cluster
    from triphase.local.cluster import controlplane

    state = tmp_path_factory.mktemp("kube")
    cluster = start_cluster(state)
    yield cluster
    controlplane.down(state, progress=False)


@pytest.fixture(scope="module")
def kube(kube_cluster, request):
    """A fresh namespace on the session's control plane for each test module."""
    from tests.kube import Kube, new_namespace

    namespace = new_namespace(kube_cluster, request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_"))
    yield Kube(kube_cluster, namespace)
    kube_cluster.api("DELETE", f"/api/v1/namespaces/{namespace}")
