"""Every accepted DiT file layout round-trips to the same model; wrong files get clear errors."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from sama_core.__main__ import main as cli
from sama_core.config import SAMA_KEY_PREFIXES, infer_config
from sama_core.errors import SamaFileNotFoundError, SamaModelFileError
from sama_core.loading import load_dit, save_dit
from tiny_models import TINY, tiny_dit, tiny_inputs

# Official -> diffusers names, written out by hand here (independent of loading.py's rules).
def to_diffusers_name(k):
    fixed = {"text_embedding.0": "condition_embedder.text_embedder.linear_1",
             "text_embedding.2": "condition_embedder.text_embedder.linear_2",
             "time_embedding.0": "condition_embedder.time_embedder.linear_1",
             "time_embedding.2": "condition_embedder.time_embedder.linear_2",
             "time_projection.1": "condition_embedder.time_proj", "head.head": "proj_out"}
    if k == "head.modulation":
        return "scale_shift_table"
    stem, _, leaf = k.rpartition(".")
    if stem in fixed:
        return f"{fixed[stem]}.{leaf}"
    if k.startswith("blocks."):
        _, i, rest = k.split(".", 2)
        rest = (rest.replace("self_attn.o.", "attn1.to_out.0.").replace("cross_attn.o.", "attn2.to_out.0.")
                .replace("self_attn.norm_", "attn1.norm_").replace("cross_attn.norm_", "attn2.norm_")
                .replace("self_attn.", "attn1.to_").replace("cross_attn.", "attn2.to_")
                .replace("norm3.", "norm2.").replace("ffn.0.", "ffn.net.0.proj.").replace("ffn.2.", "ffn.net.2.")
                .replace("modulation", "scale_shift_table"))
        return f"blocks.{i}.{rest}"
    return k


@pytest.fixture(scope="module")
def model():
    return tiny_dit(seed=3)


@pytest.fixture(scope="module")
def reference_output(model):
    with torch.no_grad():
        return model(**tiny_inputs())


def run(m):
    with torch.no_grad():
        return m(**tiny_inputs())


def sd_of(model):
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


def heads_json(path):
    path.with_name(path.stem + "_config.json").write_text(json.dumps(TINY.to_dict()))


def assert_same(out, ref, atol=1e-5):
    # Same weights; only BLAS kernel choice (memory alignment of loaded tensors) differs: ~4e-6.
    torch.testing.assert_close(out.video, ref.video, atol=atol, rtol=0)
    torch.testing.assert_close(out.semantic, ref.semantic, atol=atol, rtol=0)


def test_official_safetensors_with_metadata_config(tmp_path, model, reference_output):
    save_dit(model, tmp_path / "sama.safetensors")
    loaded = load_dit(tmp_path / "sama.safetensors")
    assert loaded.config == TINY
    assert not any(p.is_meta for p in loaded.parameters())
    assert_same(run(loaded), reference_output)


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model."])
@pytest.mark.parametrize("dtype,atol", [(torch.float16, 3e-2), (torch.bfloat16, 2e-1)])
def test_comfyui_prefixed_half_precision(tmp_path, model, reference_output, prefix, dtype, atol):
    path = tmp_path / "comfy.safetensors"
    save_file({prefix + k: v.to(dtype) for k, v in sd_of(model).items()}, str(path))
    heads_json(path)
    loaded = load_dit(path, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    # Exactly the model with half-rounded weights:
    expected = tiny_dit(seed=3)
    expected.load_state_dict({k: v.to(dtype).float() for k, v in sd_of(model).items()})
    assert_same(run(loaded), run(expected))
    assert_same(run(loaded), reference_output, atol=atol)


def test_fp8_e4m3fn_loads_as_the_rounded_model(tmp_path, model):
    sd = sd_of(model)
    fp8 = {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v) for k, v in sd.items()}
    path = tmp_path / "fp8.safetensors"
    save_file(fp8, str(path), metadata={"sama_config": TINY.to_json()})
    loaded = load_dit(path, dtype=torch.float32)
    expected = tiny_dit(seed=3)
    expected.load_state_dict({k: v.float() for k, v in fp8.items()})
    assert_same(run(loaded), run(expected))


def test_scaled_fp8_is_dequantised_with_its_scales(tmp_path, model, reference_output):
    sd = sd_of(model)
    out = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for k, v in sd.items():
        if v.ndim == 2 and k.endswith(".weight"):
            scale = v.abs().max() / 448.0
            out[k] = (v / scale).to(torch.float8_e4m3fn)
            out[k[:-6] + "scale_weight"] = scale.reshape(1)
            out[k[:-6] + "scale_input"] = torch.ones(1)
        else:
            out[k] = v
    path = tmp_path / "scaled.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in out.items()}, str(path),
              metadata={"sama_config": TINY.to_json()})
    loaded = load_dit(path, dtype=torch.float32)
    for k, v in loaded.state_dict().items():
        if v.ndim == 2 and k.endswith(".weight"):
            manual = out[k].float() * out[k[:-6] + "scale_weight"]
            assert torch.equal(v, manual), k
    # fp8 has a 3-bit mantissa: outputs agree with the exact model only loosely (relative 1e-1).
    got = run(loaded)
    rel = (got.video - reference_output.video).norm() / reference_output.video.norm()
    assert rel < 0.1


def test_diffusers_names(tmp_path, model, reference_output):
    sd = {to_diffusers_name(k): v for k, v in sd_of(model).items()}
    assert "blocks.0.attn1.to_q.weight" in sd and "scale_shift_table" in sd
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 2, "attention_head_dim": 32}))
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert_same(run(load_dit(tmp_path)), reference_output)


def test_sharded_with_index_and_sama_layered_on_top(tmp_path, model, reference_output):
    sd = sd_of(model)
    base = {k: v for k, v in sd.items() if not k.startswith(SAMA_KEY_PREFIXES)}
    sama = {k: v for k, v in sd.items() if k.startswith(SAMA_KEY_PREFIXES)}
    keys = sorted(base)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    base_dir = tmp_path / "wan"
    base_dir.mkdir()
    for name, ks in shards.items():
        save_file({k: base[k] for k in ks}, str(base_dir / name))
    index = base_dir / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    (base_dir / "config.json").write_text(json.dumps({"dim": 64, "num_heads": 2, "model_type": "t2v"}))
    # The SAMA file may repeat base weights (it is loaded with strict=False on top): later files win.
    sama_file = tmp_path / "sama_only.safetensors"
    save_file({**sama, "head.head.bias": base["head.head.bias"]}, str(sama_file))
    assert_same(run(load_dit([index, sama_file])), reference_output)
    assert_same(run(load_dit([base_dir, sama_file])), reference_output)
    # The base alone is a Wan2.1 model: refused with the fix, or loaded as plain Wan when asked.
    with pytest.raises(SamaModelFileError, match="Wan2.1 base model.*load the SAMA weights on top"):
        load_dit(index)
    plain = load_dit(index, allow_plain_wan=True)
    assert not plain.config.has_sama and not hasattr(plain, "semantic_head")


def test_pth_through_weights_only(tmp_path, model, reference_output):
    path = tmp_path / "sama.pth"
    torch.save(sd_of(model), path)
    heads_json(path)
    assert_same(run(load_dit(path)), reference_output)


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > /tmp/sama_pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"blocks.0.x": _Evil()}, f)
    with pytest.raises(SamaModelFileError, match="weights_only=True"):
        load_dit(path)


def test_truncated_safetensors(tmp_path, model):
    path = tmp_path / "cut.safetensors"
    save_dit(model, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SamaModelFileError, match="truncated or corrupt"):
        load_dit(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SamaModelFileError, match="not a readable safetensors"):
        load_dit(path)


@pytest.mark.parametrize("keys,what", [
    (["encoder.conv1.weight", "decoder.head.0.gamma"], "Wan VAE"),
    (["encoder.block.0.layer.0.SelfAttention.q.weight", "shared.weight"], "T5/UMT5 text encoder"),
    (["model.diffusion_model.input_blocks.0.0.weight"], "Stable Diffusion UNet"),
    (["vision_model.embeddings.patch_embedding.weight"], "vision encoder"),
    (["double_blocks.0.img_attn.qkv.weight"], "Flux"),
])
def test_wrong_architecture_is_named(tmp_path, keys, what):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    with pytest.raises(SamaModelFileError, match=f"not a Wan2.1/SAMA DiT.*{what}"):
        load_dit(path)


def test_missing_files_and_shards(tmp_path):
    with pytest.raises(SamaFileNotFoundError, match="model file not found"):
        load_dit(tmp_path / "nope.safetensors")
    index = tmp_path / "x.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "x-00001-of-00002.safetensors"}}))
    with pytest.raises(SamaFileNotFoundError, match="lists shards that are not in"):
        load_dit(index)


def test_wrong_shapes_give_a_short_key_report(tmp_path, model):
    sd = sd_of(model)
    del sd["blocks.1.ffn.0.weight"], sd["blocks.0.ffn.0.weight"]
    sd["blocks.0.extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path), metadata={"sama_config": TINY.to_json()})
    with pytest.raises(SamaModelFileError) as e:
        load_dit(path)
    assert "blocks.0.ffn.0.weight" in str(e.value) or "ffn.0.weight" in str(e.value)


def test_infer_config_from_shapes(model):
    cfg = infer_config(model.state_dict(), num_heads=2)
    assert cfg == TINY
    with pytest.raises(SamaModelFileError, match="cannot infer the number of attention heads"):
        infer_config(model.state_dict())


def test_infer_config_of_14b_shapes_without_weights():
    from sama_core.config import PRESETS
    from sama_core.model import SamaDiT
    with torch.device("meta"):
        sd = SamaDiT(PRESETS["14B"]).state_dict()
    assert infer_config(sd) == PRESETS["14B"]
    assert sum(v.numel() for v in sd.values()) > 14e9


def test_info_command(tmp_path, model, capsys):
    path = tmp_path / "sama.safetensors"
    save_dit(model, path)
    assert cli(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "+ SAMA" in out and "all keys matched" in out and "semantic_head yes" in out
    base = tmp_path / "base.safetensors"
    save_file({k: v for k, v in sd_of(model).items() if not k.startswith(SAMA_KEY_PREFIXES)}, str(base),
              metadata={"sama_config": TINY.to_json()})
    assert cli(["info", str(base)]) == 1
    out = capsys.readouterr().out
    assert "semantic_head MISSING" in out and "load the SAMA weights on top" in out
    assert cli(["info", str(base), str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sama_parts"]["semantic_head"] is True


def test_download_dry_run_plan(tmp_path, capsys):
    assert cli(["download", "--dry-run", "--json", "--dir", str(tmp_path)]) == 0
    plan = json.loads(capsys.readouterr().out)
    repos = {p["repo_id"] for p in plan}
    assert {"syxbb/SAMA-14B", "Wan-AI/Wan2.1-T2V-14B"} <= repos
    assert all(p["dest"].startswith(str(tmp_path)) for p in plan)
    assert any(p["dest"].endswith("vae") for p in plan) and any(p["dest"].endswith("text_encoders") for p in plan)
    flat = [f for p in plan for f in p.get("files", [])]
    assert str(tmp_path / "vae" / "wan_2.1_vae.safetensors") in flat
    assert str(tmp_path / "text_encoders" / "umt5_xxl_fp16.safetensors") in flat
    assert not any(tmp_path.iterdir())  # nothing downloaded


def test_nan_weights_are_named_at_load(tmp_path, model):
    sd = sd_of(model)
    sd["blocks.1.cross_attn.k.weight"][0, 0] = float("inf")
    path = tmp_path / "nan.safetensors"
    save_file(sd, str(path), metadata={"sama_config": TINY.to_json()})
    with pytest.raises(SamaModelFileError, match=r"NaN/inf values in 1 tensor.*blocks.1.cross_attn.k.weight"):
        load_dit(path)


def test_a_lora_given_as_the_dit_is_named(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 64),
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(64, 2)}, str(path))
    with pytest.raises(SamaModelFileError, match="is a LoRA, not a DiT.*--lora"):
        load_dit(path)


def test_one_shard_stands_for_the_whole_set(tmp_path, model, reference_output):
    sd = sd_of(model)
    keys = sorted(sd)
    names = [f"diffusion_pytorch_model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    for i, name in enumerate(names):
        save_file({k: sd[k] for k in keys[i::3]}, str(tmp_path / name), metadata={"sama_config": TINY.to_json()})
    # Without an index (the shards alone) and with one: picking any shard loads the whole model.
    assert_same(run(load_dit(tmp_path / names[1])), reference_output)
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: names[i % 3] for i, k in enumerate(keys)}}))
    assert_same(run(load_dit(tmp_path / names[0])), reference_output)
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").unlink()
    (tmp_path / names[2]).unlink()
    with pytest.raises(SamaFileNotFoundError, match="one of 3 shards"):
        load_dit(tmp_path / names[0])


def test_text_len_of_a_small_model_round_trips_through_the_file(tmp_path, model, reference_output):
    """SamaConfig.text_len (not visible in any shape) travels in the file's metadata: the loaded model pads
    to it, which changes the output against Wan's 512 rows; longer prompts are cut at it."""
    import dataclasses
    short = dataclasses.replace(TINY, text_len=16)
    save_dit(model, tmp_path / "short.safetensors", config=short)
    loaded = load_dit(tmp_path / "short.safetensors")
    assert loaded.config == short
    out = run(loaded)
    assert_same(out, run(tiny_dit(short, seed=3)))
    assert (out.video - reference_output.video).abs().max() > 1e-4  # 16 rows are not 512 rows
    inputs = tiny_inputs()
    longer = dict(inputs, context=torch.cat([inputs["context"], torch.randn(1, 20, TINY.text_dim)], 1))
    with torch.no_grad():
        cut = loaded(**dict(longer, context=longer["context"][:, :16]))
        full = loaded(**longer)
    torch.testing.assert_close(full.video, cut.video)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_a_bad_text_len_in_the_metadata_is_named(tmp_path, model, bad):
    from safetensors.torch import save_file
    save_file(sd_of(model), str(tmp_path / "bad.safetensors"),
              metadata={"format": "pt", "sama_config": json.dumps({**TINY.to_dict(), "text_len": bad})})
    with pytest.raises(SamaModelFileError, match="text_len must be a positive integer"):
        load_dit(tmp_path / "bad.safetensors")
