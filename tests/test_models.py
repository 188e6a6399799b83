"""models.py: base models start from their trained weights (timm, transformers, local folders), random only when asked."""

from __future__ import annotations

import io

import pytest
import timm
import torch
from conftest import tiny_bert
from huggingface_hub import HfApi
from safetensors.torch import save

from hf_freqcompress import compress, get_reports, save_pretrained
from hf_freqcompress.cli import main
from hf_freqcompress.models import build_model, model_source


def _upload(repo_id: str, files: dict[str, bytes]) -> None:
    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    for name, data in files.items():
        api.upload_file(path_or_fileobj=io.BytesIO(data), path_in_repo=name, repo_id=repo_id)


def _marked_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state with every float tensor set to a recognisable value (0.5)."""
    return {k: (torch.full_like(v, 0.5) if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}


def test_timm_names_load_their_pretrained_weights_from_the_hub(local_hub):
    torch.manual_seed(7)
    source = timm.create_model("test_resnet.r160_in1k", pretrained=False).eval()
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    _upload("timm/test_resnet.r160_in1k", {"model.safetensors": save(state)})
    torch.manual_seed(8)  # a different random init, should anything be built untrained
    model = build_model("timm:test_resnet.r160_in1k").eval()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert model_source(model) == {"spec": "timm:test_resnet.r160_in1k", "pretrained": True,
                                   "weights": "timm/test_resnet.r160_in1k"}
    compress(model, budget=1.0, method="freqreg")  # every coefficient kept: the compressed model is the source
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=1e-4, atol=1e-4)


def test_hf_repo_ids_and_local_folders_load_the_saved_head_with_its_weights(local_hub, tmp_path):
    source = tiny_bert()
    with torch.no_grad():
        for p in source.parameters():
            p.fill_(0.5)
    source.save_pretrained(tmp_path / "bert")
    local = build_model(f"hf:{tmp_path / 'bert'}")
    assert type(local).__name__ == "BertForSequenceClassification"
    assert all(torch.all(p == 0.5) for p in local.parameters())
    assert model_source(local)["pretrained"] and model_source(local)["weights"] is None  # a folder, not a Hub id
    files = {p.name: p.read_bytes() for p in (tmp_path / "bert").iterdir()}
    _upload("user/tiny-bert", files)
    hub = build_model("hf:user/tiny-bert")
    assert type(hub).__name__ == "BertForSequenceClassification" and all(torch.all(p == 0.5) for p in hub.parameters())
    assert model_source(hub)["weights"] == "user/tiny-bert"


def test_random_initialisation_only_when_asked(tmp_path):
    tiny_bert().config.save_pretrained(tmp_path / "config-only")
    with pytest.raises(ValueError, match="no weights"):
        build_model(f"hf:{tmp_path / 'config-only'}")
    random = build_model(f"hf:{tmp_path / 'config-only'}", pretrained=False)
    assert model_source(random)["pretrained"] is False
    offline = build_model("hf:gpt2", pretrained=False, n_layer=1, n_embd=32, n_head=2)
    assert type(offline).__name__ == "GPT2LMHeadModel" and offline.config.n_layer == 1
    zoo = build_model("timm:mnist_lenet")  # no pretrained weights exist: built untrained, said so
    assert model_source(zoo)["pretrained"] is False
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_model("timm:mnist_lenet", pretrained=True)


def test_cli_compresses_the_trained_weights_and_says_where_they_came_from(tmp_path, capsys):
    source = tiny_bert()
    with torch.no_grad():
        for p in source.parameters():
            p.fill_(0.5)
    source.save_pretrained(tmp_path / "bert")
    out = tmp_path / "compressed"
    assert main(["compress", "--model", f"hf:{tmp_path / 'bert'}", "--budget", "1/4", "--out", str(out)]) == 0
    assert "trained weights from the local folder" in capsys.readouterr().out
    assert main(["compress", "--model", "hf:bert", "--random-init", "--model-arg", "num_hidden_layers=1",
                 "--model-arg", "hidden_size=32", "--model-arg", "num_attention_heads=2",
                 "--model-arg", "intermediate_size=64", "--budget", "1/4"]) == 0
    assert "randomly initialised (as asked: --random-init)" in capsys.readouterr().out


def test_bad_model_specs_are_clear_errors():
    for spec, message in [("resnet18", "must be"), ("timm:no_such_model_xyz", "unknown timm model"),
                          ("hub:x", "must be")]:
        with pytest.raises(ValueError, match=message):
            build_model(spec)
    with pytest.raises(TypeError, match="pretrained"):
        build_model("timm:mnist_mlp", pretrained="yes")
    with pytest.raises(ValueError, match="revision"):
        build_model("timm:mnist_mlp", revision="main")


def test_saved_card_names_the_base_model_the_weights_came_from(local_hub, tmp_path):
    skeleton = timm.create_model("test_resnet.r160_in1k", pretrained=False)
    _upload("timm/test_resnet.r160_in1k", {"model.safetensors": save(_marked_state(skeleton))})
    model = build_model("timm:test_resnet.r160_in1k")
    compress(model, budget="1/4")
    folder = save_pretrained(model, tmp_path / "ckpt")
    assert "base_model: timm/test_resnet.r160_in1k" in (folder / "README.md").read_text()
    assert get_reports(model)
