"""Argument parsing and the shared section builder for the experiment configs.

`parse_arg` reads the string after the colon in `--config configs/x.py:sft,runlocal,res=256x384`
(bare words are booleans, or the value of `mode` when they name one of `modes`; `key=value`
pairs are typed by the default). `dit_config` fills the fixed sections of a transformer
experiment from the few facts a config file states.
"""

from __future__ import annotations

import ml_collections

MODES = ("pretrain", "sft", "lora")


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
    """'sft,runlocal,frames=49' -> ConfigDict(mode='sft', runlocal=True, frames=49, ...)."""
    out = ml_collections.ConfigDict(spec)
    for item in filter(None, (arg or "").split(",")):
        key, eq, value = item.partition("=")
        if not eq and key in MODES:
            out.mode = key
        elif not eq:
            if not isinstance(spec.get(key), bool):
                raise ValueError(
                    f"config argument {key!r} is unknown or not a flag; known: {sorted(spec)}"
                )
            out[key] = True
        elif key not in spec:
            raise ValueError(f"config argument {key!r} is unknown; known: {sorted(spec)}")
        else:
            default = spec[key]
            out[key] = type(default)(value) if default is not None else value
    if out.get("mode") not in (None, *MODES):
        raise ValueError(f"mode must be one of {MODES}, got {out.mode!r}")
    return out


def parse_res(res: str) -> tuple[int, int]:
    """'480x720' -> (480, 720) pixels."""
    h, _, w = res.partition("x")
    return int(h), int(w)


def dit_config(
    arg: ml_collections.ConfigDict,
    *,
    variant: str,
    scaling_factor: float,
    snr_shift_scale: float,
    text_len: int,
    i2v: bool,
    ofs: float | None = None,
    eus_groups: int = 1,
    invert_scale_latents: bool = False,
    pretrain_context: int = 1,
) -> ml_collections.ConfigDict:
    """The sections of a transformer run; the caller states the checkpoint facts."""
    c = ml_collections.ConfigDict()
    c.trainer = "dit"
    c.mode = "train"  # or "eval": evaluate the latest checkpoint of the workdir
    c.seed = 0
    pretrain = arg.mode == "pretrain"
    c.total_steps = 100_000 if pretrain else 1000
    c.batch_size = 1024 if pretrain else 16
    # 0: auto, one example per data shard per micro-batch (a pretraining batch of 1024 does not
    # fit in one pass at CogVideoX's sizes; tools.aot shows which slices it fits).
    c.grad_accum_steps = 0 if pretrain else 1

    c.model = dict(
        variant=variant,
        overrides={},  # TransformerConfig fields, e.g. {"num_layers": 2}
        dtype="bfloat16",
        param_dtype="float32",
        remat="full",  # none | full | save_dots | save_attention | offload_dots
        attention_impl="auto",  # cudnn (GPU), splash (TPU), blocked (CPU), else xla; or name one
        context_parallel="allgather",  # or "ulysses" (heads per tensor shard % mesh.context == 0)
    )
    # Frozen VAE, used only to encode the I2V conditioning frame (latents are precomputed).
    # The I2V image latent is divided by scaling_factor when `invert_scale_latents` (1.5-I2V's VAE
    # config; a loaded VAE must agree), else multiplied, as the sampling pipeline does.
    c.vae = dict(checkpoint="", variant="cogvideox", invert_scale_latents=invert_scale_latents)
    c.diffusion = dict(
        snr_shift_scale=snr_shift_scale,
        scaling_factor=scaling_factor,
        eus_groups=eus_groups,  # Explicit Uniform Sampling bands (1: plain uniform)
        text_dropout=0.1,
        image_dropout=0.05,
        image_noise_log_mean=-3.0,
        image_noise_log_std=0.5,
        ofs=ofs if ofs is not None else -1.0,  # 1.5-I2V: the constant ofs input; -1: none
    )
    h, w = parse_res(arg.res)
    c.input = dict(
        source="synthetic",
        i2v=i2v,
        num_frames=arg.frames,
        height=h,
        width=w,
        latent_channels=16,
        spatial_compression=8,  # pixels per latent along height and width (the VAE's)
        text_len=text_len,
        text_dim=4096,
        num_examples=4096,  # synthetic source only
        eval_examples=64,
        # A dataset written by `python -m tools.prepare_data SRC OUT` ("" : synthetic data).
        # Clips of many sizes are bucketed (batches of one shape) or, with packing=True, packed
        # into rows of video_budget video tokens and up to max_clips clips (0: defaults, from
        # the config's clip size; data/packing.py).
        data_dir="",
        # Several prepared datasets mixed in one stream instead of data_dir (e.g. images beside
        # clips): ((DIR, WEIGHT), ...). Packing draws each clip from dataset d in the share
        # WEIGHT_d / sum(WEIGHTS), bucketing each batch (data/loader.py, mixture). Pretraining
        # with images is CogVideoX's recipe (about 2B images beside 35M clips, as one-frame
        # videos), but the paper states no mixing ratio, so no mode sets a default one: give
        # the weights, e.g. (("clips", 0.8), ("images", 0.2)).
        sources=(),
        packing=False,
        video_budget=0,
        max_clips=0,
        workers=0,  # Grain worker processes decoding records (packing: threads; 0: in-process)
        # Datasets of raw clips are encoded on the fly by the vae/, text_encoder/ and tokenizer/
        # of this diffusers-layout model folder (as tools.prepare_data --model does; the demo
        # brings its own encoders).
        encoder_model="",
    )
    c.optim = dict(
        lr=1e-4 if pretrain else 1e-5,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=1e-4,
        schedule="cosine" if pretrain else "linear",
        warmup_steps=1000 if pretrain else 10,
        end_lr_factor=0.0,
        grad_clip=1.0 if pretrain else 0.1,
        ema_decay=0.0 if pretrain else 0.9999,  # 0: no EMA
    )
    c.mesh = dict(data=1, fsdp=-1, context=1, tensor=1, num_devices=0)  # 0: every device
    # (logical name, mesh axes) pairs replacing those names' DEFAULT_RULES entries, e.g.
    # (("embed", "fsdp"),) to keep weights whole across context shards.
    c.sharding_rules = ()
    # step: the checkpoint to resume from (or, in eval mode, to evaluate); 0: the newest intact
    # one. A pinned step that is damaged or absent, or has newer checkpoints beside it in a
    # training run, stops the run with the reason. keep: how many intact steps Orbax keeps.
    c.ckpt = dict(every_steps=500, keep=3, async_save=True, step=0)
    c.log = dict(every_steps=10, progress=True)
    c.evals = dict(every_steps=1000, timesteps=(100, 300, 500, 700, 900), batch_size=8)
    # Samples at each eval (train/samples.py): one video per prompt at the run's clip size, with
    # the run's model folder's VAE and text encoder, written under WORKDIR/samples; () is off.
    # Image-to-video runs name first frames in sample_images (one, or one per prompt).
    c.evals.update(sample_prompts=(), sample_images=(), sample_steps=50, sample_guidance=6.0)
    c.init = dict(checkpoint="")  # a diffusers/Orbax transformer folder to start from
    # LoRA (rank 0: off, every weight trains). Only the adapters train and are checkpointed;
    # the base (init.checkpoint) stays frozen, stored in base_dtype ("": model.param_dtype).
    c.lora = dict(
        rank=0,
        alpha=0.0,  # scale alpha / rank; 0: alpha = rank
        targets="to_q,to_k,to_v,to_out.0",  # diffusers names; also ff.net.0.proj, ff.net.2
        base_dtype="",
        init="",  # adapters to continue from: a LoRA folder or a diffusers LoRA file
    )
    c.on_nonfinite = "stop"  # or "skip": drop the update of a step with a NaN/Inf loss
    # A step whose planned memory (XLA's, all of a process's devices together on CPU; per
    # device elsewhere) is over this is refused before it first runs (0: what is free).
    c.memory_limit_gb = 0.0
    # A step (batch fetch and train step) taking over this many times the median of the recent
    # steps has every thread's Python stack written to stderr (train/watchdog.py); 0: off.
    c.watchdog_factor = 10.0

    if arg.mode == "lora":
        # diffusers' CogVideoX LoRA recipe (finetune/: rank 128, alpha 64 on the attention
        # projections, constant lr after 100 warm-up steps, clip 1.0), the base frozen in bf16.
        c.lora.update(rank=128, alpha=64.0, base_dtype="bfloat16")
        c.optim.update(lr=1e-4, schedule="constant", warmup_steps=100, grad_clip=1.0)
        c.optim.ema_decay = 0.0

    if pretrain and pretrain_context > 1 and not arg.runlocal:
        # Long pretraining clips (1.5: 161x768x1360) split each sample over `pretrain_context`
        # chips (fits a v5p-64 with the auto accumulation: tools.aot, BENCHMARKS.md); an eval
        # batch that divides over up to 64 data shards.
        c.mesh.context = pretrain_context
        c.evals.batch_size = 64
    if arg.runlocal:
        runlocal(c)
    return c


def runlocal(c: ml_collections.ConfigDict) -> None:
    """Shrink `c` to a CPU-sized run of the same experiment: tiny transformer and VAE."""
    c.total_steps = 6
    c.batch_size = 2
    c.model.overrides = dict(
        num_layers=1,
        num_heads=2,
        head_dim=16,
        text_embed_dim=16,
        time_embed_dim=16,
        max_text_len=8,
        sample_height=4,
        sample_width=4,
        sample_frames=9,
    )
    if c.diffusion.ofs >= 0:
        c.model.overrides.ofs_embed_dim = 16
    c.mesh.num_devices = 2  # the batch of 2 over at most 2 devices
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.vae.variant = "tiny"
    c.input.update(num_frames=9, height=32, width=32, text_len=8, text_dim=16)
    c.input.update(num_examples=16, eval_examples=4)
    c.optim.warmup_steps = 2
    if c.lora.rank:
        c.lora.update(rank=4, alpha=8.0, base_dtype="float32")
    c.ckpt.every_steps = 2
    c.log.every_steps = 1
    c.evals.update(every_steps=3, batch_size=2, timesteps=(100, 900))
    if not c.input.i2v:  # (an image-to-video run would need first frames: evals.sample_images)
        c.evals.update(sample_prompts=("a red ball rolls left", "a blue cube"), sample_steps=2)
