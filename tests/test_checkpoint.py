"""Tests for jaxes.checkpoint: real Orbax, real files, real SIGKILLed subprocesses."""

import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxes import checkpoint
from jaxes.checkpoint import Checkpointer, CheckpointError
from jaxes.files import atomic_write_text
from tests.conftest import XLA_CPU_FLAG

TMP_MARKER = ".orbax-checkpoint-tmp"


def _params_for(round_index):
    """About 1 MB of parameters that differ per round; also run inside subprocesses."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(round_index)
    return {
        "layers": {
            0: {
                "kernel": jnp.asarray(rng.standard_normal((512, 448)), jnp.float32),
                "bias": jnp.asarray(rng.standard_normal(448), jnp.bfloat16),
            },
            1: {"counts": jnp.asarray(rng.integers(-(2**31), 2**31 - 1, 64), jnp.int32)},
        },
        "extras": [jnp.asarray(rng.standard_normal(3), jnp.float32), (jnp.asarray(7, jnp.int32),)],
    }


PARAMS_SOURCE = textwrap.dedent(inspect.getsource(_params_for))


def _assert_bitwise_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes()


def _run_python(source, *args, xla_flags=""):
    """Runs ``source`` in a fresh CPU-only interpreter; XLA_FLAGS sets its device count."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{xla_flags} {XLA_CPU_FLAG}"}
    return subprocess.run(
        [sys.executable, "-c", source, *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_round_trip_is_bitwise_with_containers_and_meta(tmp_path):
    params = _params_for(3)
    meta = {"arch": {"backbone": "mlp", "widths": [64, 32]}, "log_rate": -2.5, "metric": 0.97}
    ckpt = Checkpointer(tmp_path / "checkpoints")
    ckpt.save_best(3, params, meta)
    restored, restored_meta = Checkpointer(tmp_path / "checkpoints").restore_best()
    _assert_bitwise_equal(restored, params)
    assert restored_meta == meta
    assert list(restored["layers"]) == [0, 1]  # int keys survive, unlike a plain Orbax restore
    assert isinstance(restored["extras"][1], tuple)


def test_nnx_state_restores_into_a_fresh_module(tmp_path):
    from flax import nnx

    trained = nnx.Linear(5, 3, rngs=nnx.Rngs(1))
    Checkpointer(tmp_path).save_best(0, nnx.state(trained, nnx.Param), {})
    fresh = nnx.Linear(5, 3, rngs=nnx.Rngs(2))
    restored, _ = Checkpointer(tmp_path).restore_best()
    state = nnx.state(fresh, nnx.Param)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(fresh, state)
    inputs = jnp.arange(10.0).reshape(2, 5)
    assert np.array_equal(fresh(inputs), trained(inputs))


def test_commit_keeps_only_the_newest_best(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save_best(0, _params_for(0), {"round": 0})
    ckpt.save_state({"round": 0})
    ckpt.save_state({"round": 1})  # a round without a new best deletes nothing
    ckpt.save_best(2, _params_for(2), {"round": 2})
    # Until round 2 is committed, the committed best must survive.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["0", "2"]
    assert ckpt.best_round() == 2
    ckpt.save_state({"round": 2})
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["2"]
    assert Checkpointer(tmp_path).best_round() == 2
    _, meta = ckpt.restore_best()
    assert meta == {"round": 2}


def test_resume_after_uncommitted_best_restores_the_committed_one(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save_best(1, _params_for(1), {"round": 1})
    ckpt.save_state({"round": 1})
    ckpt.save_best(3, _params_for(3), {"round": 3})  # killed before its save_state
    resumed = Checkpointer(tmp_path)
    resumed.discard_after(resumed.load_state()["round"])
    assert resumed.best_round() == 1
    params, meta = resumed.restore_best()
    _assert_bitwise_equal(params, _params_for(1))
    assert meta == {"round": 1}
    resumed.save_best(3, _params_for(3), {"round": 3})  # the replayed round saves again
    resumed.save_state({"round": 3})
    assert resumed.best_round() == 3


def test_discard_after_removes_only_later_rounds(tmp_path):
    ckpt = Checkpointer(tmp_path)
    for round_index in (1, 4, 6, 9):
        ckpt.save_best(round_index, {"w": jnp.full((2,), round_index)}, {})
    ckpt.discard_after(4)
    assert ckpt.best_round() == 4
    assert Checkpointer(tmp_path).best_round() == 4
    params, _ = ckpt.restore_best(round_index=1)
    assert np.array_equal(params["w"], [1, 1])
    ckpt.discard_after(-1)
    assert ckpt.best_round() is None


def test_keep_only_leaves_exactly_the_committed_best(tmp_path):
    ckpt = Checkpointer(tmp_path)
    for round_index in (1, 4, 6):  # none committed: all three stay on disk
        ckpt.save_best(round_index, {"w": jnp.full((2,), round_index)}, {})
    ckpt.keep_only(4)
    reopened = Checkpointer(tmp_path)
    assert reopened.best_round() == 4
    params, _ = reopened.restore_best()
    assert np.array_equal(params["w"], [4, 4])
    with pytest.raises(CheckpointError):
        reopened.restore_best(round_index=1)
    reopened.keep_only(None)
    assert reopened.best_round() is None


def test_saving_an_existing_round_replaces_it(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save_best(2, {"w": jnp.zeros(3)}, {"try": 1})
    ckpt.save_best(2, {"w": jnp.ones(3)}, {"try": 2})
    params, meta = ckpt.restore_best()
    assert meta == {"try": 2}
    assert np.array_equal(params["w"], np.ones(3))


def test_missing_checkpoint_errors_name_the_problem(tmp_path):
    directory = tmp_path / "no_such_run" / "checkpoints"
    ckpt = Checkpointer(directory)
    assert ckpt.best_round() is None
    assert ckpt.load_state() is None
    with pytest.raises(CheckpointError, match=r"no finished best instance in .*: run `.venv/bin"):
        ckpt.restore_best()
    assert not directory.exists()  # reading never creates the workdir
    ckpt.save_best(5, {"w": jnp.zeros(2)}, {})
    with pytest.raises(CheckpointError, match=r"round 4 .* saved rounds are \[5\]"):
        ckpt.restore_best(round_index=4)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.save_best(-1, {"w": jnp.zeros(1)}, {}), "round_index must be an int >= 0"),
        (lambda c: c.save_best(0, {"w": "text"}, {}), "leaf of type str"),
        (lambda c: c.save_best(0, {(1, 2): jnp.zeros(1)}, {}), "dict key"),
        (lambda c: c.save_best(0, {"w": jnp.zeros(1)}, {"x": object()}), "meta must be JSON"),
        (lambda c: c.save_state({"x": {1, 2}}), "state must be JSON"),
        (
            lambda c: c.restore_best(
                abstract_params={"w": jax.ShapeDtypeStruct((1,), jnp.float32)}
            ),
            "needs a .sharding",
        ),
    ],
)
def test_bad_input_raises_one_sentence(tmp_path, call, message):
    ckpt = Checkpointer(tmp_path)
    ckpt.save_best(0, {"w": jnp.zeros(1)}, {"valid": True})
    with pytest.raises(ValueError, match=message):
        call(ckpt)
    params, meta = ckpt.restore_best()  # a rejected call leaves the saved best untouched
    assert meta == {"valid": True} and np.array_equal(params["w"], np.zeros(1))


def test_restore_onto_a_sharded_abstract_target(tmp_path):
    devices = np.array(jax.devices())
    mesh = jax.sharding.Mesh(devices, ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    params = {"kernel": jnp.arange(12.0).reshape(3, 4), "rows": jnp.arange(4 * devices.size)}
    ckpt = Checkpointer(tmp_path)
    ckpt.save_best(0, params, {})
    abstract = {
        "kernel": jax.ShapeDtypeStruct((3, 4), jnp.float32, sharding=replicated),
        "rows": jax.ShapeDtypeStruct((4 * devices.size,), params["rows"].dtype, sharding=split),
    }
    restored, _ = ckpt.restore_best(abstract_params=abstract)
    assert restored["kernel"].sharding == replicated
    assert restored["rows"].sharding == split
    _assert_bitwise_equal(restored, params)


def test_state_round_trip_and_failed_write_keeps_old_content(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path)
    state = {"round_index": 4, "tolerance": {"best": float("-inf"), "streak": 2}, "arch": [1, 2]}
    ckpt.save_state(state)
    assert Checkpointer(tmp_path).load_state() == state

    def failing_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_state({"round_index": 5})
    assert Checkpointer(tmp_path).load_state() == state
    assert [p.name for p in tmp_path.iterdir()] == ["resume_state.json"]  # no tmp file left


def test_non_primary_process_writes_no_state(tmp_path):
    Checkpointer(tmp_path, is_primary=False).save_state({"round_index": 1})
    assert Checkpointer(tmp_path).load_state() is None


def test_atomic_write_text_replaces_content(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


SAVE_LOOP = """
import sys
from jaxes.checkpoint import Checkpointer
{params_source}
ckpt = Checkpointer(sys.argv[1])
for round_index in range(1000):
    ckpt.save_best(round_index, _params_for(round_index), {{"round": round_index}})
    # A large state makes a kill inside the state write likely too.
    ckpt.save_state({{"round": round_index, "payload": "x" * 2_000_000}})
    print(round_index, flush=True)
"""


def test_sigkill_at_any_moment_leaves_a_resumable_directory(tmp_path):
    directory = tmp_path / "checkpoints"
    source = SAVE_LOOP.format(params_source=PARAMS_SOURCE)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(
        [sys.executable, "-c", source, str(directory)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(3):  # three committed rounds, then kill mid-way through the next
            assert process.stdout.readline(), process.stderr.read()
        time.sleep(0.07)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    assert process.returncode == -signal.SIGKILL

    state = Checkpointer(directory).load_state()  # whole JSON: old or new, never torn
    committed = state["round"]
    assert committed >= 2 and state["payload"] == "x" * 2_000_000
    # Leftovers a kill can leave: an unfinalized step (named as Orbax names the next save's
    # temporary directory) and a step halfway through deletion.
    (directory / f"{committed + 1}{TMP_MARKER}" / "params").mkdir(parents=True, exist_ok=True)
    (directory / f"{committed - 1}{TMP_MARKER}-deleted").mkdir(exist_ok=True)

    resumed = Checkpointer(directory)
    assert resumed.best_round() in (committed, committed + 1)
    resumed.discard_after(committed)
    assert not [p.name for p in directory.iterdir() if TMP_MARKER in p.name]
    assert resumed.best_round() == committed
    params, meta = resumed.restore_best()
    _assert_bitwise_equal(params, _params_for(committed))
    assert meta == {"round": committed}
    resumed.save_best(committed + 1, _params_for(committed + 1), {"round": committed + 1})
    resumed.save_state({"round": committed + 1})
    assert sorted(p.name for p in directory.iterdir() if p.is_dir()) == [str(committed + 1)]
    _assert_bitwise_equal(resumed.restore_best()[0], _params_for(committed + 1))


SAVE_ON_8_DEVICES = """
import sys
import jax
import numpy as np
from jaxes.checkpoint import Checkpointer
{params_source}
assert jax.device_count() == 8, jax.devices()
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
params = jax.device_put(_params_for(11), replicated)
Checkpointer(sys.argv[1]).save_best(11, params, {{"devices": jax.device_count()}})
"""

RESTORE_ON_1_DEVICE = """
import json
import sys
import jax
import numpy as np
from jaxes.checkpoint import Checkpointer
{params_source}
assert jax.device_count() == 1, jax.devices()
params, meta = Checkpointer(sys.argv[1]).restore_best()
expected = _params_for(11)
same_tree = jax.tree.structure(params) == jax.tree.structure(expected)
equal = all(
    a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected))
)
shardings = sorted({{str(leaf.sharding) for leaf in jax.tree.leaves(params)}})
print(json.dumps({{"same_tree": same_tree, "equal": equal, "meta": meta, "shardings": shardings}}))
"""


def test_saved_on_8_devices_restores_on_1_device(tmp_path):
    directory = str(tmp_path / "checkpoints")
    saver = _run_python(
        SAVE_ON_8_DEVICES.format(params_source=PARAMS_SOURCE),
        directory,
        xla_flags="--xla_force_host_platform_device_count=8",
    )
    assert saver.returncode == 0, saver.stderr
    restorer = _run_python(
        RESTORE_ON_1_DEVICE.format(params_source=PARAMS_SOURCE), directory, xla_flags=""
    )
    assert restorer.returncode == 0, restorer.stderr
    report = json.loads(restorer.stdout)
    assert report["same_tree"] and report["equal"]
    assert report["meta"] == {"devices": 8}
    assert len(report["shardings"]) == 1 and "SingleDeviceSharding" in report["shardings"][0]
    # Neither process may spam the console through Orbax's absl logging.
    assert "orbax" not in (saver.stderr + restorer.stderr).lower()


def test_the_best_instance_is_restored_onto_the_sharding_asked_for(smoke_run):
    import jax
    from flax import nnx

    from jaxes import instance, sharding

    rep = sharding.replicated(sharding.make_mesh(jax.devices()))
    model, _ = instance.load(smoke_run, sharding=rep)
    leaves = jax.tree.leaves(nnx.state(model))
    assert leaves and all(leaf.sharding == rep for leaf in leaves)
    # The default is this process's first device, not the mesh.
    model, _ = instance.load(smoke_run)
    first = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    assert all(leaf.sharding == first for leaf in jax.tree.leaves(nnx.state(model)))
