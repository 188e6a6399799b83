"""Every shipped recipe and accelerate config parses; the recipe schema is strict and overrides are typed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hf_freqcompress.methods import available_methods
from hf_freqcompress.training import Recipe, RecipeError, load_recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
METHODS = {"hashednets", "freshnets", "funhash", "freqreg", "pq", "binary_stack"}


def test_a_mnist_recipe_exists_for_every_method_and_the_big_models_are_covered():
    names = {path.stem for path in RECIPES}
    assert {f"mnist_{method}" for method in METHODS} <= names
    models = {load_recipe(path, validate=False).model.name for path in RECIPES}
    assert {"timm:resnet18", "timm:resnet50", "timm:vgg16_bn", "timm:vit_small_patch16_224"} <= models


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_schema(path):
    recipe = load_recipe(path, validate=False)
    assert isinstance(recipe, Recipe) and recipe.name == path.stem
    assert recipe.compression.method in METHODS
    if recipe.data.kind == "mnist" and recipe.compression.method in available_methods():
        load_recipe(path)  # fully valid here: method registered, options accepted, data found
    elif recipe.compression.method not in available_methods():
        with pytest.raises(RecipeError, match="is not registered in this installation"):
            load_recipe(path)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.stem)
def test_accelerate_config_parses(path):
    config = yaml.safe_load(path.read_text())
    assert config["distributed_type"] in {"NO", "MULTI_GPU", "FSDP"}
    assert config["num_processes"] >= 1 and config["num_machines"] >= 1


def test_unknown_nested_key_lists_the_valid_ones():
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['nme'\] in model; valid keys: \['name', 'kwargs'"):
        recipe_from_dict({"model": {"nme": "timm:mnist_mlp"}})
    valid = r"valid keys: \['name', 'weight', 'options'\]"
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['lam'\] in regularizers\[0\]; " + valid):
        recipe_from_dict({"regularizers": [{"name": "pq_centroid", "lam": 1}]})


def test_overrides_are_parsed_as_yaml_and_type_checked():
    recipe = load_recipe(ROOT / "recipes" / "mnist_hashednets_quick.yaml",
                         ["training.epochs=3", "compression.budget=1/64", "compression.exclude=[head]",
                          "training.max_grad_norm=1"])
    assert recipe.training.epochs == 3 and recipe.compression.budget == "1/64"
    assert recipe.compression.exclude == ["head"] and recipe.training.max_grad_norm == 1.0
    with pytest.raises(RecipeError, match="training.max_grad_norm: .* is not a float | None"):
        load_recipe(ROOT / "recipes" / "mnist_hashednets_quick.yaml", ["training.max_grad_norm=big"])
    with pytest.raises(RecipeError, match="must look like section.key=value"):
        load_recipe(ROOT / "recipes" / "mnist_hashednets_quick.yaml", ["training.epochs"])
