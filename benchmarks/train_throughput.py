"""Training throughput: jaxes' epoch drivers against a Flax-examples host loop (issue 3, item 5).

For each backbone, on one machine and in one process, it measures optimizer steps per second and
compile seconds of:

* jaxes' epoch loop: ``steps.scan_epoch`` (the epoch of the device program) and the host
  driver's jitted ``steps.compiled_step``, once per driver (scan, unrolled, host); the one
  ``train.DRIVER_TABLE`` picks is marked ``*``. (The population program adds the validation
  pass and the patience rule on the device: ``benchmarks/population_throughput.py``.)
* "plain": the Flax MNIST example's loop (``nnx.Optimizer``, an ``@nnx.jit`` train step, numpy
  batches fed from the host), with the same model, init, loss, optimizer and batch size.

It also prints the FLOP/s achieved as a fraction of the f32 matmul peak measured in the same run,
and the peak host memory. Usage (benchmarks/README.md has more)::

    .venv/bin/python benchmarks/train_throughput.py --backbones=mlp,cnn --json=/tmp/tp.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxes import data as data_lib
from jaxes import hostloop, keys, models, sharding, train
from jaxes import steps as steps_lib

DEFAULT_ARCHS = {"mlp": "2,256,64", "cnn": "2,64,64"}  # depth,width,embed_dim
LEARNING_RATE, WEIGHT_DECAY, RATE_RANGE = 1e-3, 1e-4, (0.02, 0.5)  # configs/digits.py defaults
ROUND_EPOCHS = 50  # the "round s" column: compile + this many epochs, what one new Arch costs


@dataclasses.dataclass
class Loop:
    """One training loop under test: ``run_epoch(state, epoch) -> (state, loss)`` and timings."""

    name: str
    run_epoch: Callable
    state: Any
    steps_per_epoch: int
    compile_s: float = float("nan")
    compile_cpu_s: float = float("nan")
    warm_s: float = float("nan")
    epochs_timed: int = 0
    repeat_steps_per_s: list[float] = dataclasses.field(default_factory=list)
    next_epoch: int = 0

    @property
    def steps_per_s(self) -> float:
        return statistics.median(self.repeat_steps_per_s)

    def epochs(self, count: int) -> tuple[float, float]:
        """Runs ``count`` epochs to completion; returns (wall, process CPU) seconds."""
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(count):
            self.state, loss = self.run_epoch(self.state, self.next_epoch)
            self.next_epoch += 1
        jax.block_until_ready((self.state, loss))
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
        if not np.isfinite(float(loss)):
            raise RuntimeError(f"{self.name}: the training loss became {float(loss)}.")
        return seconds, cpu_seconds


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    add = parser.add_argument
    add("--backbones", default="mlp,cnn", help="comma-separated subset of mlp,cnn")
    add("--mlp", default=DEFAULT_ARCHS["mlp"], help="MLP depth,width,embed_dim")
    add("--cnn", default=DEFAULT_ARCHS["cnn"], help="CNN depth,width,embed_dim")
    add("--drivers", default=",".join(train.DRIVERS), help="jaxes drivers to time")
    add("--epochs", type=int, default=10, help="epochs per timed repeat")
    add("--repeats", type=int, default=5, help="timed repeats; the median is reported")
    add("--budget_s", type=float, default=4.0, help="timed seconds per loop, at most ~this")
    add("--batch_size", type=int, default=64)
    add("--dataset", default="digits")
    add("--data_dir", default=None, help="default: jaxes.data.default_data_dir()")
    add("--peak_size", type=int, default=1024, help="n of the n x n f32 peak matmul")
    add("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    args.backbones = [b for b in args.backbones.split(",") if b]
    args.drivers = [d for d in args.drivers.split(",") if d]
    if unknown := sorted(set(args.drivers) - set(train.DRIVERS)):
        parser.error(f"--drivers: {unknown} not in {train.DRIVERS}.")
    if unknown := sorted(set(args.backbones) - set(models.BACKBONES)):
        parser.error(f"--backbones: {unknown} not in {models.BACKBONES}.")
    if min(args.epochs, args.repeats) < 1:
        parser.error("--epochs and --repeats must be >= 1.")
    return args


def arch_of(backbone: str, args) -> models.Arch:
    depth, width, embed_dim = (int(v) for v in getattr(args, backbone).split(","))
    return models.Arch(backbone, depth, width, embed_dim)


def machine() -> dict:
    """What the numbers depend on: CPU, cores, load, versions, date."""
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):  # Linux: the model name, as lscpu prints it
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next((ln.split(":")[1].strip() for ln in cpuinfo if "model name" in ln), cpu)
    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpus_usable": len(os.sched_getaffinity(0)),
        "load_avg_start": list(os.getloadavg()),
        "device": f"{device.platform}:{device.device_kind} x{jax.device_count()}",
        "versions": {"jax": jax.__version__, "flax": flax.__version__},
    }


def matmul_peak(size: int, repeats: int = 20) -> float:
    """The best f32 FLOP/s of a jitted ``size x size`` matmul (best: others share the cores)."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def warm_up(loop: Loop) -> None:
    """Compiles ``loop``; compile seconds are its first epoch less a warm one.

    They include tracing, lowering and XLA compilation, as each new ``Arch`` pays them. Wall
    seconds swing with other processes' load on the cores; process CPU seconds are steadier.
    """
    first, first_cpu = loop.epochs(1)
    loop.warm_s, warm_cpu = loop.epochs(1)
    loop.compile_s = max(0.0, first - loop.warm_s)
    loop.compile_cpu_s = max(0.0, first_cpu - warm_cpu)


def time_loops(loops: list[Loop], args) -> None:
    """Times ``repeats`` rounds; each round runs every loop once, so load spikes hit all alike.

    A repeat is ``epochs`` epochs, or fewer (at least one) to keep a loop near ``budget_s`` in
    all, by the median epoch time seen so far; a loop already past ``budget_s`` stops repeating.
    """
    epoch_s = {loop.name: [loop.warm_s] for loop in loops}
    spent = dict.fromkeys(epoch_s, 0.0)
    for _ in range(args.repeats):
        for loop in loops:
            if spent[loop.name] > args.budget_s:
                continue
            budget_epochs = args.budget_s / (args.repeats * statistics.median(epoch_s[loop.name]))
            count = max(1, min(args.epochs, int(budget_epochs)))
            seconds, _ = loop.epochs(count)
            epoch_s[loop.name].append(seconds / count)
            spent[loop.name] += seconds
            loop.epochs_timed += count
            loop.repeat_steps_per_s.append(count * loop.steps_per_epoch / seconds)


def _model(arch, data, key):
    """The instance and keys ``to_convergence`` builds from round key ``key``."""
    round_keys = keys.RoundKeys.of(key)
    log_rate = models.draw_log_rate(round_keys.dropout_rate, RATE_RANGE)
    model = models.build(arch, data.spec.shape, data.spec.num_classes, round_keys.init, log_rate)
    return model, round_keys


def _jaxes_setup(arch, data, driver, key, mesh, args):
    steps = len(data.train.labels) // args.batch_size
    h = steps_lib.HParams(data.spec, args.batch_size, steps, driver)
    model, round_keys = _model(arch, data, key)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rep = sharding.replicated(mesh)
    hyper = sharding.put_tree(steps_lib.Hyper.of(LEARNING_RATE, WEIGHT_DECAY), rep)
    init_fn, host_step = steps_lib.compiled_step(graphdef, h, mesh)
    batch = sharding.batch_sharded(mesh)

    def epoch(carry, images, labels, data_key, dropout_key, epoch_index):
        return steps_lib.scan_epoch(
            graphdef, h, batch, hyper, None, carry, images, labels, (data_key, dropout_key),
            epoch_index,
        )  # fmt: skip

    epoch_fn = jax.jit(epoch, donate_argnums=0)

    def step_fn(carry, images, labels, dropout_key, step_index):
        return host_step(carry, images, labels, dropout_key, step_index, hyper)

    step_fn.lower = lambda *a: host_step.lower(*a, hyper)  # for the cost analysis
    params, rest = sharding.put_tree(params, rep), sharding.put_tree(rest, rep)
    return h, round_keys, step_fn, epoch_fn, (params, init_fn(params, hyper), rest)


def jaxes_loop(arch, data, driver, key, mesh, args) -> Loop:
    """jaxes' epoch loop with ``driver``, called as ``train.to_convergence`` calls it."""
    h, round_keys, step_fn, epoch_fn, carry = _jaxes_setup(arch, data, driver, key, mesh, args)
    split = data.train
    if driver == "host":

        def run_epoch(carry, epoch):
            return hostloop.host_epoch(
                lambda c, x, y, k, i, _: step_fn(c, x, y, k, i), carry, split, round_keys,
                epoch, h, mesh, None,
            )  # fmt: skip
    else:
        rep = sharding.replicated(mesh)
        images, labels = sharding.put(split.images, rep), sharding.put(split.labels, rep)

        def run_epoch(carry, epoch):
            return epoch_fn(carry, images, labels, round_keys.data, round_keys.dropout, epoch)

    return Loop(driver, run_epoch, carry, h.steps_per_epoch)


def plain_loop(arch, data, key, args) -> Loop:
    """The Flax MNIST example's loop: ``@nnx.jit`` step, ``nnx.Optimizer``, numpy batches.

    Same model and init, loss, optimizer (adamw), batch size and dropout keys as jaxes; only the
    loop differs. Batches are shuffled on the host, as the example's input pipeline does.
    """
    spec = data.spec
    model, round_keys = _model(arch, data, key)
    tx = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def loss_fn(model, batch, dropout_key):
        logits = model(data_lib.normalize(batch["image"], spec), dropout_key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    @nnx.jit
    def train_step(model, optimizer, batch, dropout_key, step):
        dropout_key = jax.random.fold_in(dropout_key, step)
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch, dropout_key)
        optimizer.update(model, grads)
        return loss

    images, labels = data.train.images, data.train.labels
    steps = len(labels) // args.batch_size
    rng = np.random.default_rng(0)

    def run_epoch(state, epoch):
        del state  # the model and the optimizer are updated in place
        order = rng.permutation(len(labels))[: steps * args.batch_size]
        losses = []
        for index, perm in enumerate(order.reshape(steps, args.batch_size)):
            batch = {"image": images[perm], "label": labels[perm]}
            step = epoch * steps + index
            losses.append(train_step(model, optimizer, batch, round_keys.dropout, step))
        # What block_until_ready waits on: the updated parameters and optimizer state.
        return (nnx.state(model), nnx.state(optimizer)), jnp.mean(jnp.stack(losses))

    return Loop("plain", run_epoch, None, steps)


def step_flops(arch, data, key, mesh, args) -> float:
    """FLOPs of one train step: XLA's HLO cost analysis of jaxes' step (every op, not only dots).

    It analyses the lowered HLO, before optimization: no extra compilation, and within 4% of
    ``lowered.compile().cost_analysis()`` for both default models.
    """
    h, round_keys, step_fn, _, carry = _jaxes_setup(arch, data, "host", key, mesh, args)
    batch = sharding.batch_sharded(mesh)
    images = sharding.put(data.train.images[: h.batch_size], batch)
    labels = sharding.put(data.train.labels[: h.batch_size], batch)
    analysis = step_fn.lower(carry, images, labels, round_keys.dropout, 0).cost_analysis()
    if isinstance(analysis, list | tuple):  # older JAX: one dict per computation
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan")))


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def measure_backbone(backbone, data, key, mesh, peak, args) -> dict:
    """Compiles, then times, the plain loop and each jaxes driver on one backbone."""
    arch = arch_of(backbone, args)
    picked = train.choose_driver(backbone, "auto", mesh.devices.flat[0].platform)
    flops = step_flops(arch, data, key, mesh, args)
    loops = [plain_loop(arch, data, key, args)]
    loops += [jaxes_loop(arch, data, driver, key, mesh, args) for driver in args.drivers]
    for loop in loops:
        warm_up(loop)
    time_loops(loops, args)
    plain = loops[0].steps_per_s
    results = {
        loop.name: {
            "compile_s": loop.compile_s,
            "compile_cpu_s": loop.compile_cpu_s,
            "steps_per_s": loop.steps_per_s,
            "repeat_steps_per_s": loop.repeat_steps_per_s,
            "epochs_timed": loop.epochs_timed,
            "ratio_vs_plain": loop.steps_per_s / plain,
            "flops_per_s": flops * loop.steps_per_s,
            "fraction_of_peak": flops * loop.steps_per_s / peak,
            "round_s": loop.compile_s + ROUND_EPOCHS * loop.steps_per_epoch / loop.steps_per_s,
        }
        for loop in loops
    }
    return {
        "arch": arch.to_dict(),
        "table_driver": picked,
        "ratio_table_vs_plain": results[picked]["ratio_vs_plain"] if picked in results else None,
        "steps_per_epoch": loops[0].steps_per_epoch,
        "step_flops": flops,
        "loops": results,
    }


def run(args) -> dict:
    """Measures every loop of every backbone; returns the JSON-ready report."""
    info = machine()
    peak = matmul_peak(args.peak_size)
    data = data_lib.load(args.dataset, args.data_dir)
    mesh = sharding.make_mesh()
    key = keys.round_key(keys.root(0), 0)
    backbones = {b: measure_backbone(b, data, key, mesh, peak, args) for b in args.backbones}
    info["load_avg_end"] = list(os.getloadavg())
    return {
        "machine": info,
        "args": vars(args),
        "matmul_peak_flops": peak,
        "max_rss_mib": max_rss_mib(),
        "backbones": backbones,
    }


def print_report(report: dict) -> None:
    """The human-readable table (the JSON file holds the same numbers and every repeat)."""
    info, args = report["machine"], report["args"]
    load = " -> ".join(
        "/".join(f"{v:.2f}" for v in info[k]) for k in ("load_avg_start", "load_avg_end")
    )
    print(f"{info['date']}  {info['cpu']}, {info['cpus_usable']} usable CPUs, {info['device']}")
    print(f"jax {info['versions']['jax']}, flax {info['versions']['flax']}; load 1/5/15 min {load}")
    print(
        f"f32 matmul peak ({args['peak_size']}^2): {report['matmul_peak_flops'] / 1e9:.1f} GFLOP/s"
    )
    print(
        f"{'model':<15}{'loop':<10}{'compile s':>10}{'(cpu s)':>8}{'steps/s':>9}{'vs plain':>9}"
        f"{'GFLOP/s':>8}{'of peak':>8}{'round s':>8}{'epochs':>7}"
    )
    for backbone, entry in report["backbones"].items():
        label = models.Arch(**entry["arch"]).short()
        for name, loop in entry["loops"].items():
            mark = "*" if name == entry["table_driver"] else ""
            print(
                f"{label:<15}{name + mark:<10}{loop['compile_s']:>10.2f}"
                f"{loop['compile_cpu_s']:>8.2f}{loop['steps_per_s']:>9.1f}"
                f"{loop['ratio_vs_plain']:>9.2f}{loop['flops_per_s'] / 1e9:>8.2f}"
                f"{loop['fraction_of_peak']:>8.1%}{loop['round_s']:>8.1f}{loop['epochs_timed']:>7}"
            )
        ratio = entry["ratio_table_vs_plain"]
        ratio_text = "n/a (its driver was not timed)" if ratio is None else f"{ratio:.2f}"
        print(
            f"  {backbone}: jaxes ({entry['table_driver']}, DRIVER_TABLE) / plain = {ratio_text}; "
            f"{entry['step_flops'] / 1e6:.1f} MFLOP/step (XLA cost analysis, "
            f"lowered); {entry['steps_per_epoch']} steps/epoch"
        )
    print(
        f"round s = compile + {ROUND_EPOCHS} epochs (one new Arch); "
        f"peak host memory (ru_maxrss): {report['max_rss_mib']:.0f} MiB"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    print_report(report)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
