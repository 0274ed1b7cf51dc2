"""Your own model in the rounds loop: an MLP-Mixer registered here and searched by ``tpe``.

This file registers a backbone (jaxes.backbones) without editing jaxes: ``build_mixer`` turns the
choice of its fields into an NNX module with ``embed`` and ``logits``. The search space offers it
next to the built-in MLP; its fields apply only when ``backbone == "mixer"``, the MLP's only to the
MLP, and the learning rate is a continuous log-scale range searched for both.

Command:
    .venv/bin/python -m jaxes.main --config=configs/own_model.py --workdir=runs/own_model
Variants: `configs/own_model.py:smoke` (seconds: the test's short run).

The best instance deploys like any other
(`.venv/bin/python -m jaxes.embed --workdir=runs/own_model ...`): the checkpoint records this
file, which those commands import again to rebuild the mixer.
"""

import pathlib
import runpy

import jax
import jax.numpy as jnp
from flax import nnx

from jaxes import backbones, models

# The default config, loaded by path: config files are not a package.
_digits = runpy.run_path(str(pathlib.Path(__file__).with_name("digits.py")))


class MixerBlock(nnx.Module):
    """MLP-Mixer's block (Tolstikhin et al. 2021): a token-mixing and a channel-mixing MLP.

    Each MLP is a feature layer, GELU and ``ExpDropout`` (claim 2), then a projection back, added
    to its input after a layer norm.
    """

    def __init__(self, tokens: int, hidden: int, log_rate: float, *, rngs: nnx.Rngs):
        self.token_norm = nnx.LayerNorm(hidden, rngs=rngs)
        self.token_in = nnx.Linear(tokens, 2 * tokens, rngs=rngs)
        self.token_drop = models.ExpDropout(log_rate)
        self.token_out = nnx.Linear(2 * tokens, tokens, rngs=rngs)
        self.channel_norm = nnx.LayerNorm(hidden, rngs=rngs)
        self.channel_in = nnx.Linear(hidden, 2 * hidden, rngs=rngs)
        self.channel_drop = models.ExpDropout(log_rate)
        self.channel_out = nnx.Linear(2 * hidden, hidden, rngs=rngs)

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        token_key, channel_key = (None, None) if key is None else jax.random.split(key)
        y = jnp.swapaxes(self.token_norm(x), 1, 2)  # (N, hidden, tokens): mix across patches
        y = self.token_out(self.token_drop(jax.nn.gelu(self.token_in(y)), token_key))
        x = x + jnp.swapaxes(y, 1, 2)
        y = self.channel_in(self.channel_norm(x))
        return x + self.channel_out(self.channel_drop(jax.nn.gelu(y), channel_key))


class Mixer(nnx.Module):
    """Patches -> linear stem -> mixer blocks -> mean over patches -> embedding -> head."""

    def __init__(self, choice: dict, inputs: backbones.Inputs, log_rate: float, rngs: nnx.Rngs):
        height, width, channels = inputs.shape
        self.patch = choice["patch"]
        if height % self.patch or width % self.patch:
            raise ValueError(
                f"mixer patch {self.patch} must divide the image size {height}x{width}; "
                "search patches that do."
            )
        tokens = (height // self.patch) * (width // self.patch)
        hidden = choice["hidden"]
        self.stem = nnx.Linear(self.patch * self.patch * channels, hidden, rngs=rngs)
        self.blocks = nnx.List(
            [MixerBlock(tokens, hidden, log_rate, rngs=rngs) for _ in range(choice["blocks"])]
        )
        self.norm = nnx.LayerNorm(hidden, rngs=rngs)
        self.embedding = nnx.Linear(hidden, choice["embed_dim"], rngs=rngs)
        self.head = nnx.Linear(choice["embed_dim"], inputs.num_classes, rngs=rngs)

    def _patches(self, images: jax.Array) -> jax.Array:
        n, height, width, channels = images.shape
        p = self.patch
        x = images.reshape(n, height // p, p, width // p, p, channels)
        return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, -1, p * p * channels)

    def embed(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """The feature vector (N, embed_dim); ``key=None`` means evaluation (no dropout)."""
        x = self.stem(self._patches(images))
        for i, block in enumerate(self.blocks):
            x = block(x, None if key is None else jax.random.fold_in(key, i))
        return self.embedding(self.norm(x).mean(axis=1))

    def logits(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
        return self.head(self.embed(images, key))


def build_mixer(choice, inputs, *, log_rate, rngs):
    """The registered build function: (choice, inputs) -> an NNX module (jaxes.backbones)."""
    return Mixer(choice, inputs, log_rate, rngs)


# Registered at import, so the config, the rounds loop and a later `jaxes.embed` all find it.
backbones.register(
    "mixer", build_mixer, fields={"patch": 2, "hidden": 32, "blocks": 1, "embed_dim": 32}
)


def get_config(variant: str = ""):
    config = _digits["get_config"]()
    config.rounds = 12
    config.search.strategy = "tpe"
    config.search.tpe.startup = 4
    mixer = {"backbone": "mixer"}
    config.search.space = {
        "backbone": ("mlp", "mixer"),
        # Both train at the searched rate (a traced argument: no recompiles).
        "learning_rate": {"low": 3e-4, "high": 3e-3, "log": True},
        # The MLP's own fields (its widths share one padded program per depth).
        "depth": {"values": (1, 2), "when": {"backbone": "mlp"}},
        "width": {"values": (64, 128), "when": {"backbone": "mlp"}},
        "embed_dim": {"values": (32, 64), "when": {"backbone": "mlp"}},
        # The mixer's own fields (the rest keep their registered defaults). A registered
        # backbone is never padded, so each shape compiles its own program: few shapes here.
        "patch": {"values": (2, 4), "when": mixer},
        "blocks": {"values": (1, 2), "when": mixer},
    }
    if variant == "smoke":
        # Seconds: one mixer shape and one (padded) MLP bucket, so two programs compile.
        config.seed = 6
        config.rounds = 4
        config.search.tpe.startup = 2
        config.search.space.embed_dim = {"values": (16,), "when": {"backbone": "mlp"}}
        config.search.space.depth = {"values": (1,), "when": {"backbone": "mlp"}}
        config.search.space.width = {"values": (16, 32), "when": {"backbone": "mlp"}}
        config.search.space.patch = {"values": (4,), "when": mixer}
        config.search.space.hidden = {"values": (8,), "when": mixer}
        config.search.space.blocks = {"values": (1,), "when": mixer}
        config.train.max_epochs = 6
        config.train.patience = 2
        config.plots = False  # as configs/digits.py:smoke
    elif variant:
        raise ValueError(f"Unknown variant {variant!r} of configs/own_model.py; use '' or 'smoke'.")
    return config
