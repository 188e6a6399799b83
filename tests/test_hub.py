"""Save, load, push and materialize: folder size, exact round trips, Hub flow, bad input, export."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
from conftest import damaged_copy, tiny_gpt2, tiny_hf_vit
from huggingface_hub import HfApi, ModelCard, constants
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from hf_freqcompress import (
    HashedNetsConfig,
    available_methods,
    compress,
    finalize,
    from_pretrained,
    get_reports,
    materialize,
    push_to_hub,
    save_pretrained,
)
from hf_freqcompress import architecture, hub
from hf_freqcompress.cli import main
from hf_freqcompress.methods import CompressedWeight, MethodConfig, registry
from hf_freqcompress.models import build_model

ROOT = Path(__file__).resolve().parents[1]
CONFIG, WEIGHTS = "compression_config.json", "model.safetensors"


def _timm(name: str, **kwargs) -> nn.Module:
    return build_model(f"timm:{name}", pretrained=False, num_classes=10, **kwargs).eval()


MODELS = {
    "resnet18": lambda: _timm("resnet18"),
    "vgg11": lambda: _timm("vgg11", mlp_ratio=1 / 64),  # the 7x7x512x4096 pre-logits conv is shrunk
    "vit_tiny": lambda: _timm("vit_tiny_patch16_224", img_size=32, patch_size=8),
    "hf_vit": lambda: tiny_hf_vit().eval(),
    "gpt2": lambda: tiny_gpt2().eval(),
}


def _inputs(name: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if name == "gpt2":
        return torch.randint(0, 128, (2, 16), generator=generator)
    return torch.randn(2, 3, 32, 32, generator=generator)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


def _compressed(name: str, method: str = "hashednets", **kwargs) -> tuple[nn.Module, torch.Tensor]:
    model = MODELS[name]()
    compress(model, budget="1/64", method=method, **kwargs)
    return model, _inputs(name)


def _untargeted_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if ".parametrizations." not in k)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# -- round trips --------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["resnet18", "vit_tiny"])
@pytest.mark.parametrize("method", available_methods())
def test_every_method_saves_small_and_round_trips(tmp_path, method, model_name):
    model, x = _compressed(model_name, method)
    finalize(model)  # training is over: storage reaches its final form before saving
    report = get_reports(model)[0]
    folder = save_pretrained(model, tmp_path / "ckpt")
    folder_bytes, bound = _folder_bytes(folder), report.stored_bytes + _untargeted_bytes(model) + 64 * 1024
    loaded = from_pretrained(folder)
    assert torch.equal(_logits(loaded, x), _logits(model, x))
    assert not {layer.name for layer in report.layers} & {name for name, _ in loaded.named_parameters()}
    assert folder_bytes <= bound


def test_skeleton_never_holds_dense_weights(tmp_path, monkeypatch):
    model, _ = _compressed("vit_tiny")
    folder = save_pretrained(model, tmp_path / "ckpt")
    seen = []

    def spy(record):
        skeleton = build(record)
        seen.extend(p.device.type for p in skeleton.parameters())
        return skeleton

    build = architecture.build
    monkeypatch.setattr(architecture, "build", spy)
    from_pretrained(folder)
    assert seen and set(seen) == {"meta"}


FRESH_PROCESS = """
import sys, torch
from safetensors.torch import load_file, save_file
from hf_freqcompress import from_pretrained
torch.set_num_threads(int(sys.argv[3]))
inputs = load_file(sys.argv[1])
out = {}
for name in sys.argv[4:]:
    with torch.no_grad():
        y = from_pretrained(f"{sys.argv[2]}/{name}")(inputs[name])
    out[name] = getattr(y, "logits", y).contiguous()
save_file(out, f"{sys.argv[2]}/logits.safetensors")
"""


def test_fresh_process_reproduces_logits_exactly(tmp_path):
    inputs, expected = {}, {}
    for name in MODELS:
        model, x = _compressed(name)
        save_pretrained(model, tmp_path / name)
        inputs[name], expected[name] = x, _logits(model, x)
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    argv = [str(tmp_path / "inputs.safetensors"), str(tmp_path), str(torch.get_num_threads()), *MODELS]
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, *argv], check=True, env=env, cwd=tmp_path)
    got = load_file(str(tmp_path / "logits.safetensors"))
    for name in MODELS:
        assert got[name].dtype == expected[name].dtype
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize("storage_dtype", ["float16", "bfloat16"])
def test_storage_dtype_applies_to_stored_floats_only(tmp_path, storage_dtype):
    model, x = _compressed("vit_tiny", storage_dtype=storage_dtype)
    folder = save_pretrained(model, tmp_path / "ckpt")
    short = {"float16": "F16", "bfloat16": "BF16"}[storage_dtype]
    with safe_open(str(folder / WEIGHTS), "pt") as file:
        dtypes = {key: file.get_slice(key).get_dtype() for key in file.keys()}
    assert {d for k, d in dtypes.items() if ".parametrizations." in k} == {short}
    assert {d for k, d in dtypes.items() if ".parametrizations." not in k} == {"F32"}
    loaded = from_pretrained(folder)
    with torch.no_grad():  # the reference: the same model with its stored values rounded like the file
        for name, param in model.named_parameters():
            if ".parametrizations." in name:
                param.copy_(param.to(getattr(torch, storage_dtype)))
    assert next(loaded.parameters()).dtype == torch.float32
    assert torch.equal(_logits(loaded, x), _logits(model, x))


def test_tied_weights_are_saved_once_and_stay_tied(tmp_path):
    model, x = _compressed("gpt2")
    folder = save_pretrained(model, tmp_path / "ckpt")
    with safe_open(str(folder / WEIGHTS), "pt") as file:
        assert "lm_head.weight" not in file.keys()
    loaded = from_pretrained(folder)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert json.loads((folder / "config.json").read_text())["n_embd"] == 64


# -- a method with packed integer state and a non-persistent cache --------------


@dataclass
class PackedConfig(MethodConfig):
    method = "test_packed"


class PackedWeight(CompressedWeight):
    """W[i] = levels[codes[i]] * v[i mod K]: int8 codes (persistent), a float scale, a computed table."""

    config_class = PackedConfig

    def __init__(self, spec, layer_kind, config, stored_values, seed, device=None) -> None:
        super().__init__(spec, layer_kind, config, stored_values, seed, device)
        self.register_buffer("codes", torch.zeros(spec.numel, dtype=torch.int8, device=device))
        self.scale = nn.Parameter(torch.full((1,), 0.7, device=device))
        self.register_buffer("levels", torch.linspace(-1, 1, 5, device=device), persistent=False)
        self.register_buffer("position", torch.arange(spec.numel, device=device) % self.planned_values, persistent=False)

    def reconstruct(self, original):
        return (self.levels[self.codes.long()] * original[self.position] * self.scale).view(self.spec.shape)

    def project(self, weight):
        flat = weight.reshape(-1)
        self.codes.copy_(((flat / flat.abs().max()).clamp(-1, 1) * 2 + 2).round().to(torch.int8))
        return torch.full((self.planned_values,), float(flat.abs().mean()), dtype=weight.dtype, device=weight.device)


@pytest.fixture
def packed_method(monkeypatch):
    monkeypatch.setitem(registry._METHODS, PackedConfig.method, PackedWeight)


def test_method_state_is_saved_generically_and_caches_rebuilt(tmp_path, packed_method):
    model, x = _compressed("vit_tiny", "test_packed", storage_dtype="float16")
    folder = save_pretrained(model, tmp_path / "ckpt")
    with safe_open(str(folder / WEIGHTS), "pt") as file:
        assert file.get_slice("blocks.0.mlp.fc1.parametrizations.weight.0.codes").get_dtype() == "I8"
        assert file.get_slice("blocks.0.mlp.fc1.parametrizations.weight.0.scale").get_dtype() == "F16"
        assert file.get_slice("blocks.0.mlp.fc1.parametrizations.weight.original").get_dtype() == "F16"
    loaded = from_pretrained(folder)
    layer = loaded.blocks[0].mlp.fc1.parametrizations.weight[0]
    assert torch.equal(layer.levels, torch.linspace(-1, 1, 5)) and not layer.position.is_meta
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".parametrizations." in name:
                param.copy_(param.half())
    assert torch.equal(_logits(loaded, x), _logits(model, x))


def test_method_not_installed_is_a_clear_error(tmp_path, packed_method, monkeypatch):
    model, _ = _compressed("vit_tiny", "test_packed")
    folder = save_pretrained(model, tmp_path / "ckpt")
    monkeypatch.delitem(registry._METHODS, PackedConfig.method)
    with pytest.raises(ValueError, match=r"unknown method 'test_packed'.*available methods"):
        from_pretrained(folder)


def test_hashednets_rebuild_caches_matches_construction():
    model, _ = _compressed("vit_tiny", HashedNetsConfig(cache_indices=True))
    layer = model.blocks[0].attn.qkv.parametrizations.weight[0]
    expected = layer.signed_index.clone()
    layer.signed_index = torch.zeros_like(expected)
    layer.rebuild_caches(torch.device("cpu"))
    assert torch.equal(layer.signed_index, expected)
    layer.signed_index = torch.zeros_like(expected)
    CompressedWeight.rebuild_caches(layer, torch.device("cpu"))  # the generic default gives the same
    assert torch.equal(layer.signed_index, expected)


# -- the Hub --------------------------------------------------------------------


def test_push_then_load_by_repo_id_online_and_offline(local_hub, monkeypatch):
    model, x = _compressed("vit_tiny")
    url = push_to_hub(model, "user/tiny-vit", base_model="timm/vit_tiny_patch16_224.augreg_in21k")
    repo = local_hub.repos["user/tiny-vit"]
    assert url.endswith(f"/user/tiny-vit/commit/{repo.sha}")
    assert sorted(repo.files) == ["README.md", CONFIG, "config.json", WEIGHTS]
    assert ("POST", "/api/models/user/tiny-vit/commit/main") in local_hub.requests
    assert 'from_pretrained("user/tiny-vit")' in repo.files["README.md"].decode()

    loaded = from_pretrained("user/tiny-vit")
    assert ("GET", f"/user/tiny-vit/resolve/{repo.sha}/{WEIGHTS}") in local_hub.requests
    assert torch.equal(_logits(loaded, x), _logits(model, x))

    served = len(local_hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    again = from_pretrained("user/tiny-vit")  # from the cache, through huggingface_hub's offline path
    assert len(local_hub.requests) == served
    assert torch.equal(_logits(again, x), _logits(model, x))


def test_loader_takes_the_hub_keyword_arguments(local_hub, tmp_path, monkeypatch):
    first, x = _compressed("vit_tiny", seed=1)
    second, _ = _compressed("vit_tiny", seed=2)
    push_to_hub(first, "user/kw")
    pinned = local_hub.repos["user/kw"].sha
    push_to_hub(second, "user/kw")
    HfApi().upload_folder(repo_id="user/kw", folder_path=save_pretrained(first, tmp_path / "sub"), path_in_repo="sub")
    assert torch.equal(_logits(from_pretrained("user/kw", revision=pinned), x), _logits(first, x))
    assert torch.equal(_logits(from_pretrained("user/kw"), x), _logits(second, x))
    assert torch.equal(_logits(from_pretrained("user/kw", subfolder="sub"), x), _logits(first, x))
    assert torch.equal(_logits(from_pretrained(tmp_path, subfolder="sub"), x), _logits(first, x))
    with pytest.raises(ValueError, match="relative path inside the repo"):
        from_pretrained("user/kw", subfolder="../outside")

    cache = tmp_path / "own-cache"
    from_pretrained("user/kw", cache_dir=cache, token="hf_explicit_token")
    assert any(cache.rglob(WEIGHTS)) and "Bearer hf_explicit_token" in local_hub.authorizations
    served = len(local_hub.requests)
    assert torch.equal(_logits(from_pretrained("user/kw", cache_dir=cache, local_files_only=True), x), _logits(second, x))
    assert len(local_hub.requests) == served
    with pytest.raises(Exception, match="(?i)cache|local"):
        from_pretrained("user/never-downloaded", local_files_only=True)


def test_loader_dtype_and_device_map(tmp_path):
    model, x = _compressed("gpt2")
    folder = save_pretrained(model, tmp_path / "ckpt")
    half = from_pretrained(folder, dtype="bfloat16", device_map="auto")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert torch.equal(_logits(half, x), _logits(model.to(torch.bfloat16), x))
    assert next(from_pretrained(folder, device_map={"": "cpu"}).parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="splits the model"):
        from_pretrained(folder, device_map={"transformer": "cpu", "lm_head": "cpu"})
    with pytest.raises(ValueError, match="device or device_map, not both"):
        from_pretrained(folder, device="cpu", device_map="cpu")


def test_timm_folder_has_a_timm_style_config(tmp_path):
    model, _ = _compressed("vit_tiny")
    folder = save_pretrained(model, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 10
    assert config["model_args"]["patch_size"] == 8 and config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    lenet = build_model("timm:mnist_lenet")
    compress(lenet, budget="1/16")
    config = json.loads((save_pretrained(lenet, tmp_path / "lenet") / "config.json").read_text())
    assert config["architecture"] == "mnist_lenet" and config["num_features"] == 500


def test_a_transformers_written_folder_points_to_the_auto_classes(tmp_path):
    model, _ = _compressed("gpt2")
    model.save_pretrained(tmp_path / "theirs")
    with pytest.raises(FileNotFoundError, match="AutoModelFor"):
        from_pretrained(tmp_path / "theirs")


def test_cli_push_uploads_a_saved_folder(local_hub, tmp_path, capsys):
    model, x = _compressed("gpt2")
    folder = save_pretrained(model, tmp_path / "ckpt")
    assert main(["push", str(folder), "user/tiny-gpt2"]) == 0
    assert capsys.readouterr().out.strip().endswith(local_hub.repos["user/tiny-gpt2"].sha)
    assert sorted(local_hub.repos["user/tiny-gpt2"].files) == ["README.md", CONFIG, "config.json", WEIGHTS]
    assert torch.equal(_logits(from_pretrained("user/tiny-gpt2"), x), _logits(model, x))


def test_cli_push_refuses_a_broken_folder(local_hub, tmp_path, capsys):
    model, _ = _compressed("vit_tiny")
    folder = save_pretrained(model, tmp_path / "ckpt")
    with open(folder / WEIGHTS, "r+b") as file:
        file.truncate(1000)
    assert main(["push", str(folder), "user/broken"]) == 2
    assert "truncated" in capsys.readouterr().err
    assert not local_hub.requests


# -- bad input: a clear error, nothing written or changed ------------------------


@pytest.fixture(scope="module")
def saved_vit(tmp_path_factory) -> Path:
    model, _ = _compressed("vit_tiny")
    return save_pretrained(model, tmp_path_factory.mktemp("saved") / "vit")


def _edit_config(folder: Path, edit) -> None:
    data = json.loads((folder / CONFIG).read_text())
    edit(data)
    (folder / CONFIG).write_text(json.dumps(data))


def _rewrite_weights(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace model.safetensors and record its size and checksum, as a consistent but wrong folder."""
    save_file(tensors, str(folder / WEIGHTS))
    _record_weights(folder)


def _record_weights(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    record = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _edit_config(folder, lambda config: config["files"].update({WEIGHTS: record}))


def _other_architecture(folder: Path) -> None:
    _edit_config(folder, lambda c: c["base_model"].update(name="vit_small_patch16_224"))


def _other_head(folder: Path) -> None:
    _edit_config(folder, lambda c: c["base_model"]["kwargs"].update(num_classes=7))


def _weights_of_another_model(folder: Path) -> None:
    other, _ = _compressed("resnet18")
    _rewrite_weights(folder, {k: v.contiguous() for k, v in other.state_dict().items()})


def _loading_kwargs(folder: Path) -> None:
    _edit_config(folder, lambda c: c["base_model"]["kwargs"].update(checkpoint_path="/tmp/evil.pth"))


def _newer_format(folder: Path) -> None:
    _edit_config(folder, lambda c: c.update(format_version=99))


def _truncated(folder: Path) -> None:
    with open(folder / WEIGHTS, "r+b") as file:
        file.truncate((folder / WEIGHTS).stat().st_size - 100)


def _flipped_byte(folder: Path) -> None:
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / WEIGHTS).write_bytes(bytes(data))


def _garbled_header(folder: Path) -> None:
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[8:40] = b"{" * 32
    (folder / WEIGHTS).write_bytes(bytes(data))
    _record_weights(folder)


def _missing_tensor(folder: Path) -> None:
    tensors = load_file(str(folder / WEIGHTS))
    del tensors["blocks.1.attn.proj.parametrizations.weight.original"]
    _rewrite_weights(folder, tensors)


def _unknown_method(folder: Path) -> None:
    def edit(config):
        config["compressions"][0]["method_config"]["method"] = "nosuchmethod"
        config["compressions"][0]["report"]["method"] = "nosuchmethod"

    _edit_config(folder, edit)


def _bad_field(folder: Path) -> None:
    _edit_config(folder, lambda c: c["compressions"][0].update(planned_values="many"))


def _not_json(folder: Path) -> None:
    (folder / CONFIG).write_text("{not json")


BAD_FOLDERS = {
    "other_architecture": (_other_architecture, "another architecture"),
    "other_head": (_other_head, r"head\.bias. has shape \[10\] but the model.s is \[7\].*another architecture"),
    "weights_of_another_model": (_weights_of_another_model, "lacks tensor"),
    "loading_kwargs": (_loading_kwargs, r"\['checkpoint_path'\] would load weights"),
    "newer_format": (_newer_format, "format_version 99, newer.*upgrade hf-freqcompress"),
    "truncated": (_truncated, "truncated"),
    "flipped_byte": (_flipped_byte, "corrupted"),
    "garbled_header": (_garbled_header, "not a readable safetensors file"),
    "missing_tensor": (_missing_tensor, r"lacks tensor.*blocks\.1\.attn\.proj\.parametrizations\.weight\.original"),
    "unknown_method": (_unknown_method, "unknown method 'nosuchmethod'.*install the hf-freqcompress version"),
    "bad_field": (_bad_field, "planned_values must be a list of ints"),
    "not_json": (_not_json, "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_bad_folder_is_refused_clearly_and_left_alone(saved_vit, tmp_path, case):
    damage, message = BAD_FOLDERS[case]
    folder = damaged_copy(saved_vit, tmp_path, damage)
    before = _snapshot(folder)
    with pytest.raises(ValueError, match=message):
        from_pretrained(folder)
    assert _snapshot(folder) == before


def test_missing_folder_or_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an hf-freqcompress checkpoint folder"):
        from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a valid Hub repo id"):
        from_pretrained(str(tmp_path / "no" / "such" / "dir"))


def test_saving_an_uncompressed_model_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="no compression to save; call compress"):
        save_pretrained(_timm("resnet18"), tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_saving_a_plain_module_names_what_is_supported(tmp_path, mlp):
    compress(mlp, exclude=[])
    with pytest.raises(ValueError, match="supports timm models.*transformers"):
        save_pretrained(mlp, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_needs_the_flag_and_is_atomic(tmp_path, monkeypatch):
    first, x = _compressed("vit_tiny", seed=1)
    second, _ = _compressed("vit_tiny", seed=2)
    folder = save_pretrained(first, tmp_path / "ckpt")
    before = _snapshot(folder)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pretrained(second, folder)
    assert _snapshot(folder) == before

    def fail(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(hub, "write_tensors", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(second, folder, overwrite=True)
    assert _snapshot(folder) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left behind
    monkeypatch.undo()

    save_pretrained(second, folder, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert torch.equal(_logits(from_pretrained(folder), x), _logits(second, x))


def test_never_replaces_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    model, _ = _compressed("vit_tiny")
    with pytest.raises(FileExistsError, match="not an hf-freqcompress checkpoint; refusing"):
        save_pretrained(model, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# -- base architecture record ----------------------------------------------------


def test_timm_kwargs_are_recovered_or_asked_for(tmp_path):
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10).eval()
    compress(plain, budget="1/64")
    x = _inputs("vit_tiny")
    assert torch.equal(_logits(from_pretrained(save_pretrained(plain, tmp_path / "a")), x), _logits(plain, x))

    patched = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8).eval()
    compress(patched, budget="1/64")
    with pytest.raises(ValueError, match=r"pos_embed.*base_model_kwargs"):
        save_pretrained(patched, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    folder = save_pretrained(patched, tmp_path / "b", base_model_kwargs={"patch_size": 8})
    loaded = from_pretrained(folder)
    assert torch.equal(_logits(loaded, x), _logits(patched, x))
    resaved = save_pretrained(loaded, tmp_path / "c")  # a loaded model remembers its kwargs
    assert torch.equal(_logits(from_pretrained(resaved), x), _logits(patched, x))


def test_model_card_metadata_and_body(tmp_path):
    model, _ = _compressed("resnet18")
    folder = save_pretrained(
        model, tmp_path / "ckpt", base_model="timm/resnet18.a1_in1k", datasets=["mnist"], metrics={"accuracy": 0.97}
    )
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "hf-freqcompress"
    assert {"hf-freqcompress", "hashednets", "timm"} <= set(card.data.tags)
    assert card.data.base_model == "timm/resnet18.a1_in1k"
    assert card.data.datasets == ["mnist"] and card.data.metrics == ["accuracy"]
    assert "| accuracy | 0.97 |" in card.text
    assert "layer1.0.conv1.weight" in card.text and 'from_pretrained("ckpt")' in card.text


def test_cli_compress_out_and_info(tmp_path, capsys):
    folder = tmp_path / "ckpt"
    args = ["compress", "--model", "timm:resnet18", "--random-init", "--model-arg", "num_classes=10", "--budget", "1/64"]
    assert main([*args, "--out", str(folder)]) == 0
    assert main([*args, "--out", str(folder)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "base model: timm resnet18" in out and "hashednets at budget 1/64" in out and WEIGHTS in out


# -- materialize ---------------------------------------------------------------------


def _assert_plain(model: nn.Module) -> None:
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert b"hf_freqcompress" not in pickle.dumps(model)  # no class, attribute or hook of this library left


def test_materialized_timm_model_exports(tmp_path):
    model, x = _compressed("vit_tiny")
    loaded = from_pretrained(save_pretrained(model, tmp_path / "ckpt"))
    expected = _logits(loaded, x)
    materialize(loaded)
    _assert_plain(loaded)
    assert torch.equal(_logits(loaded, x), expected)
    assert torch.equal(torch.export.export(loaded, (x,)).module()(x), expected)
    save_file(loaded.state_dict(), str(tmp_path / "dense.safetensors"))
    fresh = _timm("vit_tiny_patch16_224", img_size=32, patch_size=8)
    timm.models.load_checkpoint(fresh, str(tmp_path / "dense.safetensors"))
    assert torch.equal(_logits(fresh, x), expected)


def test_materialized_transformers_model_saves_with_transformers(tmp_path):
    from transformers import GPT2LMHeadModel

    model, x = _compressed("gpt2")
    loaded = from_pretrained(save_pretrained(model, tmp_path / "ckpt"))
    expected = _logits(loaded, x)
    materialize(loaded)
    _assert_plain(loaded)
    assert type(loaded) is GPT2LMHeadModel and torch.equal(_logits(loaded, x), expected)
    loaded.save_pretrained(tmp_path / "dense")
    assert torch.equal(_logits(GPT2LMHeadModel.from_pretrained(tmp_path / "dense").eval(), x), expected)
