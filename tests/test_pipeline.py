"""Sampling end to end against diffusers' CogVideoXPipeline and CogVideoXImageToVideoPipeline."""

import dataclasses
import json

import numpy as np
import pytest
import reference as ref
import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXImageToVideoPipeline,
    CogVideoXPipeline,
    CogVideoXVideoToVideoPipeline,
    DDIMInverseScheduler,
)
from diffusers.pipelines.cogvideo import pipeline_cogvideox_image2video
from flax import nnx

import cogvideox_jax as cj
from cogvideox_jax import components, pipeline, vae

SIZES = {
    "5b": (48, 64, 9),
    "2b": (48, 64, 9),
    "1.5-5b": (48, 64, 9),
    "5b-i2v": (48, 64, 9),
    "1.5-5b-i2v": (32, 48, 5),
}
SCHED = ref.SCHEDULER_CONFIG


def _components(variant, tmp_path, shift=3.0, **overrides):
    """Tiny random diffusers components saved as a model folder, and loaded back by ours."""
    transformer = ref.diffusers_transformer(variant, **overrides)
    cfg = vae.vae_config(
        "tiny", latent_channels=4, invert_scale_latents="1.5" in variant, scaling_factor=0.7
    )
    torch.manual_seed(1)
    autoencoder = AutoencoderKLCogVideoX(**cfg.to_diffusers()).eval()
    ref.perturb_(autoencoder, 1, scale=0.05)
    folder = tmp_path / "model"
    transformer.save_pretrained(folder / "transformer")
    autoencoder.save_pretrained(folder / "vae")
    scheduler = CogVideoXDDIMScheduler(**SCHED, snr_shift_scale=shift)
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXPipeline"}))
    return transformer, autoencoder, scheduler, pipeline.Pipeline.from_pretrained(folder)


def _inputs(ours, batch=2, seed=0):
    cfg = ours.transformer.cfg
    h, w, f = SIZES[_variant_of(cfg)]
    rng = np.random.default_rng(seed)
    frames = (f - 1) // 4 + 1
    frames += (-frames) % (cfg.patch_size_t or 1)
    noise = rng.standard_normal((batch, frames, h // 8, w // 8, 4)).astype(np.float32)
    text = rng.standard_normal((batch, cfg.max_text_len, cfg.text_embed_dim)).astype(np.float32)
    neg = rng.standard_normal(text.shape).astype(np.float32)
    return (h, w, f), noise, text, neg


def _variant_of(cfg):
    """The tiny variant `cfg` was built from (any head count)."""
    for name, kw in ref.TINY_TRANSFORMERS.items():
        tiny = cj.TransformerConfig.from_diffusers(kw)
        if dataclasses.replace(tiny, num_heads=cfg.num_heads) == cfg:
            return name
    raise KeyError(cfg)


def _t(x):
    return torch.from_numpy(np.asarray(x))


@pytest.mark.parametrize(
    "variant,dynamic,steps",
    [
        ("5b", False, 4),
        *(
            pytest.param(*c, marks=pytest.mark.slow)
            for c in [("5b", True, 5), ("2b", True, 4), ("1.5-5b", False, 3)]
        ),
    ],
)
def test_text_to_video_matches_diffusers(tmp_path, variant, dynamic, steps):
    transformer, autoencoder, scheduler, ours = _components(variant, tmp_path)
    (h, w, f), noise, text, neg = _inputs(ours)
    theirs = CogVideoXPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=autoencoder,
        transformer=transformer,
        scheduler=scheduler,
    )
    kw = dict(
        height=h,
        width=w,
        num_frames=f,
        num_inference_steps=steps,
        guidance_scale=4.0,
        use_dynamic_cfg=dynamic,
    )
    for output_type in ("latent", "np"):
        want = theirs(
            prompt_embeds=_t(text),
            negative_prompt_embeds=_t(neg),
            latents=_t(noise).permute(0, 1, 4, 2, 3),
            output_type=output_type,
            **kw,
        ).frames
        got = ours(
            prompt_embeds=text,
            negative_prompt_embeds=neg,
            latents=noise,
            output_type=output_type,
            **kw,
        )
        want = want.permute(0, 1, 3, 4, 2).numpy() if output_type == "latent" else np.asarray(want)
        assert got.shape == want.shape, (got.shape, want.shape)
        assert ref.rel_l2(got, want) <= 1e-4, (output_type, ref.rel_l2(got, want))


@pytest.mark.slow
def test_multistep_dpm_scheduler_folder_matches_diffusers(tmp_path):
    """A model folder whose scheduler is DPMSolverMultistepScheduler (heun, v-prediction on
    CogVideoX's zero-SNR betas): the pipeline samples with it by default, as diffusers' does."""
    from diffusers import DPMSolverMultistepScheduler

    transformer, autoencoder, _, _ = _components("5b", tmp_path)
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    kw |= dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, solver_type="heun")
    scheduler = DPMSolverMultistepScheduler(timestep_spacing="trailing", **kw)
    scheduler.save_pretrained(tmp_path / "model" / "scheduler")
    ours = pipeline.Pipeline.from_pretrained(tmp_path / "model")
    assert ours.default_sampler == "dpm"
    (h, w, f), noise, text, neg = _inputs(ours)
    theirs = CogVideoXPipeline(
        tokenizer=None, text_encoder=None, vae=autoencoder, transformer=transformer,
        scheduler=scheduler,
    )  # fmt: skip
    kw = dict(height=h, width=w, num_frames=f, num_inference_steps=5, guidance_scale=4.0)
    want = theirs(
        prompt_embeds=_t(text), negative_prompt_embeds=_t(neg),
        latents=_t(noise).permute(0, 1, 4, 2, 3), output_type="latent", **kw,
    ).frames.permute(0, 1, 3, 4, 2).numpy()  # fmt: skip
    got = ours(
        prompt_embeds=text, negative_prompt_embeds=neg, latents=noise, output_type="latent", **kw
    )
    assert ref.rel_l2(got, want) <= 1e-4, ref.rel_l2(got, want)


@pytest.mark.parametrize("variant", ["5b-i2v", pytest.param("1.5-5b-i2v", marks=pytest.mark.slow)])
def test_image_to_video_matches_diffusers(tmp_path, variant, monkeypatch):
    transformer, autoencoder, scheduler, ours = _components(variant, tmp_path, shift=1.0)
    (h, w, f), noise, text, neg = _inputs(ours)
    rng = np.random.default_rng(5)
    z = rng.standard_normal((2, 1, h // 8, w // 8, 4)).astype(np.float32)  # the posterior sample
    images = rng.integers(0, 256, (2, h, w, 3), np.uint8)
    # Inject the same image latents into diffusers (instead of its own torch-RNG posterior draw).
    draws = iter(_t(z).permute(0, 4, 1, 2, 3))
    monkeypatch.setattr(
        pipeline_cogvideox_image2video, "retrieve_latents", lambda *a, **k: next(draws)[None]
    )
    theirs = CogVideoXImageToVideoPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=autoencoder,
        transformer=transformer,
        scheduler=scheduler,
    )
    from PIL import Image

    kw = dict(
        height=h,
        width=w,
        num_frames=f,
        num_inference_steps=4,
        guidance_scale=5.0,
        use_dynamic_cfg=True,
    )
    want = theirs(
        image=[Image.fromarray(i) for i in images],
        prompt_embeds=_t(text),
        negative_prompt_embeds=_t(neg),
        latents=_t(noise).permute(0, 1, 4, 2, 3),
        output_type="latent",
        **kw,
    ).frames
    got = ours(
        image=images,
        prompt_embeds=text,
        negative_prompt_embeds=neg,
        latents=noise,
        image_latents=z,
        output_type="latent",
        **kw,
    )
    want = want.permute(0, 1, 3, 4, 2).numpy()
    assert ref.rel_l2(got, want) <= 1e-4, ref.rel_l2(got, want)


@pytest.mark.slow
def test_dpm_sampler_runs_and_is_seeded(tmp_path):
    *_, ours = _components("5b", tmp_path)
    (h, w, f), _, text, neg = _inputs(ours)
    kw = dict(
        prompt_embeds=text,
        negative_prompt_embeds=neg,
        height=h,
        width=w,
        num_frames=f,
        num_inference_steps=3,
        scheduler="dpm",
        output_type="latent",
    )
    a, b, c = ours(seed=1, **kw), ours(seed=1, **kw), ours(seed=2, **kw)
    assert np.isfinite(a).all() and np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("variant,num_frames", [("5b", 8)])
def test_frame_counts_other_than_4k_plus_1_match_diffusers(tmp_path, variant, num_frames):
    """num_frames=8: 2 latent frames, decoded to 8 frames, as diffusers' text-to-video pipeline
    gives them (1.5's padding of an odd latent count: test_text_to_video_matches_diffusers)."""
    transformer, autoencoder, scheduler, ours = _components(variant, tmp_path)
    (h, w, _), _, text, neg = _inputs(ours)
    cfg = ours.transformer.cfg
    frames = (num_frames - 1) // 4 + 1
    frames += (-frames) % (cfg.patch_size_t or 1)
    noise = np.random.default_rng(3).standard_normal((2, frames, h // 8, w // 8, 4))
    noise = noise.astype(np.float32)
    theirs = CogVideoXPipeline(
        tokenizer=None, text_encoder=None, vae=autoencoder, transformer=transformer,
        scheduler=scheduler,
    )  # fmt: skip
    kw = dict(height=h, width=w, num_frames=num_frames, num_inference_steps=2, guidance_scale=4.0)
    want = theirs(
        prompt_embeds=_t(text),
        negative_prompt_embeds=_t(neg),
        latents=_t(noise).permute(0, 1, 4, 2, 3),
        output_type="np",
        **kw,
    ).frames
    got = ours(prompt_embeds=text, negative_prompt_embeds=neg, latents=noise, **kw)
    assert got.shape == np.asarray(want).shape == (2, 8 if num_frames == 8 else 9, h, w, 3)
    assert ref.rel_l2(got, np.asarray(want)) <= 1e-4


def test_video_to_video_matches_diffusers(tmp_path):
    """diffusers' CogVideoXVideoToVideoPipeline from already-noised latents: strength 0.6 of 5
    steps runs the last 3, with the truncated schedule's dynamic guidance."""
    transformer, autoencoder, scheduler, ours = _components("5b", tmp_path)
    (h, w, _), noisy, text, neg = _inputs(ours)
    theirs = CogVideoXVideoToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=autoencoder, transformer=transformer,
        scheduler=scheduler,
    )  # fmt: skip
    kw = dict(height=h, width=w, num_inference_steps=5, strength=0.6, guidance_scale=4.0)
    kw["use_dynamic_cfg"] = True
    for output_type in ("latent", "np"):
        want = theirs(
            prompt_embeds=_t(text),
            negative_prompt_embeds=_t(neg),
            latents=_t(noisy).permute(0, 1, 4, 2, 3),
            output_type=output_type,
            **kw,
        ).frames
        want = want.permute(0, 1, 3, 4, 2).numpy() if output_type == "latent" else np.asarray(want)
        got = ours(
            prompt_embeds=text, negative_prompt_embeds=neg, latents=noisy, output_type=output_type,
            **kw,
        )  # fmt: skip
        assert got.shape == want.shape, (got.shape, want.shape)
        assert ref.rel_l2(got, want) <= 1e-4, (output_type, ref.rel_l2(got, want))


def test_video_to_video_from_frames(tmp_path):
    """A video in: its frames set num_frames. At strength 1 sampling starts at t = 999, where
    CogVideoX's zero-terminal-SNR schedule keeps nothing of the video (alpha_bar = 0): two videos
    give the same output. At strength 0.5 the video's latents are in the start: they differ."""
    *_, ours = _components("5b", tmp_path)
    (h, w, f), _, text, _ = _inputs(ours, batch=1)
    yy, xx = np.mgrid[0:h, 0:w]
    frames = np.stack([(np.stack([xx + 3 * i, yy, xx + yy], -1) * 2) % 256 for i in range(f)])
    videos = [frames.astype(np.uint8), (255 - frames).astype(np.uint8)]  # (F, H, W, 3) each
    kw = dict(prompt_embeds=text, num_inference_steps=4, guidance_scale=1.0, seed=4)
    full = [ours(video=v, strength=1.0, **kw) for v in videos]
    half = [ours(video=v, strength=0.5, **kw) for v in videos]
    assert full[0].shape == half[0].shape == (1, f, h, w, 3)
    np.testing.assert_allclose(full[0], full[1], atol=1e-6)
    assert np.abs(half[0] - half[1]).mean() > 0.01
    np.testing.assert_array_equal(ours(video=videos[0], strength=0.5, **kw), half[0])  # seeded
    assert ours(video=videos[0][:8], strength=0.5, **kw).shape == (1, 8, h, w, 3)  # 2 latents
    latents = np.zeros((1, 3, h // 8, w // 8, 4), np.float32)
    for bad, rule in (
        (dict(video=videos[0], strength=1.5), "strength must be in"),
        (dict(video=videos[0], latents=latents, strength=0.5), "not both"),
    ):
        with pytest.raises(ValueError, match=rule):
            ours(**bad, **kw)


class _ReferenceAttention:
    """The reference attention of diffusers' community CogVideoX DDIM-inversion script, written
    for this test on diffusers' Attention module: rows [sampled; reference]; a sampled row's
    queries attend to its own keys and values joined (along the sequence) with its reference
    row's, RoPE on the video tokens of both; reference rows attend to themselves."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None,
                 image_rotary_emb=None):  # fmt: skip
        from diffusers.models.embeddings import apply_rotary_emb

        s = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        b, n = x.shape[0], attn.heads
        q, k, v = (
            p(x).view(b, x.shape[1], n, -1).transpose(1, 2)
            for p in (attn.to_q, attn.to_k, attn.to_v)
        )
        q, k = attn.norm_q(q), attn.norm_k(k)
        q = torch.cat([q[:, :, :s], apply_rotary_emb(q[:, :, s:], image_rotary_emb)], dim=2)
        k = torch.cat([k[:, :, :s], apply_rotary_emb(k[:, :, s:], image_rotary_emb)], dim=2)
        half = b // 2
        sdpa = torch.nn.functional.scaled_dot_product_attention
        sampled = sdpa(
            q[:half], torch.cat([k[:half], k[half:]], 2), torch.cat([v[:half], v[half:]], 2)
        )
        o = torch.cat([sampled, sdpa(q[half:], k[half:], v[half:])])
        o = attn.to_out[1](attn.to_out[0](o.transpose(1, 2).reshape(b, x.shape[1], -1)))
        return o[:, s:], o[:, :s]


def test_ddim_inversion_and_reference_reconstruction_match_diffusers(tmp_path):
    """`invert` against DDIMInverseScheduler(**scheduler.config) stepping diffusers' transformer
    (the community script's inversion loop), then the reconstruction with reference attention
    and guidance against the same loop with the reference processor above (5B-style, SNR shift
    1.0 as the released 5B)."""
    transformer, autoencoder, scheduler, ours = _components("5b", tmp_path, shift=1.0)
    (h, w, f), noise, text, neg = _inputs(ours)
    z = np.random.default_rng(9).standard_normal(noise.shape).astype(np.float32)
    steps, scale = 4, 4.0
    theirs = CogVideoXPipeline(
        tokenizer=None, text_encoder=None, vae=autoencoder, transformer=transformer,
        scheduler=scheduler,
    )  # fmt: skip
    rope = theirs._prepare_rotary_positional_embeddings(h, w, noise.shape[1], "cpu")
    inverse = DDIMInverseScheduler(**scheduler.config)
    inverse.set_timesteps(steps)
    x, want_path = _t(z).permute(0, 1, 4, 2, 3), []
    with torch.no_grad():
        for t in inverse.timesteps:
            out = transformer(
                hidden_states=x, encoder_hidden_states=_t(text), timestep=t.expand(len(x)),
                image_rotary_emb=rope, return_dict=False,
            )[0]  # fmt: skip
            x = inverse.step(out, t, x, return_dict=False)[0]
            want_path.append(x)
    path = ours.invert(latents=z, prompt_embeds=text, num_inference_steps=steps)
    assert path.shape == (steps, *z.shape)
    want = torch.stack(want_path).permute(0, 1, 2, 4, 5, 3).numpy()
    assert ref.rel_l2(path, want) <= 1e-5, ref.rel_l2(path, want)

    scheduler.set_timesteps(steps)
    transformer.set_attn_processor(_ReferenceAttention())
    x = _t(noise).permute(0, 1, 4, 2, 3)
    embeds = torch.cat([_t(neg), _t(text)] * 2)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            r = want_path[steps - 1 - i]
            inp = torch.cat([x, x, r, r])
            out = transformer(
                hidden_states=inp, encoder_hidden_states=embeds, timestep=t.expand(len(inp)),
                image_rotary_emb=rope, return_dict=False,
            )[0][: 2 * len(x)]  # fmt: skip
            uncond, cond = out.chunk(2)
            x = scheduler.step(uncond + scale * (cond - uncond), t, x, return_dict=False)[0]
    want = x.permute(0, 1, 3, 4, 2).numpy()
    kw = dict(prompt_embeds=text, negative_prompt_embeds=neg, latents=noise, height=h, width=w)
    kw |= dict(num_frames=f, num_inference_steps=steps, guidance_scale=scale)
    got = ours(reference_latents=path, output_type="latent", **kw)
    assert ref.rel_l2(got, want) <= 1e-5, ref.rel_l2(got, want)
    plain = ours(output_type="latent", **kw)
    assert ref.rel_l2(plain, want) > 1e-2  # the reference reaches the output
    for bad, rule in (
        (dict(reference_latents=path[:2]), r"reference_latents must be the trajectory"),
        (dict(reference_latents=path, scheduler="dpm"), "scheduler='ddim'"),
    ):
        with pytest.raises(ValueError, match=rule):
            ours(**(kw | bad))


MESHES = {  # 8 CPU devices; context-parallel mode
    "fsdp8": ({"data": 1, "fsdp": 8, "context": 1, "tensor": 1}, "allgather"),
    "data2_fsdp4": ({"data": 2, "fsdp": 4, "context": 1, "tensor": 1}, "allgather"),
    "fsdp2_context4": ({"data": 1, "fsdp": 2, "context": 4, "tensor": 1}, "allgather"),
    "fsdp2_context4_ulysses": ({"data": 1, "fsdp": 2, "context": 4, "tensor": 1}, "ulysses"),
    "data2_context2_tensor2": ({"data": 2, "fsdp": 1, "context": 2, "tensor": 2}, "allgather"),
}


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """A tiny 5B-style model folder (4 heads: Ulysses over 4), its inputs, and what one device
    samples from them (latents and frames)."""
    tmp_path = tmp_path_factory.mktemp("mesh")
    *_, ours = _components("5b", tmp_path, num_attention_heads=4)
    (h, w, f), noise, text, neg = _inputs(ours, batch=1)
    kw = dict(prompt_embeds=text, negative_prompt_embeds=neg, latents=noise, height=h, width=w)
    kw |= dict(num_frames=f, num_inference_steps=3, guidance_scale=4.0)
    want = {t: ours(output_type=t, **kw) for t in ("latent", "np")}
    return tmp_path / "model", kw, want


def _inversion_args(kw):
    """Inversion with guidance (2 rows: they divide over `data`)."""
    keep = ("latents", "prompt_embeds", "negative_prompt_embeds", "num_inference_steps")
    return {k: kw[k] for k in keep} | {"guidance_scale": 2.0}


@pytest.fixture(scope="module")
def inverted(one_device):
    """One device's DDIM inversion of the one_device noise (as a clip's latents) and the
    reconstruction from it."""
    folder, kw, _ = one_device
    ours = pipeline.Pipeline.from_pretrained(folder)
    path = ours.invert(**_inversion_args(kw))
    return path, ours(reference_latents=path, output_type="latent", **kw)


@pytest.mark.parametrize(
    "layout",
    [
        "data2_context2_tensor2",
        *(pytest.param(k, marks=pytest.mark.slow) for k in MESHES if k != "data2_context2_tensor2"),
    ],
)
def test_sampling_on_a_mesh_equals_one_device(one_device, layout):
    """8 devices in each layout: the transformer's and T5's weights sharded as in training, the
    guidance rows over `data`, each row's tokens over `context` (all-gather or Ulysses): the
    same latents and frames as one device."""
    import jax

    from cogvideox_jax import sharding

    folder, kw, want = one_device
    shape, cp = MESHES[layout]
    mesh = sharding.make_mesh(shape, jax.devices())
    on_mesh = pipeline.Pipeline.from_pretrained(folder, mesh=mesh, context_parallel=cp)
    matrices = [x for x in jax.tree.leaves(nnx.state(on_mesh.transformer)) if x.ndim >= 2]
    assert all(len(x.sharding.device_set) == 8 for x in matrices)
    assert any(not x.sharding.is_fully_replicated for x in matrices)
    for output_type in ("latent", "np"):
        got = on_mesh(output_type=output_type, **kw)
        rel = ref.rel_l2(got, want[output_type])
        assert rel <= 1e-5, (output_type, rel)
    if shape["data"] > 1:
        with pytest.raises(ValueError, match=r"1 rows \(batch 1\) do not divide over the 2"):
            on_mesh(**(kw | {"guidance_scale": 1.0}))
    if shape["context"] > 1:  # the VAE's latent frames over `context` (3 latents: one chunk)
        on_mesh.vae_decode = "context_parallel"
        got = on_mesh(output_type="np", **kw)
        assert ref.rel_l2(got, want["np"]) <= 1e-5, ref.rel_l2(got, want["np"])
    else:
        on_mesh.vae_decode = "context_parallel"
        with pytest.raises(ValueError, match="needs a mesh with a context axis"):
            on_mesh(output_type="np", **kw)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["data2_context2_tensor2"])
def test_inversion_on_a_mesh_equals_one_device(one_device, inverted, layout):
    """DDIM inversion and the reference-attention reconstruction (sampled and reference rows'
    keys joined across the context shards, with the padding context parallelism adds) on 8
    devices equal one device."""
    import jax

    from cogvideox_jax import sharding

    folder, kw, _ = one_device
    shape, cp = MESHES[layout]
    mesh = sharding.make_mesh(shape, jax.devices())
    on_mesh = pipeline.Pipeline.from_pretrained(folder, mesh=mesh, context_parallel=cp)
    path = on_mesh.invert(**_inversion_args(kw))
    assert ref.rel_l2(path, inverted[0]) <= 1e-5
    got = on_mesh(reference_latents=path, output_type="latent", **kw)
    assert ref.rel_l2(got, inverted[1]) <= 1e-5, ref.rel_l2(got, inverted[1])


def test_bad_arguments(tmp_path):
    *_, ours = _components("5b", tmp_path)
    (h, w, f), _, text, _ = _inputs(ours)
    with pytest.raises(ValueError, match="num_frames must be at least 1"):
        ours(prompt_embeds=text, height=h, width=w, num_frames=-3, guidance_scale=1.0)
    with pytest.raises(ValueError, match="multiples of 16"):
        ours(prompt_embeds=text, height=40, width=w, num_frames=f, guidance_scale=1.0)
    with pytest.raises(ValueError, match="scheduler must be one of"):
        ours(prompt_embeds=text, height=h, width=w, num_frames=f, scheduler="euler")
    with pytest.raises(ValueError, match="no text encoder"):
        ours(prompt="a cat", height=h, width=w, num_frames=f)
    # Without `scheduler` the folder's class decides, as in diffusers; a sampler the schedule
    # cannot take is refused before the prompts are encoded.
    from cogvideox_jax import diffusion

    assert ours.default_sampler == "ddim"
    for name, sampler in [("CogVideoXDPMScheduler", "dpm"), ("DPMSolverMultistepScheduler", "dpm")]:
        ours.schedule = diffusion.ScheduleConfig.from_diffusers({"_class_name": name})
        assert ours.default_sampler == sampler
    with pytest.raises(ValueError, match="class_name"):
        ours(prompt="a cat", height=h, width=w, num_frames=f, scheduler="ddim")


def test_image_preprocessing_equals_diffusers():
    from diffusers.video_processor import VideoProcessor
    from PIL import Image

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 37, 53, 3), np.uint8)
    want = VideoProcessor(vae_scale_factor=8).preprocess(
        [Image.fromarray(i) for i in images], 48, 64
    )
    got = pipeline.preprocess_image(images, 48, 64, batch=2)
    np.testing.assert_allclose(got[:, 0], want.permute(0, 2, 3, 1).numpy(), atol=1e-6)


@pytest.mark.slow
def test_image_to_video_encodes_the_image(tmp_path):
    *_, ours = _components("5b-i2v", tmp_path)
    (h, w, f), noise, text, _ = _inputs(ours, batch=1)
    rng = np.random.default_rng(0)
    kw = dict(
        prompt_embeds=text,
        height=h,
        width=w,
        num_frames=f,
        num_inference_steps=2,
        guidance_scale=1.0,
        latents=noise,
    )
    a = ours(image=rng.integers(0, 256, (h, w, 3), np.uint8), **kw)
    b = ours(image=rng.integers(0, 256, (h, w, 3), np.uint8), **kw)
    assert a.shape == (1, f, h, w, 3) and 0 <= a.min() and a.max() <= 1
    assert not np.allclose(a, b)  # the condition reaches the output


def _full_model(tmp_path):
    """A complete model folder: tiny T5 text encoder and tokenizer included."""
    import transformers

    from cogvideox_jax import t5

    transformer, autoencoder, scheduler, _ = _components("5b", tmp_path)
    ref.build_tokenizer(tmp_path / "model" / "tokenizer")
    cfg = t5.T5Config(vocab_size=200, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4)
    torch.manual_seed(2)
    encoder = transformers.T5EncoderModel(transformers.T5Config(**cfg.to_transformers())).eval()
    ref.perturb_(encoder, 2, scale=0.1)
    encoder.save_pretrained(tmp_path / "model" / "text_encoder")
    tokenizer = transformers.T5Tokenizer.from_pretrained(tmp_path / "model" / "tokenizer")
    theirs = CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=encoder,
        vae=autoencoder,
        transformer=transformer,
        scheduler=scheduler,
    )
    return theirs, pipeline.Pipeline.from_pretrained(tmp_path / "model")


@pytest.mark.slow
@pytest.mark.optimized  # compiled as users run (conftest)
def test_prompt_to_video_matches_diffusers(tmp_path):
    theirs, ours = _full_model(tmp_path)
    (h, w, f), noise, _, _ = _inputs(ours)
    kw = dict(
        height=h,
        width=w,
        num_frames=f,
        num_inference_steps=3,
        guidance_scale=6.0,
        max_sequence_length=ours.transformer.cfg.max_text_len,
    )
    prompts = ref.PROMPTS[:2]
    want = (
        theirs(prompt=prompts, latents=_t(noise).permute(0, 1, 4, 2, 3), output_type="latent", **kw)
        .frames.permute(0, 1, 3, 4, 2)
        .numpy()
    )
    kw.pop("max_sequence_length")
    got = ours(prompts, latents=noise, output_type="latent", **kw)
    assert ref.rel_l2(got, want) <= 1e-4, ref.rel_l2(got, want)
    # The Orbax conversion of the same folder samples the same video.
    components.convert("diffusers-to-orbax", tmp_path / "model", tmp_path / "orbax")
    again = pipeline.Pipeline.from_pretrained(tmp_path / "orbax")
    np.testing.assert_array_equal(again(prompts, latents=noise, output_type="latent", **kw), got)


@pytest.mark.slow  # the fast subset runs tools.sample through test_export.py
def test_sample_cli_writes_an_mp4(tmp_path):
    from data.video import read_mp4
    from tools import sample

    _full_model(tmp_path)
    out = tmp_path / "video.mp4"
    argv = [
        "--model",
        str(tmp_path / "model"),
        "--prompt",
        "a panda plays a guitar",
        "--out",
        str(out),
        "--height",
        "48",
        "--width",
        "64",
        "--num-frames",
        "9",
        "--steps",
        "2",
        "--scheduler",
        "dpm",
    ]
    assert sample.main(argv) == 0
    frames, fps = read_mp4(out)
    assert frames.shape == (9, 48, 64, 3) and fps == 8
    # Video-to-video from that file: 8 of its frames (a 2-latent clip), strength 0.5.
    from data.video import write_mp4

    write_mp4(tmp_path / "in.mp4", frames[:8] / 255.0, fps=8)
    v2v = ["--model", str(tmp_path / "model"), "--prompt", "a panda", "--steps", "2"]
    v2v += ["--video", str(tmp_path / "in.mp4"), "--strength", "0.5", "--height", "48"]
    v2v += ["--width", "64", "--out", str(tmp_path / "v2v.mp4")]
    assert sample.main(v2v) == 0
    assert read_mp4(tmp_path / "v2v.mp4")[0].shape == (8, 48, 64, 3)
    # DDIM inversion of it, reconstructed with reference attention.
    inv = [a if a != "--video" else "--invert" for a in v2v if a not in ("--strength", "0.5")]
    assert sample.main([*inv[:-1], str(tmp_path / "inv.mp4")]) == 0
    assert read_mp4(tmp_path / "inv.mp4")[0].shape == (8, 48, 64, 3)
    # The same video on 8 devices (guidance rows over data, tokens over context).
    meshed = [a if a != str(out) else str(tmp_path / "mesh.mp4") for a in argv]
    assert sample.main([*meshed, "--mesh", "data=2,fsdp=2,context=2"]) == 0
    got = read_mp4(tmp_path / "mesh.mp4")[0].astype(int)
    # The same frames (equal within 1e-5 before encoding: test_sampling_on_a_mesh_...), through
    # H.264, whose choices a last-bit change can move: compare on average.
    assert got.shape == frames.shape and np.abs(got - frames.astype(int)).mean() < 1.0
