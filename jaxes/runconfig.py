"""Checks a run config and turns it into the objects of a run.

Every problem is one ``ConfigError`` sentence that names the config field, e.g.
``config.tolerance.ratio: ratio must be a real number in (0, 1] ..., got 1.5.``
"""

from __future__ import annotations

import dataclasses
import math

from jaxes import backbones, gain, keys, models, rules, search, sharding, stopping
from jaxes import space as space_lib
from jaxes import train as train_lib

# Search-space fields that are not architecture fields: traced hyper-parameters of training
# (docs/design.md §6b), so searching them never recompiles. Each defaults to its
# ``config.train`` value.
HPARAM_FIELDS = ("learning_rate", "weight_decay")
# config.tolerance.rule -> the module that ends the rounds (same init/update/State protocol).
RULES = {"patent": stopping, "gain": gain}


class ConfigError(rules.FieldError):
    """A config field has a bad value; ``field`` names it."""


def _field_error(path: str, problem: str) -> ConfigError:
    return ConfigError(path, problem)


def tolerance_rule(config):
    """The module of ``config.tolerance.rule``: ``stopping`` (the patent's) or ``gain``."""
    rule = RULES.get(config.tolerance.rule)
    if rule is None:
        raise _field_error(
            "tolerance.rule", f"must be one of {sorted(RULES)}, got {config.tolerance.rule!r}."
        )
    return rule


def _make_gain(config) -> gain.State:
    tol = config.tolerance
    kwargs = {
        "mode": config.mode,
        "noise": tol.gain.noise,
        "warmup": tol.gain.warmup,
        "nonfinite": "worse",  # a failed round counts as below the best; the run goes on
        "extend": tol.extend,
        "max_rounds": tol.max_rounds,
    }
    try:
        return gain.init(config.rounds, **kwargs)
    except stopping.ArgumentError as e:
        paths = {"rounds": "rounds", "noise": "tolerance.gain.noise",
                 "warmup": "tolerance.gain.warmup"}  # fmt: skip
        path = paths.get(e.argument, f"tolerance.{e.argument}")
        raise _field_error(path, str(e)) from None


def make_tolerance(config, root_key) -> stopping.State | gain.State:
    """The initial state of the rule that ends the rounds (``config.tolerance.rule``).

    For the patent's rule, ``r`` comes from the seed unless fixed by the config.
    """
    if tolerance_rule(config) is gain:
        return _make_gain(config)
    tol = config.tolerance
    r = tol.r
    if tol.patience is None and r is None:
        r = keys.tolerance_r(root_key)
    kwargs = {
        "patience": tol.patience,
        "r": r,
        "ratio": tol.ratio,
        "mode": config.mode,
        "min_delta": tol.min_delta,
        "min_rel_delta": tol.min_rel_delta,
        "ties_reset": tol.ties_reset,
        "warmup": tol.warmup,
        "baseline": tol.baseline,
        "target": tol.target,
        "nonfinite": "worse",  # a failed round counts as below the best; the run goes on
        "extend": tol.extend,
        "max_rounds": tol.max_rounds,
    }
    try:
        return stopping.init(config.rounds, **kwargs)
    except stopping.ArgumentError as e:
        path = "rounds" if e.argument == "rounds" else f"tolerance.{e.argument}"
        raise _field_error(path, str(e)) from None


def _check_hparam(name: str, field) -> None:
    zero_ok = name == "weight_decay"
    values = field.values if field.kind == "values" else (field.low, field.high)
    for value in values:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not (number and math.isfinite(value) and (value >= 0 if zero_ok else value > 0)):
            raise _field_error(
                f"search.space.{name}",
                f"values must be finite numbers {'>= 0' if zero_ok else '> 0'}, got {value!r}.",
            )


def _check_arch_field(name: str, field) -> None:
    values = field.values if field.kind == "values" else (field.low, field.high)
    for value in values:
        try:
            models.Arch(**{name: value})
        except (TypeError, ValueError) as e:
            raise _field_error(f"search.space.{name}", str(e)) from None


def _check_fields(domain: space_lib.Space) -> None:
    """Every field of every backbone's branch must be one that backbone (or training) reads."""
    arch_fields = {f.name for f in dataclasses.fields(models.Arch)} - {"options"}
    backbone = domain.fields.get("backbone")
    names = backbone.values if backbone else (models.Arch().backbone,)
    for name in names:
        if name not in models.BACKBONES and not backbones.is_registered(name):
            raise _field_error(
                "search.space.backbone",
                f"{name!r} is neither built in {models.BACKBONES} nor registered "
                f"{backbones.names()}; register it with jaxes.backbones.register in the config.",
            )
    for name in names:
        own = arch_fields if name in models.BACKBONES else set(backbones.get(name).fields)
        for field in domain.active({"backbone": name}).values():
            if field.name in HPARAM_FIELDS or field.name == "backbone":
                continue
            if field.name not in own:
                valid = sorted(own | set(HPARAM_FIELDS))
                raise _field_error(
                    f"search.space.{field.name}",
                    f"backbone {name!r} has no such field (it has {valid}); make the field "
                    f"conditional on the backbones that have it, e.g. "
                    f"{{'values': ..., 'when': {{'backbone': ...}}}}.",
                )
    for field in domain.fields.values():
        if field.name in HPARAM_FIELDS:
            _check_hparam(field.name, field)
        elif field.name in arch_fields and field.name != "backbone":
            users = [b for b in names if b in models.BACKBONES]
            if any(domain.active({"backbone": b}).get(field.name) for b in users):
                _check_arch_field(field.name, field)


def make_strategy(config) -> search.Strategy:
    """The search strategy of ``config.search``: its space holds architecture fields (of the
    built-in backbones or of registered ones, conditional on them) and ``HPARAM_FIELDS``."""
    cfg = config.search
    try:
        domain = space_lib.Space(cfg.space)
    except search.SearchError as e:
        path = "search.space" + ("" if e.field is None else f".{e.field}")
        raise _field_error(path, e.problem) from None
    _check_fields(domain)
    params = {
        "fixed": {},
        "random": {"max_collisions": cfg.max_collisions},
        "evolution": {
            "population": cfg.population,
            "tournament": cfg.tournament,
            "max_collisions": cfg.max_collisions,
        },
        "tpe": {
            "startup": cfg.tpe.startup,
            "candidates": cfg.tpe.candidates,
            "multivariate": cfg.tpe.multivariate,
            "max_collisions": cfg.max_collisions,
        },
    }.get(cfg.strategy)
    if params is None:
        raise _field_error(
            "search.strategy", f"must be one of {', '.join(search.NAMES)}, got {cfg.strategy!r}."
        )
    try:
        return search.make(cfg.strategy, cfg.space, **params)
    except search.SearchError as e:
        path = "search" if e.field is None else f"search.space.{e.field}"
        raise _field_error(path, e.problem) from None


def split_choice(choice: dict, train_config) -> tuple[models.Arch, float, float]:
    """A search choice as ``(arch, learning_rate, weight_decay)``; hyper-parameters the space does
    not search come from ``config.train``. A registered backbone's fields become its options."""
    fields = {k: v for k, v in choice.items() if k not in HPARAM_FIELDS}
    backbone = fields.get("backbone", models.Arch().backbone)
    if backbone in models.BACKBONES:
        arch = models.Arch.from_dict(fields)
    else:
        arch = models.Arch(backbone, options={k: v for k, v in fields.items() if k != "backbone"})
    learning_rate = float(choice.get("learning_rate", train_config.learning_rate))
    weight_decay = float(choice.get("weight_decay", train_config.weight_decay))
    return arch, learning_rate, weight_decay


def _check(ok: bool, path: str, allowed: str, value) -> None:
    if not ok:
        raise _field_error(path, f"must be {allowed}, got {value!r}.")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_config(config) -> None:
    """Raises ConfigError naming the first bad field of ``config``."""
    try:
        want = rules.mode_for(config.metric)
    except rules.FieldError as e:
        raise _field_error(e.field, e.problem) from None
    _check(config.mode == want, "mode", f"{want!r} for metric {config.metric!r}", config.mode)
    _check(_is_int(config.seed) and config.seed >= 0, "seed", "an int >= 0", config.seed)
    _check(bool(config.dataset), "dataset", "a TFDS dataset name", config.dataset)
    t = config.train
    for name, minimum in (("batch_size", 1), ("max_epochs", 1), ("patience", 1)):
        value = t[name]
        _check(_is_int(value) and value >= minimum, f"train.{name}", f"an int >= {minimum}", value)
    _check(_is_int(t.eval_batch_size) and t.eval_batch_size >= 1, "train.eval_batch_size",
           "an int >= 1", t.eval_batch_size)  # fmt: skip
    _check(t.learning_rate > 0, "train.learning_rate", "> 0", t.learning_rate)
    _check(t.weight_decay >= 0, "train.weight_decay", ">= 0", t.weight_decay)
    _check(t.min_delta >= 0, "train.min_delta", ">= 0", t.min_delta)
    rate = tuple(t.dropout_rate)
    _check(len(rate) == 2 and 0 < rate[0] <= rate[1] < 1, "train.dropout_rate",
           "(low, high) with 0 < low <= high < 1", rate)  # fmt: skip
    drivers = ("auto", *train_lib.DRIVERS)
    _check(t.epoch_driver in drivers, "train.epoch_driver", f"one of {drivers}", t.epoch_driver)
    fraction = t.device_memory_fraction
    _check(0 < fraction <= 1, "train.device_memory_fraction", "in (0, 1]", fraction)
    _check(isinstance(t.epoch_progress, bool), "train.epoch_progress", "True or False",
           t.epoch_progress)  # fmt: skip
    k = config.parallel.rounds
    _check(_is_int(k) and k >= 1, "parallel.rounds", "an int >= 1", k)
    for field in ("pad_backbones", "pad_depth_backbones"):
        pad = tuple(config.parallel[field])
        _check(set(pad) <= set(models.BACKBONES), f"parallel.{field}",
               f"a subset of {models.BACKBONES}", pad)  # fmt: skip
    make_tolerance(config, keys.root(config.seed))
    make_strategy(config)


def check_batch_size(config, data, mesh) -> None:
    """Raises ConfigError unless ``train.batch_size`` fits the data and splits over the mesh."""
    try:
        rules.check_batch_size(
            config.train.batch_size,
            len(data.train.labels),
            sharding.data_size(mesh),
            data=config.dataset,
        )
    except rules.FieldError as e:
        raise _field_error(e.field, e.problem) from None
