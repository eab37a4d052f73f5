"""Our VAE and T5 from a diffusers-layout model folder, encoding clips and captions in batches
sharded over all local devices: `tools.prepare_data --model` and the trainer's on-the-fly
encoding of raw-clip datasets (input.encoder_model) use the same code."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cogvideox_jax import compiler, components, sharding, t5


class Encoder:
    """Our VAE and T5 from a model folder, run on batches sharded over all local devices.

    Args:
      model: a model folder (model_index.json; vae/, text_encoder/, tokenizer/), diffusers'
        or its Orbax conversion.
      text_len: tokens per caption (the transformer's max_text_seq_length).
      batch: items per call, rounded up to a multiple of the local devices.
    """

    def __init__(self, model: Path, text_len: int, batch: int):
        self.text_len = text_len
        devices = jax.local_devices()
        everything_data = {"data": -1, "fsdp": 1, "context": 1, "tensor": 1}
        mesh = sharding.make_mesh(sharding.mesh_shape(everything_data, len(devices)), devices)
        self.batch_sharding = sharding.batch_sharding(mesh, sharding.DEFAULT_RULES)
        replicated = NamedSharding(mesh, P())
        self.batch = -(-batch // len(devices)) * len(devices)  # a multiple of the devices
        self.vae = components.load_vae(model)
        self.tokenizer = t5.load_tokenizer(model / "tokenizer")
        text_encoder = components.load_text_encoder(model)
        vae_def, vae_state = nnx.split(self.vae)
        t5_def, t5_state = nnx.split(text_encoder)
        self._vae_state = jax.device_put(vae_state, replicated)
        self._t5_state = jax.device_put(t5_state, replicated)
        self._encode = compiler.jit(lambda s, x: nnx.merge(vae_def, s).encode(x))
        self._text = compiler.jit(lambda s, ids: nnx.merge(t5_def, s)(ids).astype(np.float32))
        self.text_dim = text_encoder.cfg.d_model

    def meta(self) -> dict:
        """The VAE's latent facts and the text width, as a prepared dataset records them."""
        cfg = self.vae.cfg
        return {
            "latent_channels": cfg.latent_channels,
            "scaling_factor": cfg.scaling_factor,
            "invert_scale_latents": cfg.invert_scale_latents,
            "image_latent_scale": cfg.image_latent_scale,
            "temporal_compression_ratio": cfg.temporal_compression_ratio,
            "spatial_compression": cfg.spatial_compression,
            "text_dim": self.text_dim,
        }

    def _batched(self, fn, state, items: np.ndarray) -> list:
        """fn(state, batch) over `items` (N, ...) in padded batches; outputs per item."""
        outs = []
        for start in range(0, len(items), self.batch):
            chunk = items[start : start + self.batch]
            pad = self.batch - len(chunk)  # the last batch repeats its last item
            full = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            x = jax.device_put(full, self.batch_sharding)
            y = jax.tree.map(np.asarray, fn(state, x))
            outs += [jax.tree.map(lambda a, i=i: a[i], y) for i in range(len(chunk))]
        return outs

    def latents(self, clips: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(mean, logvar) (T, h, w, C) of each (F, H, W, 3) uint8 clip (all of one shape)."""
        return self._batched(self._encode, self._vae_state, _to_unit_range(np.stack(clips)))

    def texts(self, captions: list[str]) -> list[np.ndarray]:
        """(S, Dt) float32 T5 states of each caption."""
        if not captions:
            return []
        ids = t5.tokenize(self.tokenizer, captions, self.text_len)
        return self._batched(self._text, self._t5_state, ids)


def _to_unit_range(frames: np.ndarray) -> np.ndarray:
    """uint8 frames -> float32 in [-1, 1], the VAE's input range (`data.video.to_unit_range`;
    the library does not import `data/`)."""
    return np.asarray(frames, np.float32) / 127.5 - 1.0
