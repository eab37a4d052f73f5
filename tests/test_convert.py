"""diffusers <-> Orbax conversion: byte-exact round trips, whole model folders, strictness."""

import json
import subprocess
import sys

import numpy as np
import pytest
import reference as ref
import safetensors.torch
import torch
from safetensors import safe_open

import cogvideox_jax as cj
from cogvideox_jax import components, convert


def _tensors(folder):
    """name -> (dtype, shape, raw bytes) of every tensor in a folder's safetensors files."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                out[name] = (
                    t.dtype,
                    tuple(t.shape),
                    t.contiguous().view(torch.uint8).numpy().tobytes(),
                )
    return out


@pytest.mark.parametrize(
    "variant,dtype,shard",
    [
        ("5b", torch.float32, None),
        ("5b-i2v", torch.bfloat16, None),
        ("1.5-5b-i2v", torch.bfloat16, "40KB"),
        ("2b", torch.float16, "30KB"),
    ],
)
def test_round_trip_is_byte_exact(tmp_path, variant, dtype, shard):
    model = ref.diffusers_transformer(variant).to(dtype)
    src = tmp_path / "src"
    kw = {} if shard is None else {"max_shard_size": shard}
    model.save_pretrained(src, **kw)
    assert (len(list(src.glob("*.safetensors"))) > 1) == (shard is not None)

    components.convert("diffusers-to-orbax", src, tmp_path / "orbax")
    components.convert("orbax-to-diffusers", tmp_path / "orbax", tmp_path / "back")

    before, after = _tensors(src), _tensors(tmp_path / "back")
    assert sorted(after) == sorted(before)
    for name in before:
        assert after[name] == before[name], name  # dtype, shape and every byte
    assert json.loads((tmp_path / "back/config.json").read_text()) == json.loads(
        (src / "config.json").read_text()
    )
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == sorted(
        p.name for p in src.iterdir()
    )
    # And diffusers loads the result as the same model.
    from diffusers import CogVideoXTransformer3DModel

    again = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "back", torch_dtype=dtype)
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=False):
        assert torch.equal(a, b), n


def test_model_trained_here_exports_to_diffusers(tmp_path):
    """An Orbax folder without a recorded file layout gets diffusers' default file names."""
    model = ref.diffusers_transformer("5b")
    model.save_pretrained(tmp_path / "src")
    components.convert("diffusers-to-orbax", tmp_path / "src", tmp_path / "orbax")
    marker = tmp_path / "orbax" / convert.MARKER
    marker.write_text(json.dumps({"format": 1, "component": "transformer"}))
    components.convert("orbax-to-diffusers", tmp_path / "orbax", tmp_path / "back")
    assert (tmp_path / "back/diffusion_pytorch_model.safetensors").is_file()
    assert _tensors(tmp_path / "back") == _tensors(tmp_path / "src")


def test_whole_model_folder(tmp_path):
    src = tmp_path / "model"
    ref.diffusers_transformer("5b").save_pretrained(src / "transformer")
    (src / "scheduler").mkdir()
    (src / "scheduler/scheduler_config.json").write_text(
        '{"_class_name": "CogVideoXDDIMScheduler"}'
    )
    (src / "tokenizer").mkdir()
    (src / "tokenizer/spiece.model").write_bytes(b"\x00\x01binary")
    (src / "model_index.json").write_text('{"_class_name": "CogVideoXPipeline"}')

    report = components.convert("diffusers-to-orbax", src, tmp_path / "orbax")
    assert report == [
        "copied model_index.json",
        "copied scheduler/",
        "copied tokenizer/",
        "converted transformer/",
    ]
    assert convert.is_orbax_component(tmp_path / "orbax/transformer")
    assert (tmp_path / "orbax/tokenizer/spiece.model").read_bytes() == b"\x00\x01binary"
    # load_transformer takes the model folder too.
    assert cj.load_transformer(tmp_path / "orbax").cfg.num_layers == 2

    components.convert("orbax-to-diffusers", tmp_path / "orbax", tmp_path / "back")
    assert _tensors(tmp_path / "back/transformer") == _tensors(src / "transformer")
    assert (tmp_path / "back/scheduler/scheduler_config.json").read_text() == (
        src / "scheduler/scheduler_config.json"
    ).read_text()


def _edit_checkpoint(folder, edit):
    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = safetensors.torch.load_file(path)
    edit(tensors)
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda t: t.pop("transformer_blocks.1.attn1.to_k.bias"),
            "missing tensor 'transformer_blocks.1.attn1.to_k.bias'",
        ),
        (
            lambda t: t.update({"transformer_blocks.0.attn1.extra.weight": torch.zeros(2)}),
            "unexpected tensor 'transformer_blocks.0.attn1.extra.weight'",
        ),
        (
            lambda t: t.update({"proj_out.weight": torch.zeros(16, 31)}),
            r"tensor 'proj_out.weight' has shape \(16, 31\), model expects \(16, 32\)",
        ),
        (
            lambda t: t.update({"transformer_blocks.2.norm1.norm.weight": torch.zeros(32)}),
            "layer 2 outside 0..1",
        ),
    ],
)
def test_strictness_names_the_tensor(tmp_path, edit, message):
    ref.diffusers_transformer("5b").save_pretrained(tmp_path / "src")
    _edit_checkpoint(tmp_path / "src", edit)
    with pytest.raises(convert.ConversionError, match=message):
        components.convert("diffusers-to-orbax", tmp_path / "src", tmp_path / "out")
    with pytest.raises(convert.ConversionError, match=message):
        cj.load_transformer(tmp_path / "src")
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_orbax_to_diffusers_rejects_a_mismatched_checkpoint(tmp_path):
    ref.diffusers_transformer("5b").save_pretrained(tmp_path / "src")
    components.convert("diffusers-to-orbax", tmp_path / "src", tmp_path / "orbax")
    cfg = json.loads((tmp_path / "orbax/config.json").read_text())
    (tmp_path / "orbax/config.json").write_text(json.dumps(cfg | {"num_layers": 3}))
    with pytest.raises(convert.ConversionError, match="transformer_blocks/attn1/to_q_kernel"):
        components.convert("orbax-to-diffusers", tmp_path / "orbax", tmp_path / "back")


def test_existing_destination_is_kept(tmp_path):
    ref.diffusers_transformer("5b").save_pretrained(tmp_path / "src")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst/keep").write_text("x")
    with pytest.raises(FileExistsError):
        components.convert("diffusers-to-orbax", tmp_path / "src", tmp_path / "dst")
    assert (tmp_path / "dst/keep").read_text() == "x"


@pytest.mark.slow  # a subprocess; the fast subset runs tools.convert in test_export.py
def test_cli(tmp_path):
    ref.diffusers_transformer("1.5-5b").save_pretrained(tmp_path / "src")
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "tools.convert", *map(str, a)], capture_output=True, text=True
    )
    r = run("diffusers-to-orbax", tmp_path / "src", tmp_path / "orbax")
    assert r.returncode == 0, r.stderr
    assert "converted src" in r.stdout
    r = run("orbax-to-diffusers", tmp_path / "orbax", tmp_path / "back")
    assert r.returncode == 0, r.stderr
    assert _tensors(tmp_path / "back") == _tensors(tmp_path / "src")
    r = run("diffusers-to-orbax", tmp_path / "nowhere", tmp_path / "x")
    assert r.returncode == 2 and "nowhere" in r.stderr


def test_streaming_reads_one_leaf_group_at_a_time(tmp_path, monkeypatch):
    """Orbax -> diffusers reads parameter groups, never the whole checkpoint at once."""
    ref.diffusers_transformer("5b", num_layers=4).save_pretrained(tmp_path / "src")
    components.convert("diffusers-to-orbax", tmp_path / "src", tmp_path / "orbax")
    seen = []
    real = convert.weights.load_params
    monkeypatch.setattr(
        convert.weights,
        "load_params",
        lambda path, names, *a: seen.append(list(names)) or real(path, names, *a),
    )
    monkeypatch.setattr(convert, "STREAM_GROUP_BYTES", 4096)
    components.convert("orbax-to-diffusers", tmp_path / "orbax", tmp_path / "back")
    assert len(seen) > 5 and max(map(len, seen)) < 10
    assert _tensors(tmp_path / "back") == _tensors(tmp_path / "src")


def _t5(dtype=torch.float32):
    import transformers

    from cogvideox_jax import t5

    cfg = t5.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4)
    model = transformers.T5EncoderModel(transformers.T5Config(**cfg.to_transformers())).eval()
    ref.perturb_(model, 0, scale=0.1)
    return model.to(dtype)


@pytest.mark.parametrize(
    "dtype,shard",
    [(torch.float32, None), pytest.param(torch.bfloat16, "4KB", marks=pytest.mark.slow)],
)
def test_t5_round_trip_is_byte_exact(tmp_path, dtype, shard):
    model = _t5(dtype)
    model.save_pretrained(tmp_path / "src", **({} if shard is None else {"max_shard_size": shard}))
    components.convert("diffusers-to-orbax", tmp_path / "src", tmp_path / "orbax")
    components.convert("orbax-to-diffusers", tmp_path / "orbax", tmp_path / "back")
    assert _tensors(tmp_path / "back") == _tensors(tmp_path / "src")
    want = np.float32 if dtype == torch.float32 else "bfloat16"
    direct, converted = (
        cj.load_text_encoder(tmp_path / "src"),
        cj.load_text_encoder(tmp_path / "orbax"),
    )
    assert converted.shared.embedding[...].dtype == want
    ids = np.arange(2 * 9).reshape(2, 9) % 64
    np.testing.assert_array_equal(np.asarray(direct(ids)), np.asarray(converted(ids)))


def test_t5_tied_embedding_copy_is_checked_and_kept(tmp_path):
    _t5().save_pretrained(tmp_path / "src")
    path = tmp_path / "src/model.safetensors"
    tensors = safetensors.torch.load_file(path)
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"].clone()
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    components.convert("diffusers-to-orbax", tmp_path / "src", tmp_path / "orbax")
    components.convert("orbax-to-diffusers", tmp_path / "orbax", tmp_path / "back")
    assert _tensors(tmp_path / "back") == _tensors(tmp_path / "src")

    tensors["encoder.embed_tokens.weight"][0, 0] += 1
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(convert.ConversionError, match="encoder.embed_tokens.weight"):
        components.convert("diffusers-to-orbax", tmp_path / "src", tmp_path / "orbax2")


def test_model_folder_converts_text_encoder_and_transformer(tmp_path):
    src = tmp_path / "model"
    ref.diffusers_transformer("5b").save_pretrained(src / "transformer")
    _t5().save_pretrained(src / "text_encoder")
    (src / "model_index.json").write_text('{"_class_name": "CogVideoXPipeline"}')
    report = components.convert("diffusers-to-orbax", src, tmp_path / "orbax")
    assert "converted text_encoder/" in report and "converted transformer/" in report
    assert cj.load_text_encoder(tmp_path / "orbax").cfg.d_model == 16
    components.convert("orbax-to-diffusers", tmp_path / "orbax", tmp_path / "back")
    assert _tensors(tmp_path / "back/text_encoder") == _tensors(src / "text_encoder")


def _tiny_vae(dtype=torch.float32):
    from diffusers import AutoencoderKLCogVideoX

    from cogvideox_jax import vae

    torch.manual_seed(0)
    model = AutoencoderKLCogVideoX(**vae.vae_config("tiny").to_diffusers()).eval()
    ref.perturb_(model, 0)
    return model.to(dtype)


@pytest.mark.parametrize(
    "dtype,shard",
    [(torch.float32, None), pytest.param(torch.bfloat16, "20KB", marks=pytest.mark.slow)],
)
def test_vae_round_trip_is_byte_exact(tmp_path, dtype, shard):
    _tiny_vae(dtype).save_pretrained(
        tmp_path / "src", **({} if shard is None else {"max_shard_size": shard})
    )
    components.convert("diffusers-to-orbax", tmp_path / "src", tmp_path / "orbax")
    components.convert("orbax-to-diffusers", tmp_path / "orbax", tmp_path / "back")
    assert _tensors(tmp_path / "back") == _tensors(tmp_path / "src")
    assert json.loads((tmp_path / "back/config.json").read_text()) == json.loads(
        (tmp_path / "src/config.json").read_text()
    )
    # load_vae computes in float32 by default, whatever the stored dtype.
    assert cj.load_vae(tmp_path / "orbax").encoder.conv_in.conv.kernel[...].dtype == np.float32


def test_vae_strictness_names_the_tensor(tmp_path):
    _tiny_vae().save_pretrained(tmp_path / "src")
    _edit_checkpoint(
        tmp_path / "src", lambda t: t.pop("decoder.up_blocks.0.resnets.0.norm1.conv_y.conv.bias")
    )
    with pytest.raises(
        convert.ConversionError,
        match="missing tensor 'decoder.up_blocks.0.resnets.0.norm1.conv_y.conv.bias'",
    ):
        components.convert("diffusers-to-orbax", tmp_path / "src", tmp_path / "out")
