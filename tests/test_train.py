"""Tests for jaxes.train: one round to convergence on digits, sharding, determinism, caching."""

import importlib.util
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import jax
import jax.monitoring
import numpy as np
import pytest

from jaxes import hostloop, infer, models, padding, population, sharding, train
from tests.conftest import device_flags

CONFIG_FILE = pathlib.Path(__file__).parent.parent / "configs" / "digits.py"
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
# Every XLA compile request is one of these: a real compile, or a persistent-cache hit.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def _train_config(variant: str = ""):
    """A fresh ``train`` section of configs/digits.py (configs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("digits_config", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant).train


def _leaves(state):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(jax.device_get(state))]


class _TraceCounter:
    """Counts jaxpr traces and XLA compile requests (compiles or cache hits) while active."""

    def __init__(self):
        self.names, self.compiles = [], []

    def _listen(self, event, duration, **kwargs):
        del duration
        if event == TRACE_EVENT:
            self.names.append(kwargs.get("fun_name"))
        if event == COMPILE_EVENT:
            self.compiles.append(kwargs.get("fun_name"))

    def _hit(self, event, **kwargs):
        if event == CACHE_HIT_EVENT:
            self.compiles.append("cache hit")

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        jax.monitoring.register_event_listener(self._hit)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)
        jax.monitoring.unregister_event_listener(self._hit)


def test_default_mlp_reaches_95_percent_on_validation_and_test(digits):
    config = _train_config()
    result = train.to_convergence(models.Arch(), digits, jax.random.key(0), config)
    assert not result.failed, result.message
    assert result.metrics["val_accuracy"] >= 0.95

    evaluator = infer.Evaluator(
        result.graphdef, digits.spec, sharding.make_mesh(), config.eval_batch_size
    )
    assert evaluator.evaluate(result.state, digits.test)["accuracy"] >= 0.95

    # The instance returned is the best epoch's (lowest validation loss), not the last one's,
    # and the run stopped after `patience` epochs without improvement.
    val_losses = [epoch["val_loss"] for epoch in result.history]
    assert result.best_epoch == int(np.argmin(val_losses))
    validation = evaluator.evaluate(result.state, digits.validation)
    assert validation["loss"] == pytest.approx(val_losses[result.best_epoch], rel=1e-5)
    assert result.epochs == len(result.history) < config.max_epochs
    assert result.epochs - 1 - result.best_epoch == config.patience


def test_one_key_gives_bitwise_identical_parameters(digits):
    config = _train_config()
    config.max_epochs = 3
    key = jax.random.key(5)
    # Two engines: the second traces and compiles (or loads from the cache) on its own.
    first = train.to_convergence(models.Arch(), digits, key, config)
    engine = train.Engine(digits, config)
    second = train.to_convergence(models.Arch(), digits, key, config, engine=engine)
    assert first.history == second.history
    assert first.log_rate == second.log_rate
    for a, b in zip(_leaves(first.state), _leaves(second.state), strict=True):
        np.testing.assert_array_equal(a, b)
    other = train.to_convergence(models.Arch(), digits, jax.random.key(6), config, engine=engine)
    pairs = zip(_leaves(first.state), _leaves(other.state), strict=True)
    assert not all(np.array_equal(a, b) for a, b in pairs)


def test_trace_counter_sees_a_new_trace_and_compile():
    with _TraceCounter() as counter:
        jax.jit(lambda x: x * 3 + 1)(np.float32(2.0))
    assert counter.names
    assert counter.compiles


def test_same_bucket_and_searched_hyper_parameters_trigger_no_new_trace(digits):
    config = _train_config()
    config.max_epochs = 2
    space = {"backbone": ("mlp",), "depth": (1, 2), "width": (32, 64), "embed_dim": (16, 32)}
    engine = train.Engine(digits, config, space=space)
    arch = models.Arch("mlp", 2, 64, 32)
    engine.train([train.Job(arch, jax.random.key(0), 1e-3, 1e-4)])  # warm the caches
    assert engine.compiles == 1
    # Another key and dropout-rate range, other sizes (and depth) of the same bucket, another
    # learning rate and weight decay: other instances, the same compiled programs.
    config.dropout_rate = (0.1, 0.2)
    jobs = [
        train.Job(models.Arch("mlp", 2, 32, 16), jax.random.key(1), 3e-3, 0.0),
        train.Job(arch, jax.random.key(2), 1e-2, 1e-3),
        train.Job(models.Arch("mlp", 1, 32, 32), jax.random.key(3), 1e-3, 1e-4),
    ]
    with _TraceCounter() as counter:
        engine.train(jobs[:1])
        engine.train(jobs[1:2])
        shallow = engine.train(jobs[2:])
        results = engine.train([jobs[0]])
    assert shallow[0].bucket == arch and not shallow[0].failed
    assert not results[0].failed
    assert math.log(0.1) <= results[0].log_rate <= math.log(0.2)
    assert results[0].learning_rate == 3e-3 and results[0].bucket == arch
    assert counter.compiles == []  # (a new arch's eval_shape traces, but compiles nothing)
    assert engine.compiles == 1


@pytest.mark.parametrize("threads", [1, 2], ids=["one thread", "host threads"])
def test_programs_compiled_ahead_are_the_ones_train_runs(digits, threads):
    # prepare() compiles on a background thread what train() will need; train() then compiles
    # nothing, and its results are bitwise those of an engine that never prepared.
    config = _train_config()
    config.max_epochs = 2
    space = {"backbone": ("mlp", "cnn"), "depth": (1, 2), "width": (8, 16), "embed_dim": (8,)}
    jobs = [
        train.Job(models.Arch("cnn", 1, 8, 8), jax.random.key(1), 1e-3, 1e-4),
        train.Job(models.Arch("mlp", 2, 16, 8), jax.random.key(2), 3e-3, 0.0),
        train.Job(models.Arch("cnn", 1, 8, 8), jax.random.key(3), 1e-3, 1e-4),
    ]
    train.clear_shared_programs()  # nothing of these buckets compiled in this process yet
    engine = train.Engine(digits, config, space=space, host_threads=threads)
    engine.prepare(jobs)
    for future in engine._ahead.values():  # what train() itself would wait for
        future.result(timeout=600)
    # One program per (bucket, group size): on host threads every round is a group of one.
    sizes = sorted(key[3] for key in engine._ahead)
    assert sizes == ([1, 1] if threads > 1 else [1, 2])
    with _TraceCounter() as counter:
        ahead = engine.train(jobs)
    assert counter.compiles == []
    assert not any(r.failed for r in ahead)
    train.clear_shared_programs()
    plain = train.Engine(digits, config, space=space, host_threads=threads).train(jobs)
    for a, b in zip(ahead, plain, strict=True):
        assert a.history == b.history
        pairs = zip(_leaves(a.state), _leaves(b.state), strict=True)
        assert all(np.array_equal(x, y) for x, y in pairs)


def test_train_waits_for_a_program_still_compiling_ahead(digits, monkeypatch):
    # train() called while prepare()'s compile is held back blocks until that compile ends; the
    # program compiles once.
    import threading

    config = _train_config()
    config.max_epochs = 1
    job = train.Job(models.Arch("mlp", 1, 24, 8), jax.random.key(4), 1e-3, 0.0)
    gate, real = threading.Event(), train._compile_ahead

    def held(work):
        gate.wait(timeout=600)
        real(work)

    monkeypatch.setattr(train, "_compile_ahead", held)
    train.clear_shared_programs()
    engine = train.Engine(digits, config, host_threads=1)
    with _TraceCounter() as counter:
        engine.prepare([job])
        trainer = threading.Thread(target=engine.train, args=([job],))
        trainer.start()
        trainer.join(timeout=2.0)
        # Still waiting on the held compile: train has not even traced its round program.
        waited = trainer.is_alive() and "round_program" not in counter.names
        gate.set()
        trainer.join(timeout=600)
        engine.train([job])
    assert waited
    assert counter.compiles.count("jit(round_program)") == 1
    assert counter.compiles.count("jit(init_lane)") == 1


def test_non_finite_loss_fails_the_round_naming_the_epoch(digits):
    config = _train_config()
    config.max_epochs = 3
    config.learning_rate = 1e30  # Adam's first steps move every weight by ~1e30: overflow.
    results = [
        train.to_convergence(models.Arch(), digits, jax.random.key(0), config) for _ in range(2)
    ]
    result = results[0]
    assert result.failed
    last_epoch = result.history[-1]["epoch"]
    assert result.epochs == len(result.history) == last_epoch + 1
    assert re.search(rf"\b(nan|inf)\b.*\bepoch {last_epoch}\b", result.message), result.message
    assert not math.isfinite(result.history[-1]["train_loss"])
    # Deterministic: the same key fails the same way.
    assert results[1].failed and results[1].message == result.message


def test_host_driver_matches_device_driver_and_low_memory_forces_it(digits, monkeypatch):
    config = _train_config()
    config.max_epochs = 2
    config.epoch_driver = "scan"
    key = jax.random.key(3)
    on_device = train.to_convergence(models.Arch(), digits, key, config)

    host_epochs = []
    host_epoch = hostloop.host_epoch

    def spy(*args, **kwargs):
        host_epochs.append(args[4])  # the epoch index
        return host_epoch(*args, **kwargs)

    monkeypatch.setattr(hostloop, "host_epoch", spy)
    config.device_memory_fraction = 1e-12  # digits no longer "fits": the host streams it
    streamed = train.to_convergence(models.Arch(), digits, key, config)
    assert host_epochs == list(range(config.max_epochs))
    for a, b in zip(_leaves(on_device.state), _leaves(streamed.state), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    for a, b in zip(on_device.history, streamed.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)


def test_bad_driver_and_batch_size_are_rejected(digits):
    with pytest.raises(ValueError, match="epoch_driver"):
        train.choose_driver("mlp", "fastest", "cpu")
    config = _train_config()
    config.batch_size = len(digits.train) + 1
    with pytest.raises(ValueError, match="batch_size"):
        train.to_convergence(models.Arch(), digits, jax.random.key(0), config)


_SHARDED_STEP = textwrap.dedent(
    """
    import json, sys

    import jax
    import numpy as np
    from flax import nnx

    from jaxes import data, models, sharding, steps

    images, labels = np.load(sys.argv[1]), np.load(sys.argv[2])
    spec = data.InputSpec(**json.loads(sys.argv[3]))
    params_file = sys.argv[4]
    model = models.build(models.Arch(), spec.shape, spec.num_classes, jax.random.key(0), -1.5)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    hparams = steps.HParams(spec, len(labels), 1, "host")
    hyper = steps.Hyper.of(1e-3, 1e-4)
    dropout_key = jax.random.key(7)
    out = {"device_count": jax.device_count()}
    arrays = {f"start_{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(params))}
    for devices in (1, 8):
        mesh = sharding.make_mesh(jax.devices()[:devices])
        init_fn, step_fn = steps.compiled_step(graphdef, hparams, mesh)
        replicated = sharding.replicated(mesh)
        start = sharding.put_tree(params, replicated)
        h = sharding.put_tree(hyper, replicated)
        carry = (start, init_fn(start, h), sharding.put_tree(rest, replicated))
        batch = sharding.batch_sharded(mesh)
        x, y = sharding.put(images, batch), sharding.put(labels, batch)
        # Compile ahead of time to read the step's own input shardings, then run that program.
        step = step_fn.lower(carry, x, y, dropout_key, 0, h).compile()
        images_sharding = step.input_shardings[0][1]
        (new_params, _, _), loss = step(carry, x, y, dropout_key, 0, h)
        out[f"step_images_devices_{devices}"] = images_sharding.num_devices
        out[f"step_images_replicated_{devices}"] = images_sharding.is_fully_replicated
        out[f"images_shard_rows_{devices}"] = sorted(
            shard.data.shape[0] for shard in x.addressable_shards
        )
        for i, leaf in enumerate(jax.tree.leaves(jax.device_get(new_params))):
            arrays[f"devices{devices}_{i}"] = np.asarray(leaf)
    np.savez(params_file, **arrays)
    print(json.dumps(out))
    """
)


def test_eight_device_step_matches_one_device_step(digits, tmp_path):
    batch_size = 64
    np.save(tmp_path / "images.npy", digits.train.images[:batch_size])
    np.save(tmp_path / "labels.npy", digits.train.labels[:batch_size])
    script = tmp_path / "sharded_step.py"
    script.write_text(_SHARDED_STEP)
    env = dict(os.environ, XLA_FLAGS=device_flags(8), JAX_PLATFORMS="cpu")
    completed = subprocess.run(
        [
            sys.executable,
            str(script),
            str(tmp_path / "images.npy"),
            str(tmp_path / "labels.npy"),
            json.dumps(digits.spec.to_dict()),
            str(tmp_path / "params.npz"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = json.loads(completed.stdout.strip().splitlines()[-1])
    assert out["device_count"] == 8
    # The batch really is split over 8 devices, 8 rows each, not replicated onto one.
    assert out["step_images_devices_8"] == 8
    assert not out["step_images_replicated_8"]
    assert out["images_shard_rows_8"] == [batch_size // 8] * 8
    assert out["step_images_devices_1"] == 1

    arrays = np.load(tmp_path / "params.npz")
    count = sum(name.startswith("start_") for name in arrays.files)
    assert count > 0
    for i in range(count):
        one, eight = arrays[f"devices1_{i}"], arrays[f"devices8_{i}"]
        np.testing.assert_allclose(one, eight, atol=1e-5, rtol=0)
    # The step did move the parameters, so the comparison above is not vacuous.
    moved = max(
        np.max(np.abs(arrays[f"devices1_{i}"] - arrays[f"start_{i}"])) for i in range(count)
    )
    assert moved > 1e-4


def test_without_a_listener_a_fresh_engine_reuses_the_cached_round_program(digits):
    # In one process, engines without a listener share their programs (train._shared_programs):
    # a fresh one traces and compiles nothing. In a new process (here: that cache cleared) a
    # fresh engine traces again and loads the round program from the persistent compilation
    # cache (the session's, see conftest). A host callback keeps a program out of that cache, so
    # one may be traced in only when someone listens to the epochs.
    config = _train_config()
    config.max_epochs = 1
    job = train.Job(models.Arch("mlp", 1, 24, 8), jax.random.key(0), 1e-3, 1e-4)
    first = train.Engine(digits, config).train([job])[0]
    with _TraceCounter() as counter:
        again = train.Engine(digits, config).train([job])[0]
    assert "round_program" not in counter.names and counter.compiles == []
    assert again.history == first.history
    missed = {}
    for listener in (None, lambda *args: None):
        train.Engine(digits, config, on_epoch=listener).train([job])  # fills the caches
        train.clear_shared_programs()  # as in a new process
        with _TraceCounter() as counter:
            train.Engine(digits, config, on_epoch=listener).train([job])
        assert "round_program" in counter.names
        requests = [name for name in counter.compiles if name != "cache hit"]
        missed[listener is None] = len(requests) - counter.compiles.count("cache hit")
        assert "jit(round_program)" in requests  # the round program was asked for
    assert missed[True] == 0
    assert missed[False] == 1  # with a listener, the round program compiles every time


@pytest.mark.parametrize(
    "arch",
    [models.Arch("mlp", 2, 32, 16), models.Arch("cnn", 2, 8, 8, norm="layer", residual=True)],
    ids=lambda a: a.short(),
)
def test_inits_compiled_for_compile_speed_give_the_bits_of_xlas_defaults(digits, arch):
    # The vmapped init compiles with sharding.RUN_ONCE_CPU; compiling the same program with
    # XLA:CPU's defaults named explicitly (options given at compile time win over XLA_FLAGS and
    # over the jit's own) must draw the same parameters, bit for bit. (-O0 there would not.)
    mesh = sharding.make_mesh(jax.devices()[:1])
    init = population.init_program(arch, digits.spec.shape, digits.spec.num_classes, mesh)
    raw = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(3), 2)))
    args = (raw, np.full((2,), -1.5, np.float32), padding.RealSizes.of([arch, arch]))
    defaults = {"xla_cpu_use_fusion_emitters": True, "xla_backend_optimization_level": 3}
    reference = init.lower(*args).compile(compiler_options=defaults)(*args)
    fast = init(*args)
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(reference), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
