r"""The built-in demo: text-to-video from scratch on procedurally drawn clips ("a red circle
moving left"), on a CPU in minutes, with no downloads (train/demo.py, data/demo.py).

A frozen tiny random T5 encodes the captions; the tiny causal VAE is trained first (cached in
WORKDIR/demo_vae); a tiny CogVideoX-5B-style transformer then learns the latents. Every eval
writes WORKDIR/samples/step_{N}_{i}.mp4 and logs `prompt_adherence` in metrics.jsonl.

python -m train --config configs/demo.py --workdir runs/demo
python -m train --config configs/demo.py:runlocal --workdir $RUN
"""

from configs import common

# The caption tokenizer's fixed length (data/demo.py TEXT_LEN; train/demo.py checks they agree).
TEXT_LEN = 8


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False, frames=9, res="32x32")
    arg.mode = "sft"
    runlocal, arg.runlocal = arg.runlocal, False  # the demo shrinks itself (below)
    c = common.dit_config(
        arg,
        variant="5b",
        scaling_factor=1.0,  # the demo latents are stored already scaled (train/demo.py)
        snr_shift_scale=1.0,
        text_len=TEXT_LEN,
        i2v=False,
    )
    text_dim, latent_channels = 32, 16
    h, w = common.parse_res(arg.res)
    c.total_steps = 6000
    c.batch_size = 16
    c.model.update(dtype="float32", remat="none")
    c.model.overrides = dict(
        num_layers=4,
        num_heads=4,
        head_dim=32,
        in_channels=latent_channels,
        out_channels=latent_channels,
        text_embed_dim=text_dim,
        time_embed_dim=64,
        max_text_len=TEXT_LEN,
        sample_height=h // 8,
        sample_width=w // 8,
        sample_frames=arg.frames,
    )
    c.vae.variant = "tiny"
    c.input.update(
        source="demo",
        num_frames=arg.frames,
        height=h,
        width=w,
        latent_channels=latent_channels,
        text_dim=text_dim,
        num_examples=256,
        eval_examples=32,
    )
    c.diffusion.text_dropout = 0.1
    c.optim.update(
        lr=1e-3, schedule="cosine", warmup_steps=20, grad_clip=1.0, ema_decay=0.0, end_lr_factor=0.1
    )
    c.mesh.num_devices = 1
    c.ckpt.update(every_steps=1500, keep=2)
    c.log.every_steps = 10
    c.evals.update(every_steps=1500, batch_size=16, timesteps=(100, 500, 900))
    c.demo = dict(
        text_dim=text_dim,
        text_heads=4,
        text_layers=1,
        latent_channels=latent_channels,
        vae_widths=(8, 16, 16, 16),
        vae_groups=2,
        # The VAE learns the shapes' outlines from single frames (the causal VAE codes a first
        # frame alone), which cost a ninth of a clip: vae_image_steps on frames alone, then
        # vae_steps on clips, each step with vae_joint_images frames besides (README).
        vae_image_steps=1500,
        vae_image_batch=16,
        vae_steps=300,
        vae_batch=8,
        vae_joint_images=8,
        vae_lr=3e-3,
        vae_video_lr=1e-3,
        kl_weight=1e-4,
        vae_init_logvar=-8.0,
        foreground_weight=2.0,
        samples=16,
        sample_steps=20,
        guidance_scale=2.0,
    )
    if runlocal:
        c.total_steps = 6
        c.batch_size = 4
        c.model.overrides.update(num_layers=1, head_dim=16, time_embed_dim=16)
        c.input.update(num_examples=16, eval_examples=4)
        c.optim.warmup_steps = 2
        c.ckpt.every_steps = 3
        c.log.every_steps = 1
        c.evals.update(every_steps=3, batch_size=4, timesteps=(100, 900))
        # One VAE program to compile: clips with frames beside them (the frames-only phase is the
        # same loss on the frames alone).
        c.demo.update(vae_image_steps=0, vae_steps=3, vae_joint_images=2, samples=2)
        c.demo.sample_steps = 3
    return c
