"""Your own backbone (jaxes.backbones, configs/own_model.py): registered from a config file,
validated per backbone, searched by tpe in a real run, and rebuilt from the checkpoint alone by
a process that never imported the config (embed, export)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from ml_collections.config_flags import config_flags

from jaxes import (
    backbones,
    checkpoint,
    embed,
    export,
    instance,
    models,
    rounds,
    runconfig,
    serving,
    workdir,
)

ROOT = Path(__file__).resolve().parents[1]
OWN = ROOT / "configs" / "own_model.py"
MIXER = {"patch": 4, "hidden": 8, "blocks": 1, "embed_dim": 6}


def _config(variant="smoke", data_dir=None):
    """Parsing the config file imports it, which registers the mixer (as `jaxes.main` does)."""
    config = config_flags.ConfigFileFlagParser("config").parse(f"{OWN}:{variant}")
    if data_dir is not None:
        with config.unlocked():
            config.data_dir = str(data_dir)
    return config


@pytest.fixture(scope="module")
def own_run(tmp_path_factory, digits_data_dir):
    path = tmp_path_factory.mktemp("own_model")
    with open(os.devnull, "w") as quiet:
        rounds.run(_config(data_dir=digits_data_dir), path, stream=quiet)
    return path


def test_register_refuses_bad_names_fields_and_another_files_name():
    _config()
    with pytest.raises(ValueError, match="'mlp'"):
        backbones.register("mlp", lambda *a, **k: None)
    with pytest.raises(ValueError, match="'backbone'"):
        backbones.register("other", lambda *a, **k: None, fields={"backbone": 1})
    with pytest.raises(ValueError, match=r"already registered from .*own_model\.py"):
        backbones.register("mixer", lambda *a, **k: None)
    with pytest.raises(ValueError, match="not registered"):
        backbones.get("resnet9")


def test_a_registered_arch_round_trips_and_old_builtin_dicts_load_unchanged():
    _config()
    arch = models.Arch("mixer", options=MIXER)
    assert arch.to_dict() == {"backbone": "mixer", "options": MIXER}
    assert models.Arch.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch
    assert arch.short() == "mixer(blocks=1,embed_dim=6,hidden=8,patch=4)"
    old = {"backbone": "cnn", "depth": 2, "width": 64, "embed_dim": 32}  # a turn-2 checkpoint
    assert models.Arch.from_dict(old).to_dict() == old
    with pytest.raises(ValueError, match="registered backbones"):
        models.Arch("cnn", options={"hidden": 8})


@pytest.mark.parametrize(
    ("field", "spec", "path"),
    [
        ("depth", (1, 2), "search.space.depth"),  # the mixer has no depth: needs "when"
        ("hidden", (8, 16), "search.space.hidden"),  # the MLP has no hidden
        ("backbone", ("mlp", "mixer", "resnet9"), "search.space.backbone"),
        ("width", {"values": (0, 8), "when": {"backbone": "mlp"}}, "search.space.width"),
        ("learning_rate", {"low": 0.0, "high": 1.0}, "search.space.learning_rate"),
        ("patch", {"values": (4,), "when": {"backbone": "cnn"}}, "search.space.patch"),
    ],
)
def test_each_backbones_fields_are_checked_and_errors_name_the_field(field, spec, path):
    config = _config()
    with config.unlocked():
        if field in config.search.space:  # a list cannot replace a mapping in place
            del config.search.space[field]
        config.search.space[field] = spec
    with pytest.raises(runconfig.ConfigError) as error:
        runconfig.check_config(config)
    assert error.value.field == path, str(error.value)


def test_the_checkpoint_rebuilds_the_mixer_in_a_process_that_never_registered_it(
    tmp_path, monkeypatch
):
    _config()
    arch = models.Arch("mixer", options=MIXER)
    # Jitted: eager init and apply dispatch an op at a time, several times slower on CPU.
    model = nnx.jit(lambda key: models.build(arch, (8, 8, 1), 10, key, -1.5))(jax.random.key(0))
    logits = nnx.jit(lambda m, x: m.logits(x))
    assert nnx.jit(lambda m, x: m.embed(x))(model, np.zeros((3, 8, 8, 1))).shape == (3, 6)
    meta = instance.Meta(
        round_index=0, arch=arch.to_dict(),
        input_spec={"height": 8, "width": 8, "channels": 1, "num_classes": 10, "scale": 1 / 16},
        log_rate=-1.5,
        metrics={"val_accuracy": 0.5}, metric="val_accuracy", dataset="digits",
    )  # fmt: skip
    with checkpoint.Checkpointer(tmp_path / "checkpoints", is_primary=True) as ckpt:
        instance.save(ckpt, nnx.state(model), meta)
    monkeypatch.setattr(backbones, "_REGISTRY", {})  # a fresh process: nothing registered
    loaded, loaded_meta = instance.load(tmp_path)
    assert backbones.is_registered("mixer")  # imported again from the recorded file
    assert loaded_meta.backbone_source == str(OWN)
    images = np.random.default_rng(0).uniform(0, 1, (4, 8, 8, 1)).astype(np.float32)
    np.testing.assert_array_equal(logits(loaded, images), logits(model, images))


def test_tpe_searches_the_registered_mixer_and_the_best_instance_deploys(own_run, tmp_path):
    records = workdir.read_rounds(own_run)
    summary = workdir.read_summary(own_run)
    archs = [r["arch"] for r in records]
    assert {a["backbone"] for a in archs} == {"mlp", "mixer"}
    for arch in archs:  # each round holds exactly its backbone's fields
        mixer = arch["backbone"] == "mixer"
        own = {"patch", "hidden", "blocks"} if mixer else {"depth", "width", "embed_dim"}
        assert set(arch) == {"backbone", "learning_rate"} | own
    assert all(r["status"] == "ok" for r in records)
    assert summary["test_accuracy"] > 0.5
    embed.embed(str(own_run), str(tmp_path / "features.npy"), split="test")
    features = np.load(tmp_path / "features.npy")
    assert features.shape[0] > 100 and np.isfinite(features).all()
    assert export.export(own_run, tmp_path / "exported")["arch"] == summary["best_arch"]
    served = serving.load(tmp_path / "exported")(np.zeros((5, 8, 8, 1), np.uint8))
    assert served.shape == (5, features.shape[1])


def _tiny_build(choice, inputs, *, log_rate, rngs):
    return backbones.get("mixer").build_fn(choice, inputs, log_rate=log_rate, rngs=rngs)


class _UnhashableBuild:
    """A callable that cannot be a dict key (as a non-frozen dataclass instance)."""

    __hash__ = None

    def __call__(self, *args, **kwargs):
        return _tiny_build(*args, **kwargs)


def test_a_model_registered_again_gets_programs_of_its_own():
    # Engines share programs (train._shared_programs) keyed by what builds the model: a
    # registered backbone's build function and field defaults, both of which a new registration
    # may change. A build function that cannot be a key keeps an engine's programs its own.
    from jaxes import train

    _config()  # registers the mixer, which _tiny_build wraps
    fields = dict(backbones.get("mixer").fields)
    backbones.register("tinynet", _tiny_build, fields=fields)
    arch = models.Arch("tinynet", options=MIXER)
    first = train._model_key(arch)
    assert first not in (None, False)
    backbones.register("tinynet", _tiny_build, fields={**fields, "hidden": 64})
    assert train._model_key(arch) not in (first, None, False)
    backbones.register("tinynet_unhashable", _UnhashableBuild(), fields=fields)
    assert train._model_key(models.Arch("tinynet_unhashable", options=MIXER)) is False
    assert train._model_key(models.Arch("mlp", 1, 8, 8)) is None
