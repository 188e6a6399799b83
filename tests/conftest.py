"""Shared test fixtures: small models built from configs, never from the Hub."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from huggingface_hub import constants
from torch import nn

from hub_server import HubState, start_hub

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture
def local_hub(monkeypatch, tmp_path) -> HubState:
    """A local in-memory Hub that huggingface_hub (and transformers) in this process talk to; nothing leaves the machine.

    ``state.env`` holds the environment a subprocess needs to reach it.
    """
    from transformers.utils import hub as transformers_hub

    server, state = start_hub()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(transformers_hub, "_hf_api", None)  # transformers' shared HfApi keeps the endpoint it saw
    cache = str(tmp_path / "hub-cache")
    state.env = {"HF_ENDPOINT": endpoint, "HF_TOKEN": "hf_dummy_test_token", "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": cache}
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", "hf_dummy_test_token")
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    yield state
    server.shutdown()
    server.server_close()


def damaged_copy(folder: Path, tmp_path: Path, damage: Callable[[Path], None]) -> Path:
    """A copy of checkpoint ``folder`` under ``tmp_path`` with ``damage`` applied (the original stays intact)."""
    copy = Path(shutil.copytree(folder, tmp_path / "ckpt"))
    damage(copy)
    return copy


@pytest.fixture
def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32))


def tiny_hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       image_size=32, patch_size=8, num_labels=10)
    return ViTForImageClassification(config)


def tiny_hf_resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)
    return ResNetForImageClassification(config)


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(config)


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      decoder_start_token_id=0)
    return T5ForConditionalGeneration(config)


def tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=32)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32))
