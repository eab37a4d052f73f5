r"""CogVideoX1.5-5B text-to-video on latents (pretrain or SFT); frame counts are 8k+1.

python -m train --config configs/cogvideox1_5_5b.py:sft --workdir $RUN \
    --config.init.checkpoint=$MODEL
python -m train --config configs/cogvideox1_5_5b.py:pretrain,frames=81,res=768x1360 --workdir $RUN
python -m train --config configs/cogvideox1_5_5b.py:sft,runlocal --workdir $RUN
python -m train --config configs/cogvideox1_5_5b.py:lora --workdir $RUN \
    --config.init.checkpoint=$MODEL
python -m train --config configs/cogvideox1_5_5b.py:sft --workdir $RUN --config.mode=eval
# With the defaults (FSDP over all chips, full remat, `auto` attention: splash on TPU), SFT at 81
# frames fits a v5p-16 (not a v5p-8); pretraining at 161 frames (context=2, auto accumulation:
# one sample per data shard per micro-batch) fits a v5p-64 (tools.aot, BENCHMARKS.md):
python -m tools.aot --config configs/cogvideox1_5_5b.py:sft --topology v5p-16
python -m tools.aot --config configs/cogvideox1_5_5b.py:pretrain,frames=161,res=768x1360 \
    --topology v5p-64
"""

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, mode="sft", runlocal=False, frames=81, res="768x1360")
    # Source: diffusers THUDM/CogVideoX1.5-5B configs; SAT cogvideox1.5_5b.yaml (group_num 40).
    return common.dit_config(
        arg,
        variant="1.5-5b",
        scaling_factor=0.7,
        snr_shift_scale=1.0,
        text_len=226,
        i2v=False,
        eus_groups=40,
        pretrain_context=2,
    )
