r"""CogVideoX1.5-5B image-to-video on latents (pretrain or SFT); frame counts are 8k+1.

python -m train --config configs/cogvideox1_5_5b_i2v.py:sft --workdir $RUN \
    --config.init.checkpoint=$MODEL
python -m train --config configs/cogvideox1_5_5b_i2v.py:pretrain,frames=161,res=768x1360 \
    --workdir $RUN
python -m train --config configs/cogvideox1_5_5b_i2v.py:sft,runlocal --workdir $RUN
python -m train --config configs/cogvideox1_5_5b_i2v.py:lora --workdir $RUN \
    --config.init.checkpoint=$MODEL
python -m train --config configs/cogvideox1_5_5b_i2v.py:sft --workdir $RUN --config.mode=eval
"""

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, mode="sft", runlocal=False, frames=81, res="768x1360")
    # Source: diffusers THUDM/CogVideoX1.5-5B-I2V configs; ofs 2.0 from SAT sample_video.py.
    return common.dit_config(
        arg,
        variant="1.5-5b-i2v",
        scaling_factor=0.7,
        snr_shift_scale=1.0,
        text_len=226,
        i2v=True,
        ofs=2.0,
        eus_groups=40,
        pretrain_context=2,
        invert_scale_latents=True,  # the released VAE config's flag (diffusers' pipeline)
    )
