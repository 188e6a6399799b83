"""transformers loads and saves compressed checkpoints natively: AutoModelFor*.from_pretrained, save_pretrained,
push_to_hub, Trainer, dequantize; bad records are refused; loading allocates no dense weight."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import damaged_copy, tiny_bert, tiny_clip, tiny_gpt2, tiny_hf_vit, tiny_t5
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.nn.utils import parametrize

import hf_freqcompress
from hf_freqcompress import available_methods, compress, finalize, materialize, push_to_hub, save_pretrained
from hf_freqcompress.card import transformers_usage
from hf_freqcompress.integrations.transformers import HfFreqCompressConfig, HfFreqCompressQuantizer

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from logit_digests import tensor_digest  # noqa: E402
from transformers_digests import family_inputs, model_logits  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "helpers" / "transformers_digests.py"
FAMILIES = {"gpt2": tiny_gpt2, "bert": tiny_bert, "vit": tiny_hf_vit, "t5": tiny_t5, "clip": tiny_clip}


def _inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 16), generator=generator)
    pixels = torch.randn(2, 3, 32, 32, generator=generator)
    inputs = {
        "gpt2.input_ids": ids, "bert.input_ids": ids, "vit.pixel_values": pixels,
        "t5.input_ids": ids, "t5.decoder_input_ids": ids[:, :5],
        "clip.input_ids": ids, "clip.pixel_values": pixels,
    }
    return {key: value.clone() for key, value in inputs.items()}  # safetensors saves no shared memory


INPUTS = _inputs()


def _compressed(family: str, method: str = "hashednets") -> transformers.PreTrainedModel:
    model = FAMILIES[family]().eval()
    compress(model, budget="1/16", method=method)
    finalize(model)  # training is over: storage reaches its final form before saving
    return model


def _digest(model: torch.nn.Module, family: str) -> str:
    return tensor_digest(model_logits(model, family_inputs(INPUTS, family)))


def _auto_class(model: transformers.PreTrainedModel) -> str:
    return transformers_usage(type(model).__name__)[0]


def _fresh_digests(tmp_path: Path, spec: dict[str, list[str]], env: dict[str, str] | None = None) -> dict[str, str]:
    """Load every entry of ``spec`` in one fresh process (helpers/transformers_digests.py); their logits' digests."""
    save_file(INPUTS, str(tmp_path / "inputs.safetensors"))
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run = subprocess.run(
        [sys.executable, str(HELPER), str(tmp_path / "inputs.safetensors"), str(tmp_path / "spec.json")],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


# -- every family x every method x both writers, from folders and from the Hub, in a fresh process ------


def test_auto_classes_load_both_writers_bit_exactly(tmp_path, local_hub):
    spec, expected = {}, {}
    cases = [(family, method) for family in ("gpt2", "bert", "vit", "t5") for method in available_methods()]
    for family, method in [*cases, ("clip", "pq")]:  # CLIP: its embeddings' init reads a compressed child
        torch.manual_seed(0)
        model = _compressed(family, method)
        auto, digest = _auto_class(model), _digest(model, family)
        for writer in ("ours", "transformers"):
            label = f"{family}-{method}-{writer}"
            repo = f"user/{label}"
            if writer == "ours":
                save_pretrained(model, tmp_path / label)
                push_to_hub(model, repo)
            else:
                model.save_pretrained(tmp_path / label)
                model.push_to_hub(repo)
            for source in (str(tmp_path / label), repo):
                spec[source] = [auto, source, family]
                expected[source] = digest
    assert _fresh_digests(tmp_path, spec, local_hub.env) == expected


def test_both_writers_record_the_compression(tmp_path):
    model = _compressed("gpt2")
    ours, theirs = save_pretrained(model, tmp_path / "ours"), tmp_path / "theirs"
    model.save_pretrained(theirs)
    for folder in (ours, theirs):
        quantization = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert quantization["quant_method"] == "hf_freqcompress" and quantization["format_version"] == 1
        assert quantization["compressions"][0]["method_config"]["method"] == "hashednets"
        assert quantization["tied_tensors"] == {"lm_head.weight": "transformer.wte.weight"}
        with safe_open(str(folder / "model.safetensors"), "pt") as file:
            assert file.metadata() == {"format": "pt", "hf_freqcompress_format": "1"}
            assert "transformer.h.0.attn.c_attn.parametrizations.weight.original" in file.keys()
            assert "transformer.h.0.attn.c_attn.weight" not in file.keys()
    compression = json.loads((ours / "compression_config.json").read_text())
    assert compression["base_model"]["class"] == "GPT2LMHeadModel"
    assert "quantization_config" not in compression["base_model"]["config"]


def test_loaded_model_matches_our_loader(tmp_path):
    model = _compressed("bert", "freshnets")
    folder = save_pretrained(model, tmp_path / "ckpt")
    ours = hf_freqcompress.from_pretrained(folder)
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
    for loaded in (ours, theirs):
        assert isinstance(loaded.hf_quantizer, HfFreqCompressQuantizer) and loaded.is_quantized
        assert loaded.config.quantization_config.to_dict() == model.config.quantization_config.to_dict()
        assert hf_freqcompress.get_reports(loaded) == hf_freqcompress.get_reports(model)
        assert not loaded.training
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(ours.state_dict()[key], value) for key, value in theirs.state_dict().items())
    assert _digest(ours, "bert") == _digest(theirs, "bert") == _digest(model, "bert")


# -- training, dequantizing, plain transformers --------------------------------------------------


def test_trainer_step_updates_the_stored_values(tmp_path):
    save_pretrained(_compressed("gpt2"), tmp_path / "ckpt")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    stored = model.transformer.h[0].attn.c_attn.parametrizations.weight.original
    before = stored.detach().clone()
    ids = INPUTS["gpt2.input_ids"]
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    result = transformers.Trainer(model=model, args=args, train_dataset=data).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(model.transformer.h[0].attn.c_attn.parametrizations.weight.original, before)
    assert "transformer.h.0.attn.c_attn.weight" not in dict(model.named_parameters())


PLAIN_TRANSFORMERS = """
import sys, torch, transformers
from safetensors.torch import load_file
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
with torch.no_grad():
    logits = model(load_file(sys.argv[3])["gpt2.input_ids"]).logits
assert torch.equal(logits, load_file(sys.argv[4])["logits"]), "dense reload differs"
transformers.AutoModelForCausalLM.from_pretrained(sys.argv[2])  # compressed, without import hf_freqcompress
assert "hf_freqcompress" not in sys.modules
print("plain transformers ok")
"""


def test_materialized_model_is_plain_transformers(tmp_path):
    save_pretrained(_compressed("gpt2"), tmp_path / "ckpt")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    expected = model_logits(model, family_inputs(INPUTS, "gpt2"))
    twin = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").dequantize()
    materialize(model)
    for plain in (model, twin):
        assert not any(parametrize.is_parametrized(m) for m in plain.modules())
        assert b"hf_freqcompress" not in pickle.dumps(plain)
        assert not hasattr(plain.config, "quantization_config") and getattr(plain, "hf_quantizer", None) is None
        assert torch.equal(model_logits(plain, family_inputs(INPUTS, "gpt2")), expected)
    model.save_pretrained(tmp_path / "dense")
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    save_file(INPUTS, str(tmp_path / "inputs.safetensors"))
    save_file({"logits": expected.contiguous()}, str(tmp_path / "logits.safetensors"))
    argv = [tmp_path / "dense", tmp_path / "ckpt", tmp_path / "inputs.safetensors", tmp_path / "logits.safetensors"]
    run = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, *map(str, argv)], capture_output=True,
                         text=True, cwd=tmp_path, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    # what the README promises about a compressed folder loaded without `import hf_freqcompress`:
    assert "Unknown quantization type, got hf_freqcompress" in run.stderr and "MISSING" in run.stderr


REGISTRATION = """
import sys
import hf_freqcompress
assert "transformers" not in sys.modules, "import hf_freqcompress imported transformers"
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
assert AUTO_QUANTIZER_MAPPING["hf_freqcompress"].__name__ == "HfFreqCompressQuantizer"
assert AUTO_QUANTIZATION_CONFIG_MAPPING["hf_freqcompress"].__name__ == "HfFreqCompressConfig"
print("registered lazily")
"""


def test_import_registers_the_quantizer_without_importing_transformers():
    run = subprocess.run([sys.executable, "-c", REGISTRATION], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZER_MAPPING["hf_freqcompress"] is HfFreqCompressQuantizer  # already imported: at once


# -- memory -----------------------------------------------------------------------------------------

PEAK_MEMORY = """
import sys, transformers, hf_freqcompress
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])  # warm-up: lazy imports, first-use allocations
open("/proc/self/clear_refs", "w").write("5")  # reset the peak resident size (VmHWM)
before = status("VmRSS:")
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[2])
print(status("VmHWM:") - before)
"""


def test_loading_peak_memory_stays_near_the_compressed_size(tmp_path):
    config = transformers.GPT2Config(n_layer=4, n_embd=768, n_head=12, vocab_size=128, n_positions=64)
    model = transformers.GPT2LMHeadModel(config)  # ~113 MB of dense weights in the compressed layers
    method = {"method": "hashednets", "cache_indices": False, "block_size": 16}  # no dense-size index cache
    report = compress(model, budget="1/64", method=method)
    dense_bytes = report.dense_values * 4
    folder = save_pretrained(model, tmp_path / "big")
    del model
    save_pretrained(_compressed("gpt2"), tmp_path / "warmup")
    run = subprocess.run([sys.executable, "-c", PEAK_MEMORY, str(tmp_path / "warmup"), str(folder)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    peak = int(run.stdout.strip().splitlines()[-1])
    folder_bytes = sum(path.stat().st_size for path in folder.iterdir())
    assert dense_bytes > 100e6 and folder_bytes < dense_bytes / 40
    assert peak < min(folder_bytes + 8e6, dense_bytes / 10), (peak, folder_bytes, dense_bytes)


# -- bad input: a clear error, never a silently random model ------------------------------------------


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_pretrained(_compressed("gpt2"), tmp_path_factory.mktemp("saved") / "gpt2")


def _edit_quantization(folder: Path, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config["quantization_config"])
    path.write_text(json.dumps(config))


def _future_weights(folder: Path) -> None:
    (folder / "compression_config.json").unlink()
    tensors = load_file(str(folder / "model.safetensors"))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt", "hf_freqcompress_format": "2"})


def _foreign_weights(folder: Path) -> None:
    (folder / "compression_config.json").unlink()
    save_file({"transformer.wte.weight": torch.zeros(128, 64)}, str(folder / "model.safetensors"))


def _method_config(config: dict) -> dict:
    return config["compressions"][0]["method_config"]


BAD_FOLDERS = {
    "unknown_method": (lambda f: _edit_quantization(f, lambda q: _method_config(q).update(method="nosuch")),
                       "unknown method 'nosuch'.*available methods"),
    "future_format": (lambda f: _edit_quantization(f, lambda q: q.update(format_version=2)),
                      "format_version 2, newer than this hf-freqcompress reads.*upgrade"),
    "bad_planned_values": (lambda f: _edit_quantization(f, lambda q: q["compressions"][0].update(planned_values="x")),
                           "planned_values must be a list of ints"),
    "bad_tied_tensors": (lambda f: _edit_quantization(f, lambda q: q.update(tied_tensors=[])),
                         "field 'tied_tensors' must be a dict"),
    "unknown_field": (lambda f: _edit_quantization(f, lambda q: q.update(extra=1)), r"unknown field\(s\) \['extra'\]"),
    "no_compressions": (lambda f: _edit_quantization(f, lambda q: q.update(compressions=[])), "lists no compression"),
    "disagrees": (lambda f: _edit_quantization(f, lambda q: q["compressions"][0]["report"].update(seed=7)),
                  "describe different compressions.*mixes two saves"),
    "future_weights": (_future_weights, "format '2'.*upgrade hf-freqcompress"),
    "foreign_weights": (_foreign_weights, "lacks tensor transformer.h.0.attn.c_attn.parametrizations"),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_bad_record_is_a_clear_error(saved_gpt2, tmp_path, case):
    damage, message = BAD_FOLDERS[case]
    with pytest.raises(ValueError, match=message):
        transformers.AutoModelForCausalLM.from_pretrained(damaged_copy(saved_gpt2, tmp_path, damage))


def test_another_head_class_is_refused(saved_gpt2):
    with pytest.raises(ValueError, match="saved from GPT2LMHeadModel.*not GPT2ForSequenceClassification"):
        transformers.AutoModelForSequenceClassification.from_pretrained(saved_gpt2)


def test_config_on_a_dense_checkpoint_is_refused(saved_gpt2, tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "dense")
    config = HfFreqCompressConfig.from_dict(json.loads((saved_gpt2 / "config.json").read_text())["quantization_config"])
    with pytest.raises(ValueError, match="call hf_freqcompress.compress"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=config)
