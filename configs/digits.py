"""The default job: rounds of evolutionary architecture search on scikit-learn's digits.

Command (what `make run` does):
    .venv/bin/python -m jaxes.main --config=configs/digits.py --workdir=runs/digits

Variants by argument: `configs/digits.py:smoke` (a seconds-long run for tests) and
`configs/digits.py:blocks` (the same search over the block fields too: norm, residual skips,
kernel size, pooling schedule, per-block widths).

On the 2-core CPU dev machine (2026-12-02): ~2 min cold; 14 rounds (tolerance 7, budget
extended 12 -> 20, stopped by patience); best instance round 0, CNN depth 2 width 64 embedding 32:
validation accuracy 0.9805, test accuracy 0.9833, kNN top-1 of its test embeddings 0.9749. The
smoke variant: ~10-20 s, four rounds (tolerance 2, budget extended 4 -> 5), test accuracy ~0.84,
kNN computed but no neighbors.png / embedding.png (`--config.plots=True` draws them).
Every field is declared here with its default; other configs import this one and override.
"""

import ml_collections
from ml_collections import config_dict


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Seed 3 draws r = -0.326: tolerance 7 of 12 rounds, so the budget extends (claim 5). Other
    # seeds draw other tolerances; experiments/README.md lists seeds 0-5.
    config.seed = 3

    # Data: a TFDS dataset by name; "" means $JAXES_DATA_DIR or ~/.cache/jaxes/tensorflow_datasets.
    config.dataset = "digits"  # digits | mnist5k | folder | a prepared TFDS name
    config.data_dir = ""
    # An image folder (dataset "folder", see configs/folder.py) and what its images become:
    # 0 picks from the folder (the median size, longer side at most 64; gray if all are gray).
    config.data = ml_collections.ConfigDict()
    config.data.path = ""
    config.data.height = 0
    config.data.width = 0
    config.data.channels = 0  # 0 | 1 (gray) | 3 (RGB)

    # The monitored metric of a round (claim 1) and its direction.
    config.metric = "val_accuracy"  # val_accuracy | val_loss
    config.mode = "max"

    # The round budget and the randomized tolerance (claims 1, 3-5), see jaxes/stopping.py.
    config.rounds = 12
    config.tolerance = ml_collections.ConfigDict()
    # The rule that ends the rounds: "patent" (claims 1, 3-5: the fields below) or "gain"
    # (jaxes/gain.py: stops when the expected gain of the rounds left is below the metric's noise).
    config.tolerance.rule = "patent"
    config.tolerance.ratio = 0.8
    config.tolerance.r = config_dict.placeholder(float)  # None: r drawn from the seed.
    config.tolerance.patience = config_dict.placeholder(int)  # Set to fix the patience instead.
    config.tolerance.min_delta = 0.0
    config.tolerance.min_rel_delta = 0.0
    config.tolerance.ties_reset = True
    config.tolerance.warmup = 0
    config.tolerance.baseline = config_dict.placeholder(float)
    config.tolerance.target = config_dict.placeholder(float)
    config.tolerance.extend = True
    config.tolerance.max_rounds = config_dict.placeholder(int)  # None: twice `rounds`.
    # The "gain" rule reads only these, `extend` and `max_rounds` (the patent's fields above are
    # unused then). noise None: the binomial standard error of the validation accuracy.
    config.tolerance.gain = ml_collections.ConfigDict()
    config.tolerance.gain.noise = config_dict.placeholder(float)
    config.tolerance.gain.warmup = config_dict.placeholder(int)  # None: max(3, ceil(rounds / e))

    # Architecture search (claim 6): the space and the strategy.
    config.search = ml_collections.ConfigDict()
    config.search.strategy = "evolution"  # fixed | random | evolution | tpe
    config.search.population = 4
    config.search.tournament = 2
    config.search.max_collisions = 100
    # tpe (Optuna's TPESampler): random rounds before the model is used, candidates per proposal,
    # and whether the fields are modelled jointly.
    config.search.tpe = ml_collections.ConfigDict()
    config.search.tpe.startup = 5
    config.search.tpe.candidates = 24
    config.search.tpe.multivariate = True
    # The space: field -> a list of values, a range {"low": 1e-4, "high": 1e-2, "log": True}
    # (ints when both bounds are ints), and "when": {"backbone": ...} for a conditional field;
    # learning_rate and weight_decay may be searched too (jaxes/space.py, README "Search spaces").
    config.search.space = ml_collections.ConfigDict()
    config.search.space.backbone = ("mlp", "cnn")
    config.search.space.depth = (1, 2)
    config.search.space.width = (64, 128)
    config.search.space.embed_dim = (32, 64)

    # One round: training to convergence (early stop on validation loss).
    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 64
    config.train.learning_rate = 1e-3
    config.train.weight_decay = 1e-4
    config.train.max_epochs = 200
    config.train.patience = 10
    config.train.min_delta = 0.0
    config.train.dropout_rate = (0.02, 0.5)  # log-uniform range of exp(r), claim 2
    config.train.epoch_driver = "auto"  # auto | scan | unrolled | host
    config.train.device_memory_fraction = 0.5
    config.train.eval_batch_size = 512
    # Report every epoch from inside the device program (jax.debug.callback). A host callback
    # makes the persistent compilation cache miss in every new process, so it is off: the live
    # line then shows each generation's elapsed time, and every finished round.
    config.train.epoch_progress = False

    # Population rounds (docs/design.md §6b): K rounds proposed together and trained in one
    # program per size bucket, over the mesh ("rounds", "data"). K = 1 is one round at a time.
    config.parallel = ml_collections.ConfigDict()
    config.parallel.rounds = 1
    # Backbones whose block widths pad to the space's largest, sharing one program; CNN cost
    # grows with width squared, so CNNs keep their widths (every backbone pads embed_dim).
    config.parallel.pad_backbones = ("mlp",)
    # Backbones whose depth pads to the space's largest where their blocks allow (one width, no
    # normalization; a CNN where no block after the first pools, as on 8x8 digits): a block
    # beyond an instance's depth is skipped (lax.cond). Free for an MLP; a CNN's skipped block
    # adds 17-55% to a shallow CNN's epoch on CPU, so "cnn" is opt-in (README).
    config.parallel.pad_depth_backbones = ("mlp",)

    # After the run: kNN top-1 of test embeddings against train embeddings, and (with it) the
    # pictures of the feature extractor, neighbors.png and embedding.png (a few seconds of CPU).
    config.knn = True
    config.plots = True

    if variant == "smoke":
        # r = -0.542: tolerance 2 of 4 rounds; the run extends its budget to 5 and stops by
        # patience after 4 rounds, so the tests see an extension and rounds after round 2.
        config.seed = 6
        config.rounds = 4
        config.search.strategy = "random"
        config.search.space.backbone = ("mlp",)
        config.search.space.depth = (1,)
        config.search.space.width = (16, 24, 32)
        config.search.space.embed_dim = (8, 16)
        config.train.max_epochs = 6
        config.train.patience = 2
        config.plots = False  # most of a smoke run's time; the tests that look at them ask
    elif variant == "blocks":
        # The default job over the block fields of models.Arch too (README "Blocks").
        config.search.space.depth = (1, 2, 3)
        config.search.space.width = (32, 64)
        config.search.space.norm = ("none", "layer", "group")
        config.search.space.residual = (False, True)
        # CNN-only fields are conditional: an MLP has no kernel size (models.Arch resets it).
        cnn = {"backbone": "cnn"}
        config.search.space.kernel_size = {"values": (3, 5), "when": cnn}
        config.search.space.downsample = {"values": ("every", "alternate"), "when": cnn}
        config.search.space.width_growth = (1.0, 2.0)
    elif variant:
        raise ValueError(
            f"Unknown variant {variant!r} of configs/digits.py; use '', 'smoke' or 'blocks'."
        )
    return config
