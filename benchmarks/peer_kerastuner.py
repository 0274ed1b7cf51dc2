"""KerasTuner's side of ``search_vs_peer.py``; runs in the peer venv (requirements-peer.txt).

    .venv-peer/bin/python benchmarks/peer_kerastuner.py SPLIT.npz OUT.json [--trials=10 --seed=0]

A ``RandomSearch`` over the same space as jaxes' side: backbone mlp/cnn, depth 1-3, width
64/128/256, embedding 32/64, each block Dense or 3x3 Conv -> GELU -> Dropout (rate log-uniform in
[0.02, 0.5], as jaxes draws it), average-pooled while the image is at least 8 pixels, then the
embedding and a softmax head; AdamW (lr 1e-3, weight decay 1e-4), batch 32, at most 100 epochs,
``EarlyStopping(val_loss, patience=5, restore_best_weights=True)``; objective val_accuracy. The
data is jaxes' own digits split, passed in as uint8 arrays and scaled to [0, 1] as jaxes does.
Writes the wall time, per-trial times and the best model's validation and test accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras
import keras_tuner
import numpy as np


def build(hp) -> keras.Model:
    backbone = hp.Choice("backbone", ["mlp", "cnn"])
    depth = hp.Int("depth", 1, 3)
    width = hp.Choice("width", [64, 128, 256])
    embed = hp.Choice("embed_dim", [32, 64])
    rate = hp.Float("dropout", 0.02, 0.5, sampling="log")
    inputs = keras.Input((8, 8, 1))
    x = inputs
    if backbone == "mlp":
        x = keras.layers.Flatten()(x)
        for _ in range(depth):
            x = keras.layers.Dropout(rate)(keras.layers.Dense(width, activation="gelu")(x))
    else:
        size = 8
        for _ in range(depth):
            x = keras.layers.Conv2D(width, 3, padding="same", activation="gelu")(x)
            x = keras.layers.Dropout(rate)(x)
            if size >= 8:
                x, size = keras.layers.AveragePooling2D(2)(x), size // 2
        x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(embed)(x)
    outputs = keras.layers.Dense(10)(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-3, weight_decay=1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("split")
    parser.add_argument("out")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    arrays = np.load(args.split)
    x = {k: arrays[f"{k}_images"].astype("float32") / 255.0 for k in ("train", "val", "test")}
    y = {k: arrays[f"{k}_labels"] for k in ("train", "val", "test")}
    keras.utils.set_random_seed(args.seed)
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as directory:
        tuner = keras_tuner.RandomSearch(
            build, objective="val_accuracy", max_trials=args.trials, seed=args.seed,
            directory=directory, project_name="peer", overwrite=True,
        )  # fmt: skip
        tuner.search(
            x["train"], y["train"], validation_data=(x["val"], y["val"]), batch_size=32,
            epochs=100, verbose=0,
            callbacks=[keras.callbacks.EarlyStopping("val_loss", patience=5,
                                                     restore_best_weights=True)],
        )  # fmt: skip
        wall = time.monotonic() - start
        best = tuner.get_best_models(1)[0]
        trial = tuner.oracle.get_best_trials(1)[0]
        test = best.evaluate(x["test"], y["test"], verbose=0, return_dict=True)
        trials = len(tuner.oracle.trials)
    result = {
        "tool": f"KerasTuner {keras_tuner.__version__} (Keras {keras.__version__}, jax backend)",
        "wall_seconds": wall,
        "trials": trials,
        "best_val_accuracy": float(trial.score),
        "best_test_accuracy": float(test["accuracy"]),
        "best_hp": trial.hyperparameters.values,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
