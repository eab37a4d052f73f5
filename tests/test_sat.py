"""SAT checkpoint import: SAT-format checkpoints written here from tiny random diffusers models
import to exactly the parameters `diffusers-to-orbax` makes of those models."""

import argparse
import re

import numpy as np
import pytest
import reference as ref
import torch

from cogvideox_jax import convert, sat, weights
from tools import convert as cli

P = "model.diffusion_model."


def sat_transformer(model) -> dict[str, torch.Tensor]:
    """A diffusers transformer's tensors under SAT's names (zai-org/CogVideo
    sat/dit_video_concat.py): the inverse of diffusers' convert_cogvideox_to_diffusers.py."""
    sd = dict(model.state_dict())
    out = {}
    for i in range(model.config.num_layers):
        b, layer, ada = (
            f"transformer_blocks.{i}.",
            f"transformer.layers.{i}.",
            "mixins.adaln_layer.",
        )
        for wb in ("weight", "bias"):
            qkv = [sd.pop(f"{b}attn1.to_{x}.{wb}") for x in "qkv"]
            out[f"{layer}attention.query_key_value.{wb}"] = torch.cat(qkv)
            # SAT's 12 chunks: video (shift, scale, gate) for attention, then for the MLP, then
            # text's; diffusers' norm1 holds attention's video and text six, norm2 the MLP's.
            n1 = sd.pop(f"{b}norm1.linear.{wb}").chunk(2)
            n2 = sd.pop(f"{b}norm2.linear.{wb}").chunk(2)
            out[f"{ada}adaLN_modulations.{i}.1.{wb}"] = torch.cat([n1[0], n2[0], n1[1], n2[1]])
        renames = {
            f"{b}norm1.norm.": f"{layer}input_layernorm.",
            f"{b}norm2.norm.": f"{layer}post_attention_layernorm.",
            f"{b}attn1.to_out.0.": f"{layer}attention.dense.",
            f"{b}attn1.norm_q.": f"{ada}query_layernorm_list.{i}.",
            f"{b}attn1.norm_k.": f"{ada}key_layernorm_list.{i}.",
            f"{b}ff.net.0.proj.": f"{layer}mlp.dense_h_to_4h.",
            f"{b}ff.net.2.": f"{layer}mlp.dense_4h_to_h.",
        }
        for name in [n for n in sd if n.startswith(b)]:
            old = next(k for k in renames if name.startswith(k))
            out[renames[old] + name[len(old) :]] = sd.pop(name)
    renames = {
        "patch_embed.proj.": "mixins.patch_embed.proj.",
        "patch_embed.text_proj.": "mixins.patch_embed.text_proj.",
        "patch_embed.pos_embedding": "mixins.pos_embed.pos_embedding",
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "ofs_embedding.linear_1.": "ofs_embed.0.",
        "ofs_embedding.linear_2.": "ofs_embed.2.",
        "norm_final.": "transformer.final_layernorm.",
        "norm_out.norm.": "mixins.final_layer.norm_final.",
        "norm_out.linear.": "mixins.final_layer.adaLN_modulation.1.",
        "proj_out.": "mixins.final_layer.linear.",
    }
    for name in list(sd):
        old = next(k for k in renames if name.startswith(k))
        out[renames[old] + name[len(old) :]] = sd.pop(name)
    return {P + k: v for k, v in out.items()}


def sat_vae(model) -> dict[str, torch.Tensor]:
    """A diffusers VAE's tensors under SAT's names (sat/vae_modules/cp_enc_dec.py)."""
    levels = len(model.config.block_out_channels)
    out = {}
    for name, t in model.state_dict().items():
        s = name.replace(".conv_shortcut.", ".nin_shortcut.")
        s = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", s)
        s = re.sub(r"^encoder\.down_blocks\.", "encoder.down.", s)
        # SAT's decoder lists its up blocks finest level first.
        s = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.", s
        )
        s = s.replace(".resnets.", ".block.").replace(".downsamplers.0.", ".downsample.")
        out[s.replace(".upsamplers.0.", ".upsample.")] = t
    return out


def _params(folder):
    meta = weights.param_metadata(folder / convert.PARAMS_DIR)
    loaded = weights.load_params(folder / convert.PARAMS_DIR, list(meta))
    return {k: np.asarray(v) for k, v in loaded.items()}


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert sorted(pa) == sorted(pb)
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and pa[k].shape == pb[k].shape, k
        assert pa[k].tobytes() == pb[k].tobytes(), k


def _run(*args):
    assert cli.main([str(a) for a in args]) == 0


@pytest.mark.parametrize(
    "variant,dtype",
    [
        ("2b", torch.float32),
        ("5b", torch.float32),
        ("5b-i2v", torch.bfloat16),
        ("1.5-5b", torch.float32),
        ("1.5-5b-i2v", torch.bfloat16),
    ],
)
def test_transformer_imports_like_diffusers(tmp_path, variant, dtype):
    model = ref.diffusers_transformer(variant).to(dtype)
    model.save_pretrained(tmp_path / "diffusers")
    _run("diffusers-to-orbax", tmp_path / "diffusers", tmp_path / "want")

    sd = sat_transformer(model)
    # What the SAT releases and training checkpoints hold besides the parameters.
    if model.config.use_rotary_positional_embeddings:
        sd[P + "mixins.pos_embed.freqs_sin"] = torch.randn(3, 8)
        sd[P + "mixins.pos_embed.freqs_cos"] = torch.randn(3, 8)
        sd[P + "transformer.position_embeddings.weight"] = torch.randn(64, 32)
    else:  # 2B: the fixed sin-cos table (a frozen parameter in SAT)
        sd[P + "mixins.pos_embed.pos_embedding"] = torch.randn(1, 43, 32)
    sd["conditioner.embedders.0.transformer.encoder.embed_tokens.weight"] = torch.randn(5, 4)
    sd["first_stage_model.encoder.conv_in.conv.weight"] = torch.randn(2, 3, 3, 3, 3)
    saved = {"module": sd, "iteration": 1000, "args": argparse.Namespace(lr=1e-4, seed=[1, 2])}
    folder = tmp_path / "sat/transformer"
    (folder / "1000").mkdir(parents=True)
    (folder / "latest").write_text("1000")
    torch.save(saved, folder / "1000/mp_rank_00_model_states.pt")

    _run("sat-to-orbax", folder, tmp_path / "got", "--config", tmp_path / "diffusers/config.json")
    _assert_same_params(tmp_path / "got", tmp_path / "want")
    assert (tmp_path / "got/config.json").read_text() == (
        tmp_path / "diffusers/config.json"
    ).read_text()
    if variant == "1.5-5b-i2v":  # and back to the diffusers checkpoint itself
        _run("orbax-to-diffusers", tmp_path / "got", tmp_path / "back")
        from diffusers import CogVideoXTransformer3DModel

        back = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "back", torch_dtype=dtype)
        for (n, a), b in zip(model.state_dict().items(), back.state_dict().values(), strict=True):
            assert torch.equal(a, b), n


def _tiny_vae():
    from diffusers import AutoencoderKLCogVideoX

    from cogvideox_jax import vae

    torch.manual_seed(0)
    model = AutoencoderKLCogVideoX(**vae.vae_config("tiny").to_diffusers()).eval()
    ref.perturb_(model, 0)
    return model


def test_vae_imports_like_diffusers(tmp_path):
    model = _tiny_vae()
    model.save_pretrained(tmp_path / "diffusers")
    _run("diffusers-to-orbax", tmp_path / "diffusers", tmp_path / "want")
    sd = sat_vae(model)
    assert (
        "decoder.up.3.upsample.conv.weight" in sd and "decoder.up.0.block.1.conv1.conv.bias" in sd
    )
    sd["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 3, 3)
    torch.save({"state_dict": sd}, tmp_path / "3d-vae.pt")

    _run("sat-to-orbax", tmp_path / "3d-vae.pt", tmp_path / "got", "--config",
         tmp_path / "diffusers/config.json")  # fmt: skip
    _assert_same_params(tmp_path / "got", tmp_path / "want")
    # SAT's VAE checkpoint does not say which model it belongs to: its config must be named.
    with pytest.raises(convert.ConversionError, match="--variant"):
        sat.sat_to_orbax(tmp_path / "3d-vae.pt", tmp_path / "x")


def test_vae_variant_config():
    cfg, _ = sat.component_config("vae", {}, "1.5-5b-i2v", None)
    assert cfg["scaling_factor"] == 0.7 and cfg["invert_scale_latents"] is True
    assert sat.component_config("vae", {}, "2b", None)[0]["scaling_factor"] == 1.15258426


def _sat_file(tmp_path, edit=None, top="module"):
    model = ref.diffusers_transformer("5b")
    model.save_pretrained(tmp_path / "diffusers")
    sd = sat_transformer(model)
    if edit:
        edit(sd)
    torch.save({top: sd}, tmp_path / "mp_rank_00_model_states.pt")
    return tmp_path / "mp_rank_00_model_states.pt"


QKV_BIAS = P + "transformer.layers.1.attention.query_key_value.bias"


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda sd: sd.update({P + "mixins.lora.matrix_A.0": torch.zeros(2)}),
            f"unexpected SAT tensor '{P}mixins.lora.matrix_A.0'",
        ),
        (lambda sd: sd.pop(QKV_BIAS), f"missing SAT tensor '{QKV_BIAS}'"),
        (
            lambda sd: sd.update({QKV_BIAS: torch.zeros(95)}),
            rf"SAT tensor '{QKV_BIAS}' has shape \(95,\)",
        ),
        (
            lambda sd: sd.pop(P + "mixins.adaln_layer.adaLN_modulations.0.1.weight"),
            r"missing SAT tensor .*adaLN_modulations\.0\.1\.weight' \(for transformer_blocks\.0"
            r"\.norm1\.linear\.weight, transformer_blocks\.0\.norm2\.linear\.weight\)",
        ),
    ],
)
def test_strictness_names_the_sat_tensor(tmp_path, edit, message):
    path = _sat_file(tmp_path, edit)
    config = tmp_path / "diffusers/config.json"
    with pytest.raises(convert.ConversionError, match=message):
        sat.sat_to_orbax(path, tmp_path / "out", config=config)
    assert not (tmp_path / "out").exists()
    assert cli.main(["sat-to-orbax", str(path), str(tmp_path / "out"), "--config", str(config)])


def test_neither_module_nor_state_dict(tmp_path):
    path = _sat_file(tmp_path, top="model")
    with pytest.raises(
        convert.ConversionError, match="'module'.*'state_dict'.*found \\['model'\\]"
    ):
        sat.sat_to_orbax(path, tmp_path / "out", variant="5b")
    (tmp_path / "notes.pt").write_bytes(b"not a zip")
    with pytest.raises(convert.ConversionError, match="not a torch zip checkpoint"):
        sat.sat_to_orbax(tmp_path / "notes.pt", tmp_path / "out", variant="5b")
    with pytest.raises(FileNotFoundError, match="latest"):
        sat.sat_to_orbax(tmp_path / "diffusers", tmp_path / "out", variant="5b")


# Released shapes (zai-org/CogVideo sat/configs/*.yaml: hidden_size, num_layers, in_channels,
# patch_size; 1.5 embeds 2x2x2 patches with a Linear).
@pytest.mark.parametrize(
    "variant,proj,layers,ofs",
    [
        ("2b", (1920, 16, 2, 2), 30, False),
        ("5b", (3072, 16, 2, 2), 42, False),
        ("5b-i2v", (3072, 32, 2, 2), 42, False),
        ("1.5-5b", (3072, 128), 42, False),
        ("1.5-5b-i2v", (3072, 256), 42, True),
    ],
)
def test_variant_inferred_from_shapes(variant, proj, layers, ofs):
    shapes = {P + "mixins.patch_embed.proj.weight": proj}
    shapes |= {
        P + f"transformer.layers.{i}.input_layernorm.weight": (proj[0],) for i in range(layers)
    }
    if ofs:
        shapes[P + "ofs_embed.0.weight"] = (512, 512)
    assert sat.infer_variant(shapes) == variant
    with pytest.raises(convert.ConversionError, match="matches no released variant"):
        sat.infer_variant({**shapes, P + "mixins.patch_embed.proj.weight": (64, 16, 2, 2)})


def test_reader_rebuilds_views_parameters_and_dtypes(tmp_path):
    """The torch-free reader gives torch.load's values for what state dicts can hold."""
    base = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    saved = {
        "plain": base,
        "transposed": base.T,  # strides (1, 5) on the same storage
        "offset": base[2:, 1:3],  # a view starting inside the storage
        "parameter": torch.nn.Parameter(base[0].clone()),
        "bf16": base.to(torch.bfloat16),
        "fp16": base[:2].to(torch.float16),
        "ints": torch.arange(7),
        "scalar": torch.tensor(3.5),
    }
    torch.save({"module": saved, "optimizer": {"state": {0: {"step": torch.tensor(1.0)}}}},
               tmp_path / "x.pt")  # fmt: skip
    want = torch.load(tmp_path / "x.pt", weights_only=True)["module"]
    with sat.TorchZipCheckpoint(tmp_path / "x.pt") as ckpt:
        got = {k: ckpt.read(v) for k, v in ckpt.root["module"].items()}
    for k, t in want.items():
        t = t.detach()
        raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        assert got[k].shape == tuple(t.shape), k
        assert np.array_equal(got[k].view(np.int16) if k == "bf16" else got[k], raw.numpy()), k
    assert got["bf16"].dtype == "bfloat16" and got["fp16"].dtype == np.float16
