"""MNIST (28x28x1, 10 classes): evolution over MLP and CNN backbones.

Prepare the data once (needs `.venv/bin/pip install -e '.[prepare]'` and the network):
    .venv/bin/python -m jaxes.data prepare mnist --data_dir=$HOME/.cache/jaxes/tensorflow_datasets
Command:
    .venv/bin/python -m jaxes.main --config=configs/mnist.py --workdir=runs/mnist

Time and result: not measured on the dev machine, which cannot download MNIST. Without the
prepared data the run exits 2 with the command above. Validation is the last 10% of a fixed
permutation of the train split (see jaxes/data.py).
"""

import pathlib
import runpy

# The default config, loaded by path: config files are not a package.
_digits = runpy.run_path(str(pathlib.Path(__file__).with_name("digits.py")))


def get_config(variant: str = ""):
    config = _digits["get_config"]()
    config.dataset = "mnist"
    config.rounds = 16
    config.search.population = 6
    config.search.tournament = 3
    config.search.space.backbone = ("mlp", "cnn")
    config.search.space.depth = (1, 2, 3)
    config.search.space.width = (64, 128, 256)
    config.search.space.embed_dim = (64, 128)
    config.train.batch_size = 128
    config.train.max_epochs = 30
    config.train.patience = 3
    config.train.eval_batch_size = 1024
    if variant == "smoke":  # seconds: the tests run it on a locally built "mnist" in TFDS format
        smoke = _digits["get_config"]("smoke")
        config.seed, config.rounds, config.search = smoke.seed, smoke.rounds, smoke.search
        config.plots = smoke.plots  # no pictures: configs/folder.py:smoke draws them
        config.train.batch_size, config.train.max_epochs, config.train.patience = 32, 3, 2
    elif variant:
        raise ValueError(f"Unknown variant {variant!r} of configs/mnist.py; use '' or 'smoke'.")
    return config
