"""Rounds trained to convergence (claim 1): a generation of jobs -> one program per bucket.

``Engine`` owns a run's compiled programs and its data on the device. ``Engine.train(jobs)``
groups a generation's jobs by bucket (``padding``), pads each group to a power-of-two size that
divides over the mesh's ``rounds`` axis, and runs one ``population`` program per group: every
program is dispatched before any result is read, so the next group compiles while the previous
one runs. On a CPU run of one process and one device, where ``vmap`` buys no throughput, every
round is instead a group of one and the rounds run side by side on one host thread per core
(``Engine._threads``). A repeated (bucket, group size) never recompiles.

Epoch drivers (a static choice, never timed at run time, so one config always runs one program):
  * ``scan``: data lives on the device; an epoch is one ``lax.scan`` over a keyed permutation,
    with no host round trip per step.
  * ``unrolled``: the same scan, fully unrolled: a fallback for ops that XLA:CPU runs slowly
    inside while loops (jax-ml/jax#12868); it compiles several times longer.
  * ``host``: a Python loop feeding host batches, prefetched on a thread, to a jitted step.
    Also used whenever the data does not fit ``device_memory_fraction`` of device memory: the
    batches and their order are the same for the same key.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from jaxes import backbones, hostloop, keys, models, padding, population, rules, sharding, steps
from jaxes import data as data_lib

DRIVERS = ("scan", "unrolled", "host")

# Measured ahead of time by benchmarks/train_throughput.py (README, 2-core CPU): the fastest
# driver per (backbone, platform), counting compile time. Static on purpose (module docstring).
# CPU: scan runs the MLP at 2.8x and the CNN at 1.3x the plain host loop. The CNN scans fast
# only because models.ConvSame avoids XLA:CPU's conv kernels (#12868: 0.1x plain in a scan);
# unrolled never won and compiles 3-5x longer. Other platforms default to scan.
DRIVER_TABLE = {
    ("mlp", "cpu"): "scan",
    ("cnn", "cpu"): "scan",
}
DEFAULT_DRIVER = "scan"


def _programs_of(
    bucket: models.Arch, st, mesh, shape: tuple, num_classes: int, gated: bool, report=None
):
    """A bucket's ``(graphdef, init, run)``; ``run`` calls ``report`` after every epoch and,
    if ``gated``, skips each instance's blocks beyond its depth (``padding.skips_blocks``)."""
    graphdef = steps.graph_of(bucket, shape, num_classes)
    init = population.init_program(bucket, shape, num_classes, mesh)
    return graphdef, init, population.program(graphdef, st, mesh, report, gated)


@functools.lru_cache(maxsize=32)
def _shared_programs(
    bucket: models.Arch, st, mesh, shape: tuple, num_classes: int, gated: bool, model_key
):
    """``_programs_of`` a bucket with no epoch listener, shared by every ``Engine`` of the
    process: another run of the same buckets (a study, a notebook, the tests) neither traces nor
    lowers them again, which is ~1.5 s of a short run. At most 32 buckets stay alive, least
    recently used out first (``clear_shared_programs`` frees them all). ``model_key`` (a
    registered backbone's build function and field defaults, else None) is only part of the
    key: a model registered again gets new programs. A program with a listener calls back into
    its own engine and is never shared."""
    del model_key
    return _programs_of(bucket, st, mesh, shape, num_classes, gated)


def _model_key(bucket: models.Arch):
    """What a bucket's model is built from besides its ``Arch``: None for a built-in backbone, a
    registered one's build function and field defaults, or False if those cannot be a key."""
    if bucket.builtin:
        return None
    registered = backbones.get(bucket.backbone)
    key = (registered.build_fn, tuple(sorted(registered.fields.items())))
    try:
        hash(key)
    except TypeError:
        return False
    return key


def clear_shared_programs() -> None:
    """Frees the programs that engines share (``_shared_programs``), as a new process would."""
    _shared_programs.cache_clear()


@dataclasses.dataclass(frozen=True)
class Job:
    """One round to train: its architecture, round key and traced hyper-parameters."""

    arch: models.Arch
    key: jax.Array  # the round key; keys.RoundKeys streams everything of the round
    learning_rate: float
    weight_decay: float


@dataclasses.dataclass
class RoundResult:
    """The outcome of one round: the best epoch's instance and how it got there."""

    arch: models.Arch
    log_rate: float
    graphdef: nnx.GraphDef
    state: nnx.State | None  # params + LogRate of the best epoch (unpadded); None if failed early
    metrics: dict  # val_loss, val_accuracy, train_loss of the best epoch
    history: list[dict]
    epochs: int
    best_epoch: int
    driver: str = DEFAULT_DRIVER  # the epoch driver that ran
    failed: bool = False
    message: str | None = None
    learning_rate: float | None = None
    weight_decay: float | None = None
    bucket: models.Arch | None = None  # the padded architecture it trained as


def choose_driver(backbone: str, requested: str, platform: str) -> str:
    """The driver for ``requested`` ("auto" looks up the static table)."""
    if requested == "auto":
        return DRIVER_TABLE.get((backbone, platform), DEFAULT_DRIVER)
    if requested not in DRIVERS:
        raise ValueError(f"epoch_driver must be 'auto' or one of {DRIVERS}, got {requested!r}.")
    return requested


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one, e.g. Linux)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def group_size(n: int, rounds_axis: int) -> int:
    """The population size a group of ``n`` jobs runs at: a power of two, divisible by the axis."""
    size = 1 << (n - 1).bit_length()
    return -(-size // rounds_axis) * rounds_axis


class Engine:
    """Trains generations of jobs for one run: its mesh, data on the device, compiled programs.

    Args:
      data: the data set.
      config: the ``train`` section of the run config (configs/digits.py).
      mesh: the ``("rounds", "data")`` mesh (default: every device, rounds axis 1).
      space: the search space (its largest sizes define the buckets); default: no padding.
      pad_backbones: the backbones whose widths pad (``padding.DEFAULT_PAD_BACKBONES``).
      depth_backbones: the backbones whose depth pads where their blocks allow
        (``padding.skips_blocks``; ``padding.DEFAULT_DEPTH_BACKBONES``).
      on_epoch: ``on_epoch(job_index, epoch, val_loss)`` during training (host side).
      host_threads: host threads per generation (default: ``_threads`` decides); 1 keeps
        vmapped groups on a single-device CPU run too.
    """

    def __init__(
        self,
        data: data_lib.Data,
        config,
        *,
        mesh=None,
        space: Mapping[str, Sequence] | None = None,
        pad_backbones: Sequence[str] = padding.DEFAULT_PAD_BACKBONES,
        depth_backbones: Sequence[str] = padding.DEFAULT_DEPTH_BACKBONES,
        on_epoch: Callable[[int, int, float], None] | None = None,
        host_threads: int | None = None,
    ):
        self.data, self.config = data, config
        self.mesh = sharding.make_mesh() if mesh is None else mesh
        rules.check_batch_size(
            config.batch_size, len(data.train.labels), sharding.data_size(self.mesh), data=data.name
        )
        self.steps_per_epoch = len(data.train.labels) // config.batch_size
        self.space = dict(space or {})
        self.pad_backbones = tuple(pad_backbones)
        self.depth_backbones = tuple(depth_backbones)
        self.on_epoch = on_epoch
        if host_threads is not None and host_threads < 1:
            raise ValueError(f"host_threads must be at least 1, got {host_threads}.")
        self.host_threads = host_threads
        self.programs: dict = {}  # (kind, bucket, static, size) -> compiled callables
        # Programs this engine has needed so far, built or taken from the shared ones (each
        # compiles on its first call, unless that program already ran in this process).
        self.compiles = 0
        self._fits = hostloop.fits_on_device(data.train, config.device_memory_fraction, self.mesh)
        self._device_data = None
        # Program key -> a Future: compiling ahead (``prepare``), or done with.
        self._ahead: dict[tuple, concurrent.futures.Future] = {}

    def driver(self, arch: models.Arch) -> str:
        """The epoch driver of ``arch``: the static table, or ``host`` if the data is too big."""
        platform = self.mesh.devices.flat[0].platform
        driver = choose_driver(arch.backbone, self.config.epoch_driver, platform)
        return driver if driver == "host" or self._fits else "host"

    def bucket(self, arch: models.Arch) -> models.Arch:
        # A registered backbone is the user's own module: padding rules know only the built-ins.
        if not arch.builtin:
            return arch
        return padding.bucket(
            arch, self.space, self.pad_backbones, self.depth_backbones, self.data.spec.shape
        )

    def train(self, jobs: Sequence[Job], upcoming: Sequence[Job] = ()) -> list[RoundResult]:
        """Trains every job to convergence; results in the order of ``jobs``.

        ``upcoming``: the jobs of the next generation where they are known already (a strategy
        that ``sees_ahead``). Once this generation's programs are compiled and dispatched, the
        programs those jobs need start compiling on a background thread (``prepare``), so the
        compiles overlap this generation's training. Nothing else depends on them.
        """
        results: list[RoundResult | None] = [None] * len(jobs)
        log_rates = self._log_rates(jobs)
        units, host = self._units(jobs)
        for i in host:
            results[i] = self._host(jobs[i], log_rates[i], i)
        for (bucket, driver), indices in units:  # built here: the threads only read them
            st = self._static(driver)
            self._programs(bucket, st, self._size(indices))
            self._on_device(st.eval_batch_size)
        if self._threads() > 1 and len(units) > 1:
            pool = concurrent.futures.ThreadPoolExecutor(min(self._threads(), len(units)))
            dispatched = [threading.Event() for _ in units]
            try:
                futures = [pool.submit(self._run_group, *key, jobs, log_rates, ix, event)
                           for (key, ix), event in zip(units, dispatched, strict=True)]  # fmt: skip
                for event, future in zip(dispatched, futures, strict=True):
                    while not event.wait(0.05) and not future.done():
                        pass
                self.prepare(upcoming)
                outputs = [f.result() for f in futures]
            finally:
                # Not `with`: on an interrupt (guard.Interrupted) the run must leave at once,
                # not wait for the rounds in flight (the process exits; nothing was committed).
                pool.shutdown(wait=False, cancel_futures=True)
        else:
            # Dispatch every group before reading any result: the next one compiles meanwhile.
            pending = [self._dispatch(*key, jobs, log_rates, ix) for key, ix in units]
            self.prepare(upcoming)
            outputs = [(jax.tree.map(np.asarray, out), driver) for out, driver in pending]
        for ((bucket, _), indices), (out, driver) in zip(units, outputs, strict=True):
            for lane, i in enumerate(indices):
                results[i] = self._result(jobs[i], log_rates[i], bucket, driver, out, lane)
        return results

    def prepare(self, jobs: Sequence[Job]) -> None:
        """Starts compiling, on a background thread, the programs that ``train(jobs)`` will run
        and that this engine has neither run nor prepared; returns at once.

        ``train`` waits for a program still compiling here rather than compiling it again. The
        compiled programs are the ones ``train`` would compile (same inputs, shapes and
        shardings; a test checks that ``train`` then compiles nothing), so no result depends on
        whether, or when, they were prepared. A failed compile is left for ``train`` to raise.
        """
        work = []
        try:
            log_rates = self._log_rates(jobs)
            for (bucket, driver), indices in self._units(jobs)[0]:
                st = self._static(driver)
                size = self._size(indices)
                key = self._program_key(bucket, st, size)
                if key in self._ahead or any(key == k for k, _, _ in work):
                    continue
                _, init, run = self._programs(bucket, st, size)
                init_in, lanes_rest = self._inputs(bucket, size, jobs, log_rates, indices)
                pop = sharding.population_sharded(self.mesh)
                args = (init, run, _abstract(init_in, pop), _abstract(lanes_rest, pop),
                        self._on_device(st.eval_batch_size), pop)  # fmt: skip
                work.append((key, concurrent.futures.Future(), args))
        except Exception:
            return  # best effort: ``train`` meets the same error where it belongs
        if work:
            # Not a daemon: an interpreter that exits during an XLA compile crashes, so a run
            # that ends waits for at most the compile in flight (an interrupt exits at once,
            # ``os._exit``).
            threading.Thread(target=_compile_ahead, args=([w[1:] for w in work],),
                             name="jaxes-compile-ahead").start()  # fmt: skip
            for key, future, _ in work:
                self._ahead[key] = future

    def _log_rates(self, jobs: Sequence[Job]) -> list[float]:
        return [
            models.draw_log_rate(keys.RoundKeys.of(j.key).dropout_rate, self.config.dropout_rate)
            for j in jobs
        ]

    def _units(self, jobs: Sequence[Job]) -> tuple[list, list[int]]:
        """``(units, host)``: the programs of ``train(jobs)`` as ``((bucket, driver), indices)``
        (each a group of jobs, or one job where rounds run on host threads, ``_threads``) and
        the indices of the jobs on the ``host`` driver."""
        groups: dict[tuple, list[int]] = {}
        host = []
        for i, job in enumerate(jobs):
            driver = self.driver(job.arch)
            if driver == "host":
                host.append(i)
            else:
                groups.setdefault((self.bucket(job.arch), driver), []).append(i)
        if self._threads() > 1:  # one program per round, side by side on host threads
            return [(key, [i]) for key, indices in groups.items() for i in indices], host
        return list(groups.items()), host

    def _size(self, indices: Sequence[int]) -> int:
        return group_size(len(indices), self.mesh.shape[sharding.ROUNDS_AXIS])

    def _threads(self) -> int:
        """Host threads for a generation: ``host_threads`` if given; else one per core on a CPU
        run of one process and one device without an epoch listener, and 1 otherwise.

        With more than one thread every round is its own program (a group of one) and the
        rounds run side by side, one per thread. XLA:CPU runs the programs that one thread
        dispatches one after another, each on about one core for a small model, and ``vmap``
        buys no throughput there (README, "Population rounds"); programs dispatched from two
        threads run at once. Each program is deterministic, so the results do not depend on
        the threads. More than one process would have to launch its collectives in the same
        order on every host, a mesh of several devices is what the population axis is for, and
        a listener would hear two programs at once: those keep one thread and vmapped groups.
        """
        if self.host_threads is not None:
            return self.host_threads
        if (
            self.on_epoch is not None
            or jax.process_count() > 1
            or self.mesh.size > 1
            or self.mesh.devices.flat[0].platform != "cpu"
        ):
            return 1
        return usable_cores()

    def _run_group(self, bucket, driver, jobs, log_rates, indices, dispatched):
        outputs, driver = self._dispatch(bucket, driver, jobs, log_rates, indices)
        dispatched.set()
        return jax.tree.map(np.asarray, outputs), driver

    def _host(self, job: Job, log_rate: float, index: int) -> RoundResult:
        on_epoch = None
        if self.on_epoch is not None:
            on_epoch = lambda epoch, loss: self.on_epoch(index, epoch, loss)  # noqa: E731
        fields = hostloop.to_convergence(
            job, log_rate, self.data, self.config, self.mesh, self.programs, on_epoch
        )
        return RoundResult(
            arch=job.arch, log_rate=log_rate, driver="host", learning_rate=job.learning_rate,
            weight_decay=job.weight_decay, bucket=job.arch, **fields,
        )  # fmt: skip

    def _static(self, driver: str) -> population.Static:
        c = self.config
        eval_batch = min(c.eval_batch_size, len(self.data.validation.labels))
        eval_batch = -(-eval_batch // sharding.data_size(self.mesh)) * sharding.data_size(self.mesh)
        return population.Static(
            hparams=steps.HParams(self.data.spec, c.batch_size, self.steps_per_epoch, driver),
            max_epochs=c.max_epochs,
            patience=c.patience,
            min_delta=float(c.min_delta),
            eval_batch_size=eval_batch,
        )

    def _on_device(self, eval_batch: int):
        if self._device_data is None or self._device_data[0] != eval_batch:
            rep = sharding.replicated(self.mesh)
            arrays = (
                self.data.train.images,
                self.data.train.labels,
                *population.padded_validation(self.data.validation, eval_batch),
            )
            self._device_data = (eval_batch, tuple(sharding.put(a, rep) for a in arrays))
        return self._device_data[1]

    def _program_key(self, bucket: models.Arch, st: population.Static, size: int) -> tuple:
        return ("population", bucket, st, size, self.mesh)

    def _programs(self, bucket: models.Arch, st: population.Static, size: int):
        key = self._program_key(bucket, st, size)
        if key not in self.programs:
            spec = self.data.spec
            # No callback without a listener: a host callback keeps a program out of the
            # persistent compilation cache, so a rerun would compile it again.
            gated = padding.skips_blocks(bucket, self.space, self.depth_backbones, spec.shape)
            args = (bucket, st, self.mesh, tuple(spec.shape), spec.num_classes, gated)
            model_key = _model_key(bucket)
            if self.on_epoch is None and model_key is not False:
                self.programs[key] = _shared_programs(*args, model_key)
            else:
                report = None if self.on_epoch is None else self._report
                self.programs[key] = _programs_of(*args, report=report)
            self.compiles += 1
        return self.programs[key]

    def _report(self, index, epoch, val_loss, live):
        if self.on_epoch is None:
            return
        for i, e, v, alive in zip(*(np.ravel(a) for a in (index, epoch, val_loss, live)),
                                  strict=True):  # fmt: skip
            if alive and i >= 0:
                self.on_epoch(int(i), int(e), float(v))

    def _dispatch(self, bucket, driver, jobs, log_rates, indices):
        st = self._static(driver)
        size = self._size(indices)
        _, init, run = self._programs(bucket, st, size)
        # A program compiling ahead (``prepare``) is waited for, not compiled twice; its
        # failure, if any, is raised by the call below.
        ahead = self._ahead.setdefault(self._program_key(bucket, st, size), _DISPATCHED)
        concurrent.futures.wait([ahead])
        init_in, lanes_rest = self._inputs(bucket, size, jobs, log_rates, indices)
        pop = sharding.population_sharded(self.mesh)
        params, rest, mask = init(*(sharding.put_tree(x, pop) for x in init_in))
        lanes_in = (params, rest, mask, *(sharding.put_tree(x, pop) for x in lanes_rest))
        # Asynchronous: the next group compiles while this one runs.
        return run(lanes_in, *self._on_device(st.eval_batch_size)), driver

    def _inputs(self, bucket, size, jobs, log_rates, indices) -> tuple[tuple, tuple]:
        """The host inputs of a group's programs: ``init``'s ``(raw keys, log-rates, sizes)``
        and the lanes after ``(params, rest, mask)``: ``(hyper, keys, active, index)``."""
        lanes = [indices[min(lane, len(indices) - 1)] for lane in range(size)]  # pad: repeat last
        round_keys = [keys.RoundKeys.of(jobs[i].key) for i in lanes]
        raw = lambda ks: np.stack([np.asarray(jax.random.key_data(k)) for k in ks])  # noqa: E731
        init_in = (
            raw([k.init for k in round_keys]),
            np.asarray([log_rates[i] for i in lanes], np.float32),
            padding.RealSizes.of([jobs[i].arch for i in lanes], bucket.depth),
        )
        hyper = steps.Hyper(
            np.asarray([jobs[i].learning_rate for i in lanes], np.float32),
            np.asarray([jobs[i].weight_decay for i in lanes], np.float32),
        )
        lane_keys = np.stack([raw([k.data for k in round_keys]),
                              raw([k.dropout for k in round_keys])], axis=1)  # fmt: skip
        active = np.arange(size) < len(indices)
        # Each lane reports as its job's index in the generation; padding lanes as -1.
        lane_index = np.asarray([i if on else -1 for i, on in zip(lanes, active, strict=True)],
                                np.int32)  # fmt: skip
        return init_in, (hyper, lane_keys, active, lane_index)

    def _abstract(self, arch: models.Arch):
        """``(graphdef, abstract state)`` of an unpadded ``arch`` (cached: no trace per round)."""
        key = ("abstract", arch)
        if key not in self.programs:
            spec = self.data.spec
            model = nnx.eval_shape(
                lambda: models.build(arch, spec.shape, spec.num_classes, jax.random.key(0), -1.0)
            )
            self.programs[key] = nnx.split(model)
        return self.programs[key]

    def _result(self, job, log_rate, bucket, driver, host, lane) -> RoundResult:
        n_val = len(self.data.validation.labels)
        epochs = int(host["epochs"][lane])
        best_epoch = int(host["best_epoch"][lane])
        history = []
        for epoch in range(epochs):
            train_loss, val_loss, hits = (float(v) for v in host["history"][lane, epoch])
            history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                            "val_accuracy": hits / n_val})  # fmt: skip
        failed = bool(host["failed"][lane])
        message = None
        if failed:
            last = history[-1]
            bad = next(k for k in ("train_loss", "val_loss") if not math.isfinite(last[k]))
            message = f"{bad} became {last[bad]} at epoch {last['epoch']}"
        graphdef, abstract = self._abstract(job.arch)
        state, metrics = None, {}
        if best_epoch >= 0:
            pick = lambda tree: jax.tree.map(lambda x: x[lane], tree)  # noqa: E731
            pure = nnx.to_pure_dict(pick(host["params"]))
            rest = nnx.to_pure_dict(pick(host["rest"]))
            if bucket.builtin:
                pure = padding.unpad(pure, bucket, job.arch)
                rest = padding.unpad(rest, bucket, job.arch)
            pure = _merge(pure, rest)
            state = jax.tree.map(lambda x: x, abstract)  # a fresh State to fill
            nnx.replace_by_pure_dict(state, sharding.put_tree(pure, sharding.replicated(self.mesh)))
            metrics = {k: v for k, v in history[best_epoch].items() if k != "epoch"}
        return RoundResult(
            arch=job.arch, log_rate=log_rate, graphdef=graphdef, state=state, metrics=metrics,
            history=history, epochs=epochs, best_epoch=best_epoch, driver=driver, failed=failed,
            message=message, learning_rate=job.learning_rate, weight_decay=job.weight_decay,
            bucket=bucket,
        )  # fmt: skip


_DISPATCHED = concurrent.futures.Future()  # a program ``train`` has compiled itself
_DISPATCHED.set_result(None)


def _abstract(tree, sharding_):
    """``tree``'s arrays as ``ShapeDtypeStruct``s placed with ``sharding_``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_), tree)


def _compile_ahead(work) -> None:
    """``Engine.prepare``'s thread: compiles each group's ``init`` and ``run``, then resolves its
    Future."""
    for future, (init, run, init_in, lanes_rest, data, pop) in work:
        try:
            init.lower(*init_in).compile()
            params = _abstract(jax.eval_shape(init, *init_in), pop)
            run.lower((*params, *lanes_rest), *data).compile()
        except Exception:
            pass  # the same call in ``train`` raises it, where it belongs
        finally:
            future.set_result(None)


def _merge(a: dict, b: dict) -> dict:
    """Deep union of two nested dicts (params and log-rates of one model)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if k in out and isinstance(v, dict) else v
    return out


def to_convergence(
    arch: models.Arch,
    data: data_lib.Data,
    key: jax.Array,
    config,
    *,
    mesh=None,
    on_epoch: Callable[[int, dict], None] | None = None,
    engine: Engine | None = None,
) -> RoundResult:
    """Trains one instance of ``arch`` to convergence with the config's hyper-parameters.

    A one-job generation of an ``Engine`` (a new one unless ``engine`` is given: pass one to
    reuse its compiled programs).
    """
    if engine is None:
        report = None if on_epoch is None else (lambda i, e, v: on_epoch(e, {"val_loss": v}))
        engine = Engine(data, config, mesh=mesh, on_epoch=report)
    job = Job(arch, key, float(config.learning_rate), float(config.weight_decay))
    return engine.train([job])[0]
