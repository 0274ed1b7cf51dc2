"""Architecture search: ``fixed``, ``random``, ``evolution`` and ``tpe`` (Optuna's TPE) strategies.

A space maps each field to its allowed values, e.g. ``{"backbone": ["mlp", "cnn"], "depth": [1, 2,
3]}``, or to a range or a conditional field (``jaxes.space``); a choice maps each active field to
one value. Strategies are stateless objects; all
search state is a JSON-serializable dict that ``init`` creates and ``propose``/``observe`` return
anew, so a run saves it after every round and resumes exactly. ``propose`` is a pure function of
``(state, key)`` and takes all its randomness from the JAX key, so a run killed between ``propose``
and ``observe`` replays the same proposal from the state saved after the previous ``observe``.

State keys shared by every strategy: ``strategy`` (the name), ``history`` (one record per observed
round: ``choice``, ``fitness`` -- higher is better, ``None`` for a failed round -- ``round_index``
and ``parent``, the history index of the evolution parent or ``None``) and ``pending`` (the
proposals not yet observed, oldest first: a generation of K rounds proposes K times, then observes
each in round order; docs/design.md §6b). ``random`` adds ``seen`` (canonical choices ever
proposed); ``evolution`` adds ``population`` (history indices, oldest first), ``last_tournament``
(history indices of the members sampled by the last propose) and ``last_parent``.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import jax

from jaxes import space as space_lib
from jaxes.space import SearchError

Space = Mapping[str, Any]  # field -> a declaration of jaxes.space


# Named streams of a propose key (docs/design.md §4: fold_in with constants, never call order).
_SAMPLE, _FALLBACK, _TOURNAMENT, _FIELD, _VALUE = 1, 2, 3, 4, 5


class Exhausted(Exception):
    """The strategy cannot propose a new architecture: the space is used up."""


def canonical(choice: Mapping) -> str:
    """Returns a choice as canonical JSON (sorted keys, no spaces): the dedup key."""
    return json.dumps(dict(choice), sort_keys=True, separators=(",", ":"), allow_nan=False)


def _int_param(name: str, value: Any, strategy: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SearchError(
            f"{strategy} parameter {name!r} must be an integer >= {minimum}, not {value!r}."
        )
    return value


class Strategy:
    """Base of all strategies; subclasses implement ``_propose`` and may extend the state.

    Attributes:
      name: the strategy name, as passed to ``make``.
      domain: the validated ``space.Space``.
      space: field -> the values a size bucket must cover (``Space.bounds``), fields sorted.
      size: the number of distinct choices (``math.inf`` with a float range).
    """

    name: ClassVar[str] = ""

    def __init__(self, space: Space):
        self.domain = space_lib.Space(space)
        self.space = self.domain.bounds()
        self.size = self.domain.size

    def init(self) -> dict:
        """Returns the initial, JSON-serializable search state."""
        return {"strategy": self.name, "history": [], "pending": []}

    def propose(self, state: dict, key: jax.Array) -> tuple[dict, dict]:
        """Proposes the next architecture.

        Args:
          state: the current search state (not modified).
          key: a JAX PRNG key (``jax.random.key``); the only source of randomness.

        Returns:
          ``(choice, new_state)``: field -> value, and the state to pass to ``observe``.

        Raises:
          Exhausted: no new architecture can be proposed.
        """
        state = self._copy(state)
        choice, extra = self._propose(state, key)
        state.update(extra)
        state["pending"] = [
            *state["pending"],
            {"choice": choice, "parent": extra.get("last_parent")},
        ]
        return choice, state

    def observe(
        self, state: dict, choice: Mapping, fitness: float | None, round_index: int
    ) -> dict:
        """Records the outcome of a round.

        Args:
          state: the state returned by ``propose``.
          choice: the architecture trained in this round.
          fitness: higher is better; ``None`` (or a non-finite value) marks a failed round, ranked
            below every finite fitness.
          round_index: the round's index; must exceed every index observed before.

        Returns:
          The new state.
        """
        state = self._copy(state)
        choice = self._check_choice(choice, "observed choice")
        if isinstance(round_index, bool) or not isinstance(round_index, int) or round_index < 0:
            raise SearchError(f"round_index must be a non-negative integer, got {round_index!r}.")
        if state["history"] and round_index <= state["history"][-1]["round_index"]:
            raise SearchError(
                f"round_index {round_index} is not after the last observed round; "
                "observe each round once, in order."
            )
        if fitness is not None:
            fitness = float(fitness)
            fitness = fitness if math.isfinite(fitness) else None
        # The oldest pending proposal of this choice is the one being observed.
        key = canonical(choice)
        pending = state["pending"]
        match = next((i for i, p in enumerate(pending) if canonical(p["choice"]) == key), None)
        parent = None if match is None else pending.pop(match)["parent"]
        record = {
            "choice": choice,
            "fitness": fitness,
            "round_index": round_index,
            "parent": parent,
        }
        state["history"].append(record)
        self._observed(state, len(state["history"]) - 1)
        return state

    def sees_ahead(self, state: dict) -> bool:
        """Whether ``propose(state, key)`` proposes exactly what it will once the pending
        proposals are observed, whatever their outcomes: then a run compiles the next
        generation's programs while this one trains. False unless a strategy knows better."""
        del state
        return False

    def incumbent(self, state: dict) -> dict | None:
        """Returns the best record ever observed (earliest on ties); None if every round failed."""
        best = None
        for record in state["history"]:
            fitness = record["fitness"]
            if fitness is not None and (best is None or fitness > best["fitness"]):
                best = record
        return None if best is None else dict(best)

    def _propose(self, state: dict, key: jax.Array) -> tuple[dict, dict]:
        raise NotImplementedError

    def _observed(self, state: dict, history_index: int) -> None:
        """Updates strategy-specific state in place after ``history_index`` was appended."""

    def _copy(self, state: dict) -> dict:
        if not isinstance(state, dict) or state.get("strategy") != self.name:
            got = state.get("strategy") if isinstance(state, dict) else type(state).__name__
            raise SearchError(f"State is of strategy {got!r}, not {self.name!r}; pass its own.")
        return json.loads(json.dumps(state))  # Deep copy; also proves the state is JSON.

    def _check_choice(self, choice: Any, what: str) -> dict:
        return self.domain.check(choice, what)

    def _sample(self, key: jax.Array) -> dict:
        """Draws a choice, each field independently (``space.Space.sample``)."""
        return self.domain.sample(key)

    def _sample_new(self, key: jax.Array, seen: set[str], max_collisions: int) -> dict | None:
        """Rejection-samples a choice not in ``seen``; None after ``max_collisions`` collisions."""
        for attempt in range(max_collisions):
            choice = self._sample(jax.random.fold_in(jax.random.fold_in(key, _SAMPLE), attempt))
            if canonical(choice) not in seen:
                return choice
        return None


class Fixed(Strategy):
    """Always proposes the same architecture (the run draws a new init and dropout rate)."""

    name = "fixed"

    def __init__(self, space: Space, arch: Mapping | None = None):
        super().__init__(space)
        if arch is None:
            arch = self.domain.default()
        self.arch = self._check_choice(arch, "fixed arch")

    def sees_ahead(self, state: dict) -> bool:
        return True

    def _propose(self, state: dict, key: jax.Array) -> tuple[dict, dict]:
        return dict(self.arch), {}


class Random(Strategy):
    """Uniform over the space (log-uniform on log ranges), never proposing the same choice twice.

    A space with a float range never runs out; a discrete one is exhausted once every choice was
    proposed (dedup is exact: canonical JSON).
    """

    name = "random"

    def __init__(self, space: Space, max_collisions: int = 100):
        super().__init__(space)
        self.max_collisions = _int_param("max_collisions", max_collisions, self.name, 1)

    def init(self) -> dict:
        return {**super().init(), "seen": []}

    def sees_ahead(self, state: dict) -> bool:
        return True  # proposals read only what earlier proposals saw, never an outcome

    def _propose(self, state: dict, key: jax.Array) -> tuple[dict, dict]:
        seen = set(state["seen"])
        if len(seen) >= self.size:
            raise Exhausted(f"All {self.size} architectures of the space were already proposed.")
        choice = self._sample_new(key, seen, self.max_collisions)
        if choice is None:
            raise Exhausted(
                f"{self.max_collisions} consecutive proposals repeated earlier ones "
                f"({len(seen)} of {self.size} architectures seen); the space counts as exhausted."
            )
        return choice, {"seen": [*state["seen"], canonical(choice)]}

    def _observed(self, state: dict, history_index: int) -> None:
        key = canonical(state["history"][history_index]["choice"])
        if key not in state["seen"]:  # Observed without being proposed (e.g. edited state).
            state["seen"].append(key)


class Evolution(Strategy):
    """Regularized (aging) evolution, Real et al. 2019, "Regularized Evolution for Image Classifier
    Architecture Search".

    The first ``population`` proposals are random (distinct while the space allows); then each
    child is the fittest of ``tournament`` members sampled without replacement from the current
    population (the older wins ties, failed rounds rank last), with exactly one of its active
    fields mutated (``space.Field.mutate``: another listed value, or a range value moved in its
    log or linear scale and reflected at the ends; a new backbone draws the fields it brings).
    Each observed child joins the population and, once it is full, the oldest member leaves.
    """

    name = "evolution"

    def __init__(
        self, space: Space, population: int = 8, tournament: int = 3, max_collisions: int = 100
    ):
        super().__init__(space)
        self.population = _int_param("population", population, self.name, 1)
        self.tournament = _int_param("tournament", tournament, self.name, 1)
        if self.tournament > self.population:
            raise SearchError(
                f"evolution parameter 'tournament' ({tournament}) must be <= 'population' "
                f"({population}); lower it."
            )
        self.max_collisions = _int_param("max_collisions", max_collisions, self.name, 1)
        if not any(field.mutable for field in self.domain.fields.values()):
            raise SearchError(
                "evolution needs a search space field with at least two values to mutate; "
                "add values or use the 'fixed' strategy."
            )

    def init(self) -> dict:
        return {**super().init(), "population": [], "last_tournament": None, "last_parent": None}

    def sees_ahead(self, state: dict) -> bool:
        # The first members are random draws that avoid the members and the pending proposals;
        # a pending proposal, once observed, is a member, so the draw is the same until the
        # population would be full.
        return len(state["population"]) + len(state["pending"]) < self.population

    def members(self, state: dict) -> list[dict]:
        """Returns the history records of the current population, oldest first."""
        return [state["history"][index] for index in state["population"]]

    def _propose(self, state: dict, key: jax.Array) -> tuple[dict, dict]:
        population = state["population"]
        if len(population) < self.population:
            # Members and this generation's earlier proposals (none when K = 1).
            seen = {canonical(record["choice"]) for record in self.members(state)}
            seen |= {canonical(p["choice"]) for p in state["pending"]}
            choice = None
            if len(seen) < self.size:
                choice = self._sample_new(key, seen, self.max_collisions)
            # A space smaller than the population (or bad luck) allows repeats.
            choice = choice or self._sample(jax.random.fold_in(key, _FALLBACK))
            return choice, {"last_tournament": None, "last_parent": None}
        tournament_key, field_key, value_key = (
            jax.random.fold_in(key, stream) for stream in (_TOURNAMENT, _FIELD, _VALUE)
        )
        positions = jax.random.choice(
            tournament_key, len(population), (self.tournament,), replace=False
        ).tolist()
        tournament = [population[position] for position in sorted(positions)]
        parent = max(tournament, key=lambda index: self._rank(state["history"][index]))
        child = self.domain.mutate(state["history"][parent]["choice"], field_key, value_key)
        return child, {"last_tournament": tournament, "last_parent": parent}

    @staticmethod
    def _rank(record: dict) -> tuple:
        # max() keeps the first maximum and the tournament is ordered oldest first, so the older
        # member wins ties; a failed round ranks below every finite fitness.
        fitness = record["fitness"]
        return (fitness is not None, -math.inf if fitness is None else fitness)

    def _observed(self, state: dict, history_index: int) -> None:
        state["population"].append(history_index)
        if len(state["population"]) > self.population:
            state["population"].pop(0)  # Aging: the oldest leaves, whatever its fitness.


_STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (Fixed, Random, Evolution)}
NAMES = ("fixed", "random", "evolution", "tpe")  # tpe lives in jaxes.tpe (it imports Optuna)


def strategy_class(name: str) -> type[Strategy]:
    """The class of strategy ``name``; raises SearchError listing the valid names."""
    if name == "tpe":
        from jaxes import tpe  # here, not at the top: Optuna loads only for runs that use it

        return tpe.TPE
    if name not in _STRATEGIES:
        raise SearchError(f"Unknown search strategy {name!r}; use one of {sorted(NAMES)}.")
    return _STRATEGIES[name]


def make(name: str, space: Space, **params: Any) -> Strategy:
    """Builds a search strategy.

    Args:
      name: one of ``fixed``, ``random``, ``evolution``, ``tpe``.
      space: field -> a declaration of ``jaxes.space`` (a list of values, a range, conditional).
      **params: ``fixed``: ``arch``; ``random``: ``max_collisions``; ``evolution``: ``population``,
        ``tournament``, ``max_collisions``; ``tpe``: ``startup``, ``candidates``,
        ``multivariate``, ``max_collisions``.

    Returns:
      The strategy.

    Raises:
      SearchError: unknown name or parameter, or an invalid space or parameter value.
    """
    cls = strategy_class(name)
    allowed = list(inspect.signature(cls.__init__).parameters)[2:]  # After self and space.
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise SearchError(
            f"Unknown {name} parameter {unknown[0]!r}; {name} accepts {allowed or 'no parameters'}."
        )
    return cls(space, **params)
