"""CIFAR-10 (32x32x3, 10 classes): evolution over CNN backbones.

Prepare the data once (needs `.venv/bin/pip install -e '.[prepare]'` and the network):
    .venv/bin/python -m jaxes.data prepare cifar10 --data_dir=$HOME/.cache/jaxes/tensorflow_datasets
Command (a GPU or TPU is advised: `.venv/bin/pip install -e '.[cuda12]'`):
    .venv/bin/python -m jaxes.main --config=configs/cifar10.py --workdir=runs/cifar10

Time and result: not measured on the dev machine, which cannot download CIFAR-10. Without the
prepared data the run exits 2 with the command above.
"""

import pathlib
import runpy

# The default config, loaded by path: config files are not a package.
_digits = runpy.run_path(str(pathlib.Path(__file__).with_name("digits.py")))


def get_config(variant: str = ""):
    if variant:
        raise ValueError(f"configs/cifar10.py has no variant {variant!r}; use it without one.")
    config = _digits["get_config"]()
    config.dataset = "cifar10"
    config.rounds = 20
    config.search.population = 8
    config.search.tournament = 3
    config.search.space.backbone = ("cnn",)
    config.search.space.depth = (2, 3, 4)
    config.search.space.width = (64, 128, 256)
    config.search.space.embed_dim = (128, 256)
    config.train.batch_size = 256
    config.train.learning_rate = 5e-4
    config.train.max_epochs = 60
    config.train.patience = 5
    config.train.eval_batch_size = 1000
    return config
