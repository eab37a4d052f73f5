r"""CogVideoX-5B text-to-video on latents (pretrain or SFT); frame counts are 4k+1.

python -m train --config configs/cogvideox_5b.py:sft --workdir $RUN \
    --config.init.checkpoint=$MODEL
python -m train --config configs/cogvideox_5b.py:pretrain,frames=49,res=480x720 --workdir $RUN
python -m train --config configs/cogvideox_5b.py:sft,runlocal --workdir $RUN
python -m train --config configs/cogvideox_5b.py:lora --workdir $RUN \
    --config.init.checkpoint=$MODEL
python -m train --config configs/cogvideox_5b.py:sft --workdir $RUN --config.mode=eval
# Fits a v5p-8 with the defaults (mesh fsdp over all chips, remat full) and splash attention
# (tools.aot, BENCHMARKS.md):
python -m tools.aot --config configs/cogvideox_5b.py:sft --topology v5p-8 \
    --config.model.attention_impl=splash
"""

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, mode="sft", runlocal=False, frames=49, res="480x720")
    # Source: diffusers THUDM/CogVideoX-5b vae/config.json and scheduler/scheduler_config.json.
    return common.dit_config(
        arg,
        variant="5b",
        scaling_factor=0.7,
        snr_shift_scale=1.0,
        text_len=226,
        i2v=False,
        eus_groups=1,
    )
