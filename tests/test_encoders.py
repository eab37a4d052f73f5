"""Tests for cogvideox_jax/encoders.py: the batched VAE + T5 encoder that `tools.prepare_data
--model` and the trainer's raw-clip inputs use, against diffusers' VAE and transformers' T5 loaded
from the same model folder."""

import numpy as np
import reference as ref
import torch
import transformers
from diffusers import AutoencoderKLCogVideoX

from cogvideox_jax import encoders, t5

TEXT_LEN = 12


def test_latents_and_texts_equal_the_reference_models_per_item(tmp_path):
    ref.tiny_model_folder(tmp_path, text_len=TEXT_LEN, scaling_factor=0.7)
    # 3 items in batches of 8 (2 rounded up to the 8 devices): one padded batch.
    enc = encoders.Encoder(tmp_path, TEXT_LEN, batch=2)
    assert enc.batch == 8
    assert enc.meta()["scaling_factor"] == 0.7 and enc.meta()["text_dim"] == 16

    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 256, (5, 16, 24, 3), np.uint8) for _ in range(3)]
    vae = AutoencoderKLCogVideoX.from_pretrained(tmp_path / "vae").eval()
    for clip, (mean, logvar) in zip(clips, enc.latents(clips), strict=True):
        x = torch.from_numpy(np.moveaxis(clip.astype(np.float32) / 127.5 - 1, -1, 0)[None])
        with torch.no_grad():
            post = vae.encode(x).latent_dist
        assert mean.shape == (2, 2, 3, 16)  # 5 frames -> 2 latents, 8x spatial
        for ours, theirs in ((mean, post.mean), (logvar, post.logvar)):
            theirs = np.moveaxis(theirs[0].numpy(), 0, -1)
            assert ref.rel_l2(ours, theirs) <= 1e-4, ref.rel_l2(ours, theirs)

    captions = ["a red square", "two blue circles moving left", "a"]
    text_encoder = transformers.T5EncoderModel.from_pretrained(tmp_path / "text_encoder").eval()
    ids = t5.tokenize(enc.tokenizer, captions, TEXT_LEN)
    with torch.no_grad():
        want = text_encoder(torch.from_numpy(np.asarray(ids))).last_hidden_state.numpy()
    got = enc.texts(captions)
    assert [g.shape for g in got] == [(TEXT_LEN, 16)] * 3
    for g, w in zip(got, want, strict=True):
        assert ref.rel_l2(g, w) <= 1e-5, ref.rel_l2(g, w)
    assert enc.texts([]) == []
