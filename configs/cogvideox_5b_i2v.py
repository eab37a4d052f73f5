r"""CogVideoX-5B image-to-video on latents (pretrain or SFT); frame counts are 4k+1.

python -m train --config configs/cogvideox_5b_i2v.py:sft --workdir $RUN \
    --config.init.checkpoint=$MODEL
python -m train --config configs/cogvideox_5b_i2v.py:pretrain,frames=49,res=480x720 --workdir $RUN
python -m train --config configs/cogvideox_5b_i2v.py:sft,runlocal --workdir $RUN
python -m train --config configs/cogvideox_5b_i2v.py:lora --workdir $RUN \
    --config.init.checkpoint=$MODEL
python -m train --config configs/cogvideox_5b_i2v.py:sft --workdir $RUN --config.mode=eval
"""

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, mode="sft", runlocal=False, frames=49, res="480x720")
    # Source: diffusers THUDM/CogVideoX-5b-I2V vae/config.json and scheduler/scheduler_config.json.
    return common.dit_config(
        arg,
        variant="5b-i2v",
        scaling_factor=0.7,
        snr_shift_scale=1.0,
        text_len=226,
        i2v=True,
        eus_groups=1,
    )
