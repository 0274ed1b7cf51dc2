"""The ``tpe`` strategy: Optuna's Tree-structured Parzen Estimator over a ``jaxes.space`` space.

The JSON search state (``search.Strategy``) stays the source of truth; Optuna holds nothing
between proposals. Each ``propose`` builds a fresh in-memory study from the state: every observed
round is a finished trial (``COMPLETE`` with its fitness, or ``FAIL`` for a failed round), and every
pending proposal of the current generation a ``RUNNING`` one, which the sampler's constant liar
keeps the next proposal away from. The sampler's seed is drawn from the propose key, itself a
function of (seed, round index) (docs/design.md §4). So a proposal is a pure function of (state,
key): a resumed run proposes exactly what an uninterrupted one would, and the K proposals of a
generation see the same history with different seeds.

Conditional fields are suggested after the condition fields they depend on, so a trial holds
exactly the choice's active fields (Optuna's define-by-run spaces); with ``multivariate`` the
sampler models the fields jointly, grouped by the sub-spaces the trials share (``group``).
In a discrete space a repeat of an earlier choice is asked again (``max_collisions`` times, each
repeat then counting as running), then replaced by a uniform draw of an unseen choice; a space
whose every choice was proposed is exhausted, as with ``random``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState, create_trial

from jaxes import search
from jaxes import space as space_lib


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Optuna's INFO lines (a study created, a trial finished) and its experimental-feature
    warnings off, for this block only: Optuna's logger is process-wide and not ours to keep."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def distribution(field: space_lib.Field) -> BaseDistribution:
    """The Optuna distribution of a space field."""
    if field.kind == "values":
        return CategoricalDistribution(field.values)
    if field.kind == "int":
        return IntDistribution(field.low, field.high, log=field.log)
    return FloatDistribution(field.low, field.high, log=field.log)


def _suggest(trial: optuna.Trial, field: space_lib.Field):
    if field.kind == "values":
        return trial.suggest_categorical(field.name, field.values)
    if field.kind == "int":
        return trial.suggest_int(field.name, field.low, field.high, log=field.log)
    return trial.suggest_float(field.name, field.low, field.high, log=field.log)


class TPE(search.Strategy):
    """Optuna's ``TPESampler`` proposing from the recorded history (module docstring).

    Args:
      space: the search space.
      startup: rounds drawn at random before the model is used (``n_startup_trials``).
      candidates: candidates scored per proposal (``n_ei_candidates``).
      multivariate: model the fields jointly (Optuna's multivariate TPE) or each on its own.
      max_collisions: repeats of earlier choices asked again before a uniform unseen draw.
    """

    name = "tpe"

    def __init__(
        self,
        space: search.Space,
        startup: int = 5,
        candidates: int = 24,
        multivariate: bool = True,
        max_collisions: int = 20,
    ):
        super().__init__(space)
        self.startup = search._int_param("startup", startup, self.name, 0)
        self.candidates = search._int_param("candidates", candidates, self.name, 1)
        if not isinstance(multivariate, bool):
            raise search.SearchError(
                f"tpe parameter 'multivariate' must be True or False, not {multivariate!r}."
            )
        self.multivariate = multivariate
        self.max_collisions = search._int_param("max_collisions", max_collisions, self.name, 1)
        self._distributions = {n: distribution(f) for n, f in self.domain.fields.items()}

    def _trial(self, choice: dict, **kwargs) -> optuna.trial.FrozenTrial:
        return create_trial(
            params=choice, distributions={n: self._distributions[n] for n in choice}, **kwargs
        )

    def study(self, state: dict, seed: int) -> optuna.Study:
        """An in-memory study of the state's history (finished) and pending proposals (running)."""
        with _quiet():
            return self._study(state, seed)

    def _study(self, state: dict, seed: int) -> optuna.Study:
        sampler = optuna.samplers.TPESampler(
            n_startup_trials=self.startup,
            n_ei_candidates=self.candidates,
            seed=seed,
            multivariate=self.multivariate,
            group=self.multivariate and bool(self.domain.conditions),
            constant_liar=True,
        )
        study = optuna.create_study(direction="maximize", sampler=sampler)
        for record in state["history"]:
            if record["fitness"] is None:
                study.add_trial(self._trial(record["choice"], state=TrialState.FAIL))
            else:
                study.add_trial(self._trial(record["choice"], value=record["fitness"]))
        for pending in state["pending"]:
            study.add_trial(self._trial(pending["choice"], state=TrialState.RUNNING))
        return study

    def _ask(self, study: optuna.Study) -> dict:
        trial = study.ask()
        drawn = {n: _suggest(trial, self.domain.fields[n]) for n in self.domain.conditions}
        for name, field in self.domain.active(drawn).items():
            if name not in drawn:
                drawn[name] = _suggest(trial, field)
        return {name: drawn[name] for name in self.domain.active(drawn)}

    def _propose(self, state: dict, key: jax.Array) -> tuple[dict, dict]:
        seen = {search.canonical(r["choice"]) for r in state["history"]}
        seen |= {search.canonical(p["choice"]) for p in state["pending"]}
        if len(seen) >= self.size:
            raise search.Exhausted(
                f"All {self.size} architectures of the space were already proposed."
            )
        seed = int(jax.random.bits(key, dtype=jnp.uint32))
        with _quiet():
            study = self._study(state, seed)
            for _ in range(self.max_collisions if self.domain.discrete else 1):
                choice = self._ask(study)  # an asked trial stays running: the next avoids it
                if search.canonical(choice) not in seen:
                    return choice, {}
        choice = self._sample_new(key, seen, self.max_collisions)
        if choice is None:
            raise search.Exhausted(
                f"tpe and {self.max_collisions} uniform draws repeated earlier choices "
                f"({len(seen)} of {self.size} seen); the space counts as exhausted."
            )
        return choice, {}
