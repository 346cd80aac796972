"""The shared checkpoint reader and the key-name identification of model kinds (sama_core/checkpoints.py)."""

import os
import pickle

import pytest
import safetensors
import torch
from safetensors.torch import save_file
from tiny_models import TINY, TINY_WAN

from sama_core.checkpoints import (
    KINDS,
    CheckpointFile,
    describe_checkpoint,
    identify_checkpoint,
    load_pickle_state_dict,
    read_state_dict,
)
from sama_core.config import SAMA_KEY_PREFIXES
from sama_core.errors import SamaModelFileError

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def tensors(*keys):
    """Distinct small tensors, one per key, so a mixed-up key shows in a comparison."""
    return {k: torch.arange(6, dtype=torch.float32).reshape(2, 3) + 10 * i for i, k in enumerate(keys)}


def assert_same_tensors(got, expected):
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


@pytest.fixture
def tensor_reads(monkeypatch):
    """Every key safe_open's get_tensor is asked for, in order (a spy around the real safe_open)."""
    calls = []
    real_safe_open = safetensors.safe_open

    class SpySafeOpen:
        def __init__(self, *args, **kwargs):
            self._file = real_safe_open(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self._file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            return self._file.__exit__(*exc_info)

        def get_tensor(self, key):
            calls.append(key)
            return self._file.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", SpySafeOpen)
    return calls


def meta_keys(build):
    """Parameter and buffer names of a model built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return list(build().state_dict())


# ----------------------------------------------------------------------------------------------
# identification: one minimal key list per kind
# ----------------------------------------------------------------------------------------------

MINIMAL_KEYS = {
    "lora": ["diffusion_model.blocks.0.self_attn.q.lora_A.weight",
             "diffusion_model.blocks.0.self_attn.q.lora_B.weight"],
    "sama_dit": ["blocks.0.self_attn.q.weight", "siglip_feat_mlp.0.weight"],
    "wan_vace": ["vace_blocks.0.after_proj.weight", "blocks.0.self_attn.q.weight"],
    "wan_i2v": ["blocks.0.cross_attn.k_img.weight", "blocks.0.self_attn.q.weight"],
    "wan_vae": ["encoder.conv1.weight", "decoder.head.0.gamma"],
    "wan_vae_diffusers": ["encoder.conv_in.weight", "encoder.down_blocks.0.norm1.gamma"],
    "flux": ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"],
    "sd_unet": ["model.diffusion_model.input_blocks.0.0.weight"],
    "sd_vae": ["first_stage_model.encoder.down.0.block.0.conv1.weight"],
    "openai_clip_vision": ["vision_model.embeddings.class_embedding",
                           "vision_model.embeddings.patch_embedding.weight"],
    "vision": ["vision_model.embeddings.patch_embedding.weight"],
    "clip_text": ["text_model.embeddings.token_embedding.weight"],
    "umt5": ["shared.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
             "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"],
    "t5_shared_bias": ["shared.weight",
                       "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                       "encoder.block.1.layer.0.SelfAttention.q.weight"],
    "wan_umt5": ["token_embedding.weight", "blocks.0.pos_embedding.embedding.weight",
                 "blocks.1.pos_embedding.embedding.weight"],
    "wan_t5_shared_bias": ["token_embedding.weight", "pos_embedding.embedding.weight",
                           "blocks.0.attn.q.weight"],
    "t5": ["shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"],
    "llm": ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"],
    "wan_dit": ["model.diffusion_model.blocks.0.self_attn.q.weight",
                "model.diffusion_model.head.head.weight"],
}


def test_every_kind_has_a_minimal_example():
    assert sorted(MINIMAL_KEYS) == sorted(kind.name for kind in KINDS)
    assert len({kind.name for kind in KINDS}) == len(KINDS)


@pytest.mark.parametrize("name", list(MINIMAL_KEYS))
def test_each_kind_is_recognised_from_a_minimal_key_list(name):
    kind = identify_checkpoint(MINIMAL_KEYS[name])
    assert kind is not None and kind.name == name
    assert describe_checkpoint(MINIMAL_KEYS[name]) == kind.what


def test_unrecognised_keys_give_none():
    assert identify_checkpoint(["foo.bar", "baz"]) is None
    assert describe_checkpoint([]) is None


@pytest.mark.parametrize("name,words", [
    ("wan_vae", "a Wan VAE"),
    ("t5", "a T5/UMT5 text encoder"),
    ("umt5", "UMT5"),
    ("t5_shared_bias", "T5 / mT5 text encoder"),
    ("wan_t5_shared_bias", "shared position bias, not UMT5"),
    ("openai_clip_vision", "OpenAI-CLIP-style vision encoder (class token), not SigLIP"),
    ("vision", "vision encoder"),
    ("sd_unet", "a Stable Diffusion UNet"),
    ("sd_vae", "image VAE"),
    ("flux", "a Flux model"),
    ("lora", "a LoRA"),
    ("sama_dit", "SAMA DiT"),
    ("wan_dit", "Wan video diffusion model (Wan DiT)"),
    ("wan_i2v", "image-to-video"),
    ("llm", "Llama/Qwen"),
])
def test_descriptions_use_the_words_the_loaders_messages_rely_on(name, words):
    assert words in describe_checkpoint(MINIMAL_KEYS[name])


# The finer distinctions, from the key names of real (tiny) library models rather than hand-made lists.

def test_umt5_and_t5_are_told_apart_by_the_position_bias_of_every_layer():
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    small = dict(vocab_size=32, d_model=8, d_ff=16, num_layers=2, num_heads=2, d_kv=4)
    umt5 = meta_keys(lambda: UMT5EncoderModel(UMT5Config(**small)))
    t5 = meta_keys(lambda: T5EncoderModel(T5Config(**small)))
    assert identify_checkpoint(umt5).name == "umt5"
    assert identify_checkpoint(t5).name == "t5_shared_bias"
    # ComfyUI's t5xxl / umt5xxl files carry the same names under a prefix
    assert identify_checkpoint(["text_encoders.t5xxl.transformer." + k for k in t5]).name == "t5_shared_bias"


def test_siglip_and_openai_clip_vision_are_told_apart_by_the_class_token():
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipConfig,
        SiglipModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    vision = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                  image_size=8, patch_size=4)
    siglip = meta_keys(lambda: SiglipVisionModel(SiglipVisionConfig(**vision)))
    clip = meta_keys(lambda: CLIPVisionModel(CLIPVisionConfig(**vision)))
    assert identify_checkpoint(siglip).name == "vision"
    assert identify_checkpoint(["vision_model." + k for k in siglip]).name == "vision"  # ComfyUI's layout
    assert identify_checkpoint(clip).name == "openai_clip_vision"
    # a full SiglipModel also holds a text tower: it is still the vision encoder
    text = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=16)
    full = meta_keys(lambda: SiglipModel(SiglipConfig(text_config=text, vision_config=vision)))
    assert any(k.startswith("text_model.") for k in full)
    assert identify_checkpoint(full).name == "vision"
    clip_text = meta_keys(lambda: CLIPTextModel(CLIPTextConfig(**text, bos_token_id=0, eos_token_id=1)))
    assert identify_checkpoint(clip_text).name == "clip_text"  # transformers 5 names
    assert identify_checkpoint(["text_model." + k for k in clip_text]).name == "clip_text"  # ComfyUI's clip_l


def test_sama_dit_and_plain_wan_dit_are_told_apart():
    from sama_core.model import SamaDiT

    sama = meta_keys(lambda: SamaDiT(TINY))
    wan = meta_keys(lambda: SamaDiT(TINY_WAN))
    assert any(k.startswith(SAMA_KEY_PREFIXES) for k in sama)
    assert not any(k.startswith(SAMA_KEY_PREFIXES) for k in wan)
    assert identify_checkpoint(sama).name == "sama_dit"
    assert identify_checkpoint(wan).name == "wan_dit"
    assert identify_checkpoint(["model.diffusion_model." + k for k in wan]).name == "wan_dit"  # ComfyUI


def test_diffusers_wan_transformer_is_a_wan_dit():
    from diffusers import WanTransformer3DModel

    keys = meta_keys(lambda: WanTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                   out_channels=4, text_dim=8, freq_dim=8, ffn_dim=16,
                                                   num_layers=1))
    assert identify_checkpoint(keys).name == "wan_dit"


def test_vaes_are_told_apart_by_layout():
    from diffusers import AutoencoderKL, AutoencoderKLWan

    from sama_core.vae import original_layout_key_names

    wan_diffusers = meta_keys(lambda: AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4],
                                                       num_res_blocks=2, attn_scales=[],
                                                       temperal_downsample=[False, True, True]))
    sd_diffusers = meta_keys(lambda: AutoencoderKL(block_out_channels=(8,), norm_num_groups=4,
                                                   latent_channels=4))
    assert identify_checkpoint(original_layout_key_names(8)).name == "wan_vae"
    assert identify_checkpoint(wan_diffusers).name == "wan_vae_diffusers"
    # diffusers' SD VAE shares encoder.down_blocks / conv_in with the Wan one, but has no RMS-norm gamma
    assert identify_checkpoint(sd_diffusers).name == "sd_vae"


def test_stable_diffusion_unet_in_both_layouts():
    from diffusers import UNet2DConditionModel

    keys = meta_keys(lambda: UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
        cross_attention_dim=8, attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))
    assert identify_checkpoint(keys).name == "sd_unet"  # diffusers names: down_blocks.N
    # a full original-layout SD checkpoint: UNet and VAE in one file is named by its UNet
    full = ["model.diffusion_model.input_blocks.0.0.weight",
            "first_stage_model.encoder.down.0.block.0.conv1.weight",
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    assert identify_checkpoint(full).name == "sd_unet"


def test_llama_style_language_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    keys = meta_keys(lambda: LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
                                                          num_hidden_layers=1, num_attention_heads=2)))
    assert identify_checkpoint(keys).name == "llm"


def test_a_lora_is_named_before_the_model_it_patches():
    # kohya (ComfyUI) names, and peft names on a SAMA DiT
    assert identify_checkpoint(["lora_unet_blocks_0_self_attn_q.lora_down.weight",
                                "lora_unet_blocks_0_self_attn_q.alpha"]).name == "lora"
    assert identify_checkpoint(["siglip_feat_mlp.0.lora_A.weight"]).name == "lora"


# ----------------------------------------------------------------------------------------------
# reading safetensors
# ----------------------------------------------------------------------------------------------

def test_safetensors_round_trip_with_metadata(tmp_path):
    expected = tensors("b.weight", "a.weight")
    path = tmp_path / "x.safetensors"
    save_file(expected, str(path), metadata={"sama_config": "{}", "format": "pt"})
    got, metadata = read_state_dict(path)
    assert metadata == {"sama_config": "{}", "format": "pt"}
    assert_same_tensors(dict(sorted(got.items())), dict(sorted(expected.items())))


def test_check_keys_runs_on_the_names_before_any_tensor_is_read(tmp_path, tensor_reads):
    path = tmp_path / "huge_dit.safetensors"
    expected = tensors("blocks.0.self_attn.q.weight", "head.head.weight")
    save_file(expected, str(path))
    seen = []

    class WrongFile(Exception):
        pass

    def refuse(keys):
        seen.append(sorted(keys))
        raise WrongFile("not the VAE")

    with pytest.raises(WrongFile, match="not the VAE"):  # the check's own error, not re-wrapped
        read_state_dict(path, check_keys=refuse)
    assert seen == [sorted(expected)]
    assert tensor_reads == []
    # the spy does see reads when the check passes
    got, _ = read_state_dict(path, check_keys=lambda keys: None)
    assert sorted(tensor_reads) == sorted(expected)
    assert_same_tensors(dict(sorted(got.items())), dict(sorted(expected.items())))


def test_a_sama_model_file_error_from_check_keys_is_not_reported_as_a_corrupt_file(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(tensors("a"), str(path))

    def refuse(keys):
        raise SamaModelFileError("given as the VAE, but it looks like a DiT")

    with pytest.raises(SamaModelFileError) as error:
        read_state_dict(path, check_keys=refuse)
    assert str(error.value) == "given as the VAE, but it looks like a DiT"


def test_rename_keeps_renamed_tensors_and_never_reads_the_others(tmp_path, tensor_reads):
    path = tmp_path / "siglip_full.safetensors"
    source = tensors("vision_model.a", "text_model.b", "vision_model.c")
    save_file(source, str(path))

    def vision_only(key):
        return key[len("vision_model."):] if key.startswith("vision_model.") else None

    got, _ = read_state_dict(path, rename=vision_only)
    expected = {"a": source["vision_model.a"], "c": source["vision_model.c"]}
    assert_same_tensors(dict(sorted(got.items())), expected)
    assert sorted(tensor_reads) == ["vision_model.a", "vision_model.c"]


def test_shapes_and_keys_without_reading_tensors(tmp_path, tensor_reads):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(3, 5), "b": torch.zeros(7)}, str(path))
    with CheckpointFile(path) as checkpoint:
        assert sorted(checkpoint.keys()) == ["a", "b"]
        assert checkpoint.shape("a") == (3, 5) and checkpoint.shape("b") == (7,)
        assert tensor_reads == []
        assert torch.equal(checkpoint.tensor("b"), torch.zeros(7))
    assert tensor_reads == ["b"]


def test_truncated_or_garbage_safetensors_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file(tensors("a", "b", "c"), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SamaModelFileError, match=r"cut\.safetensors is not a readable safetensors file .*"
                                                 r"truncated or corrupt: download it again"):
        read_state_dict(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SamaModelFileError, match="not a readable safetensors file"):
        read_state_dict(path, check_keys=lambda keys: pytest.fail("a corrupt file has no keys to check"))


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(SamaModelFileError, match="nope.safetensors is not a readable safetensors file"):
        read_state_dict(tmp_path / "nope.safetensors")


# ----------------------------------------------------------------------------------------------
# reading pickles
# ----------------------------------------------------------------------------------------------

class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.mark.parametrize("legacy", [False, True])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, legacy):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    payload = {"blocks.0.x": torch.zeros(2), "y": _RunsCodeWhenUnpickled(str(marker))}
    if legacy:  # plain pickle, not torch's zip format: cannot be memory-mapped, the fallback path
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    else:
        torch.save(payload, str(path))
    refusal = r"Refused to load .*evil\.pth.*could run code.*weights_only=True.*\.safetensors"
    with pytest.raises(SamaModelFileError, match=refusal):
        read_state_dict(path, check_keys=lambda keys: pytest.fail("refused before any key is seen"))
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".ckpt", ".PTH"])
def test_plain_pickles_load_in_zip_and_legacy_formats(tmp_path, suffix):
    expected = tensors("a.weight", "b.bias")
    zipped, legacy = tmp_path / f"zip{suffix}", tmp_path / f"legacy{suffix}"
    torch.save(expected, str(zipped))
    torch.save(expected, str(legacy), _use_new_zipfile_serialization=False)
    for path in (zipped, legacy):
        got, metadata = read_state_dict(path)
        assert metadata == {}
        assert_same_tensors(got, expected)


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": sd, "epoch": 3, "optimizer_name": "adamw"},
    lambda sd: {"model": sd},
    lambda sd: {"module": sd},
    lambda sd: {"vae": sd, "step": 100},
    lambda sd: {"state_dict": {"model": sd}},  # nested twice
])
def test_a_nested_state_dict_is_unwrapped(tmp_path, wrap):
    expected = tensors("encoder.conv1.weight", "decoder.head.0.gamma")
    path = tmp_path / "trainer_checkpoint.pt"
    torch.save(wrap(expected), str(path))
    seen = []
    got, _ = read_state_dict(path, check_keys=seen.append)
    assert seen == [list(expected)]  # the check sees the unwrapped names
    assert_same_tensors(got, expected)


def test_anything_but_a_flat_dict_of_named_tensors_is_refused(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"a.weight": torch.zeros(2), "epoch": 3}, str(path))
    with pytest.raises(SamaModelFileError,
                       match=r"not hold a flat dictionary of named tensors \(entry 'epoch' is a int\)"):
        load_pickle_state_dict(path)
    torch.save([torch.zeros(2)], str(path))
    with pytest.raises(SamaModelFileError, match="holds a list, not a flat dictionary of named tensors"):
        load_pickle_state_dict(path)


def test_truncated_or_garbage_pickle_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save(tensors("a", "b"), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SamaModelFileError, match=r"Could not read .*cut\.pth as a PyTorch weight file.*"
                                                 r"Check that the download finished"):
        read_state_dict(path)
    path.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(SamaModelFileError, match="Could not read .* as a PyTorch weight file"):
        read_state_dict(path)


def test_torch_load_is_always_weights_only_and_memory_mapped_when_possible(tmp_path, monkeypatch):
    calls = []
    real_load = torch.load

    def spy_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy_load)
    zipped, legacy = tmp_path / "zip.pt", tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(1000, dtype=torch.float32)}, str(zipped))
    torch.save({"w": torch.arange(1000, dtype=torch.float32)}, str(legacy),
               _use_new_zipfile_serialization=False)
    with CheckpointFile(zipped) as checkpoint:
        assert checkpoint.keys() == ["w"] and checkpoint.shape("w") == (1000,)
        assert torch.equal(checkpoint.tensor("w"), torch.arange(1000, dtype=torch.float32))
    assert [(c["weights_only"], c.get("mmap")) for c in calls] == [(True, True)]
    calls.clear()
    read_state_dict(legacy)  # cannot be memory-mapped: read again without mmap, still weights-only
    assert [(c["weights_only"], c.get("mmap")) for c in calls] == [(True, True), (True, None)]


# ----------------------------------------------------------------------------------------------
# the loaders refuse a wrong file before reading its tensors
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def dit_file(tmp_path):
    path = tmp_path / "wan2.1_t2v_14B.safetensors"
    save_file(tensors("model.diffusion_model.blocks.0.self_attn.q.weight",
                      "model.diffusion_model.head.head.weight"), str(path))
    return path


@pytest.fixture
def vae_file(tmp_path):
    path = tmp_path / "wan_2.1_vae.safetensors"
    save_file(tensors("encoder.conv1.weight", "decoder.head.0.gamma"), str(path))
    return path


def test_vae_loader_refuses_a_dit_unread(dit_file, tensor_reads):
    from sama_core.vae import load_wan_vae

    with pytest.raises(SamaModelFileError, match="as the Wan2.1 VAE, but it looks like a Wan video"):
        load_wan_vae(dit_file)
    assert tensor_reads == []


def test_siglip_loader_refuses_a_dit_unread(dit_file, tensor_reads):
    from sama_core.anchors import load_siglip_vision

    with pytest.raises(SamaModelFileError, match="SigLIP vision encoder, but it looks like a Wan video"):
        load_siglip_vision(dit_file)
    assert tensor_reads == []


def test_dit_loader_refuses_a_vae_unread(vae_file, tensor_reads):
    from sama_core.loading import load_dit

    with pytest.raises(SamaModelFileError, match="not a Wan2.1/SAMA DiT file: it looks like a Wan VAE"):
        load_dit(vae_file)
    assert tensor_reads == []
