"""The digits smoke run with a continuous learning-rate field, for the search tests.

Variants pick the strategy: ``search_smoke.py:tpe`` (also ``random``, ``evolution``). The MLP
bucket and the traced learning rate are those of ``configs/digits.py:smoke``, so its compiled
programs are reused.
"""

import pathlib
import runpy

_digits = runpy.run_path(str(pathlib.Path(__file__).parents[2] / "configs" / "digits.py"))


def get_config(variant: str = "tpe"):
    config = _digits["get_config"]("smoke")
    config.search.strategy = variant
    config.search.tpe.startup = 2
    config.search.population = 2
    config.search.tournament = 1
    config.search.space.learning_rate = {"low": 3e-4, "high": 3e-2, "log": True}
    return config
