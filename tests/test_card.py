"""The model card: Hub metadata (base model, relation, library, task, license, tags), both loaders, safe pushes."""

from __future__ import annotations

import pytest
import transformers
from conftest import tiny_bert, tiny_gpt2, tiny_hf_vit
from huggingface_hub import HfApi, ModelCard

from hf_freqcompress import compress, push_to_hub, save_pretrained
from hf_freqcompress.card import BEGIN, END
from hf_freqcompress.models import build_model
from hf_freqcompress.state import SOURCE_ATTRIBUTE


def _card(model, tmp_path, **kwargs) -> ModelCard:
    compress(model, budget="1/16")
    return ModelCard.load(save_pretrained(model, tmp_path / "ckpt", **kwargs) / "README.md")


def test_transformers_card_names_its_base_task_and_both_loaders(tmp_path):
    model = tiny_gpt2()
    model.config._name_or_path = "openai-community/gpt2"  # as from_pretrained("openai-community/gpt2") sets it
    card = _card(model, tmp_path, card_name="user/gpt2-1-16")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert data.base_model == "openai-community/gpt2" and data.base_model_relation == "quantized"
    assert {"hf-freqcompress", "compressed", "hashednets", "transformers"} <= set(data.tags)
    assert "import hf_freqcompress\nfrom transformers import AutoModelForCausalLM" in card.text
    assert 'AutoModelForCausalLM.from_pretrained("user/gpt2-1-16")' in card.text
    assert 'from hf_freqcompress import from_pretrained' in card.text and 'from_pretrained("user/gpt2-1-16")' in card.text
    assert card.text.count(BEGIN) == card.text.count(END) == 1


@pytest.mark.parametrize(
    "build, task, auto_class",
    [(tiny_bert, "text-classification", "AutoModelForSequenceClassification"),
     (tiny_hf_vit, "image-classification", "AutoModelForImageClassification")],
)
def test_pipeline_tag_and_auto_class_follow_the_head(tmp_path, build, task, auto_class):
    card = _card(build(), tmp_path)
    assert card.data.pipeline_tag == task and f"from transformers import {auto_class}" in card.text
    assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()


def test_local_paths_and_loaded_checkpoints_are_not_base_models(tmp_path):
    model = tiny_gpt2()
    model.config._name_or_path = str(tmp_path)  # loaded from a local folder
    assert _card(model, tmp_path / "a").data.base_model is None
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "ckpt")
    loaded.config._name_or_path = "user/compressed"  # as loading the compressed repo sets it
    folder = save_pretrained(loaded, tmp_path / "again")
    assert ModelCard.load(folder / "README.md").data.base_model is None


def test_timm_base_model_and_license_come_from_where_the_weights_came_from(tmp_path):
    model = build_model("timm:test_resnet", pretrained=False, num_classes=10)
    setattr(model, SOURCE_ATTRIBUTE, {"spec": "timm:test_resnet.r160_in1k", "pretrained": True,
                                      "weights": "timm/test_resnet.r160_in1k"})
    card = _card(model, tmp_path)
    assert card.data.library_name == "hf-freqcompress" and card.data.pipeline_tag is None
    assert card.data.base_model == "timm/test_resnet.r160_in1k" and card.data.license == "apache-2.0"
    assert "AutoModel" not in card.text and 'from_pretrained("ckpt")' in card.text
    explicit = _card(build_model("timm:test_resnet", pretrained=False, num_classes=10), tmp_path / "b",
                     base_model="timm/resnet18.tv_in1k", license="bsd-3-clause")
    assert explicit.data.base_model == "timm/resnet18.tv_in1k" and explicit.data.license == "bsd-3-clause"


def _readme(local_hub, repo: str) -> str:
    return local_hub.repos[repo].files["README.md"].decode()


def test_push_merges_into_a_card_edited_on_the_hub(local_hub):
    model = tiny_gpt2()
    compress(model, budget="1/16", seed=1)
    push_to_hub(model, "user/edited")
    text = _readme(local_hub, "user/edited")
    head, _, body = text.partition(BEGIN)
    edited = head.replace("tags:", "license: mit\ntags:\n- my-tag") + "My own intro.\n\n" + BEGIN + body + "\nMy notes.\n"
    HfApi().upload_file(path_or_fileobj=edited.encode(), path_in_repo="README.md", repo_id="user/edited")

    again = tiny_gpt2()
    compress(again, budget="1/16", seed=2)
    push_to_hub(again, "user/edited")
    merged = ModelCard(_readme(local_hub, "user/edited"))
    assert merged.data.license == "mit" and {"my-tag", "hashednets", "compressed"} <= set(merged.data.tags)
    assert merged.data.library_name == "transformers"
    assert merged.text.index("My own intro.") < merged.text.index(BEGIN) < merged.text.index("My notes.")
    assert "seed 2" in merged.text and "seed 1" not in merged.text

    push_to_hub(again, "user/edited", replace_card=True)
    assert "My own intro." not in _readme(local_hub, "user/edited")


def test_push_keeps_a_card_rewritten_without_markers_and_refuses_broken_metadata(local_hub):
    model = tiny_gpt2()
    compress(model, budget="1/16")
    HfApi().create_repo("user/own")
    HfApi().upload_file(path_or_fileobj=b"---\nlicense: mit\n---\n# Mine\n", path_in_repo="README.md",
                        repo_id="user/own")
    push_to_hub(model, "user/own")
    card = ModelCard(_readme(local_hub, "user/own"))
    assert card.text.strip() == "# Mine" and card.data.license == "mit" and "hashednets" in card.data.tags

    HfApi().upload_file(path_or_fileobj=b"---\nlicense: [unclosed\n---\nx\n", path_in_repo="README.md",
                        repo_id="user/own")
    with pytest.raises(ValueError, match="invalid metadata.*replace_card=True"):
        push_to_hub(model, "user/own")
