"""Tests for sama_core.prompts and sama_core.text (UMT5 text encoder).

A tiny random UMT5 and a tiny sentencepiece tokenizer are built here and saved in every file layout
the loader accepts; every layout must give the output of an independent computation: the original
model run on ids the test tokenizes itself, padded to 512, with rows after the real length zeroed.
"""

import io
import os
import pathlib
import random
import subprocess
import sys
import textwrap

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import sentencepiece
import torch
from safetensors.torch import save_file
from transformers import T5Config, T5EncoderModel, T5Tokenizer, UMT5Config, UMT5EncoderModel

from sama_core.errors import SamaFileNotFoundError, SamaInputError, SamaModelFileError
from sama_core.prompts import EDIT_PREFIX, NEGATIVE_PROMPT, clean_prompt, edit_prompt, negative_prompt
from sama_core.text import (
    TEXT_LEN,
    TextEncoder,
    UMT5Tokenizer,
    infer_umt5_config,
    load_text_encoder,
    resolve_dtype,
    wan_t5_key_to_transformers,
)

EOS, PAD = 1, 0
WORDS = ("the a cat dog red blue car bicycle video edit make turn into sky green person walking "
         "running snow winter summer replace with remove add hat style painting night").split()
PROMPTS = ["make the cat red", "Replace the car with a blue bicycle and turn the sky green at night"]

# ----------------------------------------------------------------------------------------------
# fixtures: tokenizer, model, and the model saved in every layout
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spiece_bytes():
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    corpus += ["[Video edit] " + p for p in PROMPTS] + ["Replace, remove; add!"]
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buffer, vocab_size=64, hard_vocab_limit=False,
        pad_id=PAD, eos_id=EOS, unk_id=2, bos_id=-1, byte_fallback=False, minloglevel=2,
    )
    return buffer.getvalue()


@pytest.fixture(scope="module")
def sp(spiece_bytes):
    return sentencepiece.SentencePieceProcessor(model_proto=spiece_bytes)


@pytest.fixture(scope="module")
def config(sp):
    # Like the real model, the embedding is a bit larger than the tokenizer (256384 vs 256300).
    return UMT5Config(
        vocab_size=sp.get_piece_size() + 5, d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6,
    )


@pytest.fixture(scope="module")
def model(config):
    torch.manual_seed(0)
    m = UMT5EncoderModel(config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger than the default init so every weight matters in the output
        for name, p in m.named_parameters():
            if "layer_norm" not in name:
                p.normal_(0.0, 0.15, generator=generator)
    return m


def hf_state_dict(model):
    """transformers names, without the tied copy (what ComfyUI's files hold)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k != "encoder.embed_tokens.weight"}


def to_wan_names(state_dict):
    """The test's own Wan naming (wan/modules/t5.py T5Encoder, shared_pos=False)."""
    block_parts = {
        "layer.0.layer_norm.weight": "norm1.weight",
        "layer.0.SelfAttention.q.weight": "attn.q.weight",
        "layer.0.SelfAttention.k.weight": "attn.k.weight",
        "layer.0.SelfAttention.v.weight": "attn.v.weight",
        "layer.0.SelfAttention.o.weight": "attn.o.weight",
        "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
        "layer.1.layer_norm.weight": "norm2.weight",
        "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",  # gelu branch
        "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",  # linear branch
        "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
    }
    out = {}
    for key, value in state_dict.items():
        if key == "shared.weight":
            out["token_embedding.weight"] = value
        elif key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = value
        else:
            _, _, index, rest = key.split(".", 3)
            out[f"blocks.{index}.{block_parts[rest]}"] = value
    return out


def is_linear_weight(key):
    return key.endswith((".q.weight", ".k.weight", ".v.weight", ".o.weight",
                         "wi_0.weight", "wi_1.weight", "wo.weight"))


def fp8_scaled(state_dict):
    """ComfyUI's scaled fp8 layout: linear weights stored as weight / scale in e4m3, plus scales.

    Returns (file dict, the weights the stored values stand for)."""
    stored, dequantised = {}, {}
    for key, value in state_dict.items():
        if is_linear_weight(key):
            scale = value.abs().max() / 448.0  # e4m3's largest finite value: use its whole range
            q = (value / scale).to(torch.float8_e4m3fn)
            stored[key] = q
            stored[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
            stored[key[: -len("weight")] + "scale_input"] = torch.ones(())
            dequantised[key] = q.to(torch.float32) * scale
        else:
            stored[key] = value
            dequantised[key] = value
    stored["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return stored, dequantised


def model_with(config, state_dict):
    """An independent fp32 UMT5 with the given weights (tied embedding set by strict loading)."""
    m = UMT5EncoderModel(config).eval()
    full = dict(state_dict)
    full["encoder.embed_tokens.weight"] = full["shared.weight"]
    m.load_state_dict({k: v.to(torch.float32) for k, v in full.items()}, strict=True)
    return m


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, model, config, spiece_bytes):
    """{name: (path, tokenizer_path or None, fp32 model the layout must reproduce)}."""
    root = tmp_path_factory.mktemp("umt5_layouts")
    sd = hf_state_dict(model)
    spiece_tensor = torch.frombuffer(bytearray(spiece_bytes), dtype=torch.uint8)
    out = {}

    hf = root / "hf"
    model.save_pretrained(hf)
    (hf / "spiece.model").write_bytes(spiece_bytes)
    out["hf_folder"] = (hf, None, model)

    # HF folder whose tokenizer is a transformers tokenizer.json (the reference's tokenizer path)
    hf_json = root / "hf_json"
    model.save_pretrained(hf_json)
    sp_dir = root / "sp_only"
    sp_dir.mkdir()
    (sp_dir / "spiece.model").write_bytes(spiece_bytes)
    T5Tokenizer.from_pretrained(sp_dir, extra_ids=0).save_pretrained(hf_json)
    assert (hf_json / "tokenizer.json").exists() and not (hf_json / "spiece.model").exists()
    out["hf_folder_tokenizer_json"] = (hf_json, None, model)

    comfy = root / "umt5_xxl_fp32.safetensors"
    save_file({**sd, "spiece_model": spiece_tensor}, str(comfy))
    out["comfy_fp32"] = (comfy, None, model)

    comfy_bf16 = root / "umt5_xxl_bf16.safetensors"
    bf16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    save_file({**bf16, "spiece_model": spiece_tensor}, str(comfy_bf16))
    out["comfy_bf16"] = (comfy_bf16, None, model_with(config, bf16))

    comfy_fp8 = root / "umt5_xxl_fp8_e4m3fn.safetensors"
    fp8 = {k: (v.to(torch.float8_e4m3fn) if is_linear_weight(k) else v) for k, v in sd.items()}
    save_file({**fp8, "spiece_model": spiece_tensor}, str(comfy_fp8))
    out["comfy_fp8"] = (comfy_fp8, None, model_with(config, fp8))

    comfy_scaled = root / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    stored, dequantised = fp8_scaled(sd)
    save_file({**stored, "spiece_model": spiece_tensor}, str(comfy_scaled))
    out["comfy_fp8_scaled"] = (comfy_scaled, None, model_with(config, dequantised))

    # ComfyUI file without an embedded tokenizer: the tokenizer path comes from the user
    comfy_no_tok = root / "umt5_no_tokenizer.safetensors"
    save_file(sd, str(comfy_no_tok))
    out["comfy_user_tokenizer"] = (comfy_no_tok, sp_dir / "spiece.model", model)

    # Wan's model folder: models_t5_umt5-xxl-enc-bf16.pth + google/umt5-xxl tokenizer beside it
    wan = root / "Wan2.1-T2V-tiny"
    (wan / "google" / "umt5-xxl").mkdir(parents=True)
    (wan / "google" / "umt5-xxl" / "spiece.model").write_bytes(spiece_bytes)
    torch.save(to_wan_names(sd), wan / "models_t5_umt5-xxl-enc-bf16.pth")
    out["wan_pth"] = (wan / "models_t5_umt5-xxl-enc-bf16.pth", None, model)
    out["wan_folder"] = (wan, None, model)
    return out


def reference_embeddings(model, sp, prompts, text_len=TEXT_LEN):
    """Independent computation: clean, sentencepiece ids + EOS truncated to text_len, pad to
    text_len, masked forward over all text_len positions, zero the rows after each real length."""
    rows = []
    for p in prompts:
        text = " ".join(p.split())
        rows.append(sp.encode(text)[: text_len - 1] + [EOS])
    ids = torch.full((len(rows), text_len), PAD)
    mask = torch.zeros((len(rows), text_len), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden * mask[..., None], [len(r) for r in rows]


@pytest.fixture(scope="module")
def encoder(layouts):
    path, _, _ = layouts["comfy_fp32"]
    return TextEncoder.from_path(path, dtype="fp32")


# ----------------------------------------------------------------------------------------------
# prompts.py
# ----------------------------------------------------------------------------------------------


def test_clean_prompt_fixes_text_and_collapses_whitespace():
    assert clean_prompt("  make\tthe\n\n cat   red  ") == "make the cat red"
    assert clean_prompt("salt &amp;amp; pepper") == "salt & pepper"  # double-escaped HTML
    assert clean_prompt("caf\u00c3\u00a9 scene") == "café scene"  # mojibake repaired by ftfy
    with pytest.raises(SamaInputError, match="must be a string"):
        clean_prompt(None)


def test_edit_prompt_prefix_rules():
    assert EDIT_PREFIX == "[Video edit] " and NEGATIVE_PROMPT == "[Video edit]"
    assert edit_prompt("  make the   cat red ") == "[Video edit] make the cat red"
    assert edit_prompt("make the cat red", prefix=False) == "make the cat red"
    for empty in ("", "   \n\t "):
        with pytest.raises(SamaInputError, match="edit instruction is empty"):
            edit_prompt(empty)


def test_negative_prompt_rules():
    assert negative_prompt() == "[Video edit]"
    assert negative_prompt(prefix=False) == ""
    # a user negative is used as given (cleaned, no prefix) with the prefix on or off; the released
    # code ignored it with the prefix off
    assert negative_prompt("  blurry,   low quality ") == "blurry, low quality"
    assert negative_prompt("blurry", prefix=False) == "blurry"
    assert negative_prompt("   ") == "[Video edit]"  # blank means "not given"


# ----------------------------------------------------------------------------------------------
# loading every layout
# ----------------------------------------------------------------------------------------------

LAYOUTS = ["hf_folder", "hf_folder_tokenizer_json", "comfy_fp32", "comfy_bf16", "comfy_fp8",
           "comfy_fp8_scaled", "comfy_user_tokenizer", "wan_pth", "wan_folder"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_gives_the_reference_output(layouts, sp, layout):
    path, tokenizer_path, expected_model = layouts[layout]
    enc = load_text_encoder(path, tokenizer_path=tokenizer_path, dtype="fp32")
    got = enc.encode(PROMPTS)
    expected, _ = reference_embeddings(expected_model, sp, PROMPTS)
    assert got.shape == (2, TEXT_LEN, 32) and got.dtype == torch.float32
    # Same fp32 weights, same math; only the padded length of the forward pass differs (the real
    # rows run at the batch's longest prompt, the reference at 512): float rounding only.
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)
    assert enc.model.encoder.embed_tokens.weight is enc.model.shared.weight  # tied after loading


def test_all_full_precision_layouts_agree_exactly(layouts):
    outs = [load_text_encoder(layouts[name][0], tokenizer_path=layouts[name][1], dtype="fp32").encode(PROMPTS)
            for name in ("hf_folder", "comfy_fp32", "comfy_user_tokenizer", "wan_pth", "wan_folder")]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def test_scaled_fp8_error_is_what_e4m3_rounding_explains(layouts, sp, model, config):
    """Scaled fp8 against the full-precision model, with a tolerance derived in the test.

    (The exact dequantisation, weight * scale_weight, is checked in the layout test above.)
    For small weight perturbations the output error grows linearly with the rounding unit of the
    weights: 2^-9 for bf16 (8 significant bits), 2^-4 for e4m3 (4 significant bits), a ratio of 32.
    The model's amplification is measured here by rounding the same linear weights to bf16; the
    fp8 file must stay within 32x that error. Ignoring the scales (stored values = w / scale, with
    scale ~ 1e-3) would be off by a factor of hundreds.
    """
    path, _, _ = layouts["comfy_fp8_scaled"]
    got = load_text_encoder(path, dtype="fp32").encode(PROMPTS)
    full, lengths = reference_embeddings(model, sp, PROMPTS)
    bf16_linear = {k: (v.to(torch.bfloat16) if is_linear_weight(k) else v)
                   for k, v in hf_state_dict(model).items()}
    bf16, _ = reference_embeddings(model_with(config, bf16_linear), sp, PROMPTS)
    for i, n in enumerate(lengths):
        fp8_error = (got[i, :n] - full[i, :n]).norm() / full[i, :n].norm()
        bf16_error = (bf16[i, :n] - full[i, :n]).norm() / full[i, :n].norm()
        assert 0 < fp8_error < 32 * bf16_error, (fp8_error, bf16_error)


_COMFY_SCRIPT = textwrap.dedent("""
    import sys, torch
    comfy_dir, out_dir = sys.argv[1], sys.argv[2]
    sys.path.insert(0, comfy_dir)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.ops, comfy.text_encoders.t5
    from safetensors.torch import save_file
    config = {"d_ff": 64, "d_kv": 16, "d_model": 32, "dense_act_fn": "gelu_pytorch_tanh",
              "is_gated_act": True,
              "layer_norm_epsilon": 1e-6, "model_type": "umt5", "num_heads": 2, "num_layers": 2,
              "vocab_size": 80, "relative_attention_num_buckets": 32}
    model = comfy.text_encoders.t5.T5(config, torch.float32, "cpu", comfy.ops.manual_cast)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            random_weight = torch.randn(p.shape, generator=generator) * 0.15
            p.copy_(torch.ones_like(p) if "layer_norm" in name else random_weight)
    ids, mask = torch.load(out_dir + "/ids.pt", weights_only=True)
    with torch.no_grad():
        hidden = model(ids, mask)[0]
    torch.save(hidden, out_dir + "/expected.pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out_dir + "/umt5_comfy.safetensors")
""")


def test_comfyui_own_umt5_file_gives_comfyuis_output(tmp_path, sp, spiece_bytes):
    """A file written from ComfyUI's own UMT5 module (run in a subprocess so ComfyUI's globals stay
    out of this test session) gives ComfyUI's output at the real positions."""
    from conftest import comfyui_dir

    comfy = comfyui_dir()
    if comfy is None or not (comfy / "comfy" / "text_encoders" / "t5.py").exists():
        pytest.skip("ComfyUI tree not found (set COMFYUI_DIR)")
    rows = [sp.encode(p) + [EOS] for p in PROMPTS]
    ids = torch.zeros(2, TEXT_LEN, dtype=torch.long)
    mask = torch.zeros(2, TEXT_LEN, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    torch.save((ids, mask), tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", _COMFY_SCRIPT, str(comfy), str(tmp_path)], check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120, capture_output=True)
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    (tmp_path / "spiece.model").write_bytes(spiece_bytes)
    enc = load_text_encoder(tmp_path / "umt5_comfy.safetensors", tokenizer_path=tmp_path / "spiece.model",
                            dtype="fp32")
    got = enc.encode(PROMPTS)
    for i, r in enumerate(rows):
        # two implementations of the same math (ComfyUI's attention vs transformers'): float rounding
        torch.testing.assert_close(got[i, : len(r)], expected[i, : len(r)], atol=2e-5, rtol=1e-4)
        assert torch.count_nonzero(got[i, len(r):]) == 0


def test_infer_config_from_shapes(layouts, config):
    from safetensors import safe_open

    with safe_open(str(layouts["comfy_fp32"][0]), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k != "spiece_model"}
    inferred = infer_umt5_config(shapes)
    for field in ("vocab_size", "d_model", "d_ff", "num_layers", "num_heads", "d_kv",
                  "relative_attention_num_buckets", "relative_attention_max_distance", "dense_act_fn",
                  "is_gated_act"):
        assert getattr(inferred, field) == getattr(config, field), field


def test_real_umt5_xxl_config_from_wan_shapes():
    """The shapes of Wan's models_t5_umt5-xxl-enc-bf16.pth (wan/modules/t5.py umt5_xxl: dim 4096,
    ffn 10240, 64 heads, 24 layers, 32 buckets, vocab 256384) give UMT5-XXL's real config, and a
    meta-device model of that config has exactly those shapes (no memory used)."""
    dim, ffn, heads, layers, buckets, vocab = 4096, 10240, 64, 24, 32, 256384
    wan_shapes = {"token_embedding.weight": (vocab, dim), "norm.weight": (dim,)}
    for i in range(layers):
        for part, shape in {"norm1.weight": (dim,), "attn.q.weight": (dim, dim), "attn.k.weight": (dim, dim),
                            "attn.v.weight": (dim, dim), "attn.o.weight": (dim, dim),
                            "pos_embedding.embedding.weight": (buckets, heads), "norm2.weight": (dim,),
                            "ffn.gate.0.weight": (ffn, dim), "ffn.fc1.weight": (ffn, dim),
                            "ffn.fc2.weight": (dim, ffn)}.items():
            wan_shapes[f"blocks.{i}.{part}"] = shape
    shapes = {wan_t5_key_to_transformers(k): v for k, v in wan_shapes.items()}
    config = infer_umt5_config(shapes)
    assert (config.d_model, config.d_ff, config.num_layers, config.num_heads, config.d_kv, config.vocab_size,
            config.relative_attention_num_buckets, config.is_gated_act, config.dense_act_fn) == (
        4096, 10240, 24, 64, 64, 256384, 32, True, "gelu_new")
    with torch.device("meta"):
        built = UMT5EncoderModel(config)
    built_shapes = {k: tuple(v.shape) for k, v in built.state_dict().items()
                    if k != "encoder.embed_tokens.weight"}
    assert built_shapes == shapes


def test_wan_key_mapping_is_inverse_of_the_test_naming(model):
    sd = hf_state_dict(model)
    wan = to_wan_names(sd)
    assert {wan_t5_key_to_transformers(k) for k in wan} == set(sd)
    assert wan_t5_key_to_transformers("blocks.0.unknown.weight") is None


# ----------------------------------------------------------------------------------------------
# 512 rows, zeros after the real length, truncation
# ----------------------------------------------------------------------------------------------


def test_zero_rows_after_each_samples_real_length(encoder, sp):
    out = encoder.encode(PROMPTS)
    lengths = [len(sp.encode(p)) + 1 for p in PROMPTS]  # real length includes EOS
    assert lengths[0] != lengths[1]
    for i, n in enumerate(lengths):
        assert torch.count_nonzero(out[i, n:]) == 0
        assert bool((out[i, :n].abs().sum(-1) > 0).all())  # every real row, EOS included, is set
        # batching with a different-length prompt does not change a sample
        alone = encoder.encode([PROMPTS[i]])
        torch.testing.assert_close(out[i], alone[0], atol=2e-6, rtol=1e-5)


def test_512_rows_for_short_and_long_prompts_and_truncation(encoder, sp, model):
    long_prompt = " ".join(WORDS * 40)
    long_ids = sp.encode(long_prompt)
    assert len(long_ids) > 2 * TEXT_LEN
    out = encoder.encode(["cat", long_prompt])
    assert out.shape == (2, TEXT_LEN, 32)
    assert torch.count_nonzero(out[1].abs().sum(-1)) == TEXT_LEN  # no zero row: 511 tokens + EOS
    # explicit truncation, computed independently
    ids = torch.tensor([long_ids[: TEXT_LEN - 1] + [EOS]])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    torch.testing.assert_close(out[1:2], expected, atol=2e-6, rtol=1e-5)
    ids_row, mask_row = encoder.tokenize([long_prompt])
    assert ids_row.shape == (1, TEXT_LEN) and ids_row[0, -1] == EOS and bool(mask_row.all())


def test_text_len_is_configurable(layouts, sp, model):
    enc = load_text_encoder(layouts["comfy_fp32"][0], dtype="fp32", text_len=8)
    prompt = "replace the red car with a blue bicycle at night"
    assert len(sp.encode(prompt)) > 8
    expected, _ = reference_embeddings(model, sp, [prompt, "cat"], text_len=8)
    torch.testing.assert_close(enc.encode([prompt, "cat"]), expected, atol=2e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# encode_edit, cache, dtypes
# ----------------------------------------------------------------------------------------------


def test_encode_edit_applies_prefix_and_negative(encoder, sp, model):
    cond, uncond = encoder.encode_edit("  make the   cat red ")
    expected, _ = reference_embeddings(model, sp, ["[Video edit] make the cat red", "[Video edit]"])
    torch.testing.assert_close(torch.cat([cond, uncond]), expected, atol=2e-6, rtol=1e-5)

    cond, uncond = encoder.encode_edit("make the cat red", negative="blurry dog", prefix=False)
    expected, _ = reference_embeddings(model, sp, ["make the cat red", "blurry dog"])
    torch.testing.assert_close(torch.cat([cond, uncond]), expected, atol=2e-6, rtol=1e-5)

    _, uncond_empty = encoder.encode_edit("make the cat red", prefix=False)
    assert torch.count_nonzero(uncond_empty[0, 1:]) == 0  # empty prompt: EOS row only
    with pytest.raises(SamaInputError, match="instruction is empty"):
        encoder.encode_edit("   ")


def test_cache_returns_same_embeddings_without_recomputing(layouts):
    enc = load_text_encoder(layouts["comfy_fp32"][0], dtype="fp32", cache_size=2)
    calls = []
    enc.model.register_forward_hook(lambda module, args, kwargs_out: calls.append(1))

    first = enc.encode(["make the cat red"])
    assert len(calls) == 1
    again = enc.encode(["  make the\tcat red "])  # same prompt once cleaned
    assert len(calls) == 1 and torch.equal(first, again)
    again[0, 0, 0] = 123.0  # the caller owns its tensor: the cache is not changed through it
    assert torch.equal(enc.encode(["make the cat red"]), first)

    enc.encode(["make the cat red", "a dog", "a dog"])  # only the new prompt runs, once
    assert len(calls) == 2
    enc.encode(["turn into winter"])  # evicts the least recently used ("make the cat red")
    assert len(calls) == 3
    enc.encode(["a dog"])
    assert len(calls) == 3
    enc.encode(["make the cat red"])
    assert len(calls) == 4

    cond1, uncond1 = enc.encode_edit("paint it blue")
    cond2, uncond2 = enc.encode_edit("paint it blue")
    assert len(calls) == 5 and torch.equal(cond1, cond2) and torch.equal(uncond1, uncond2)
    enc.clear_cache()
    enc.encode_edit("paint it blue")
    assert len(calls) == 6


@pytest.mark.parametrize("dtype,tolerance", [("bf16", 0.05), ("fp16", 5e-3)])
def test_half_precision_compute(layouts, encoder, dtype, tolerance):
    enc = load_text_encoder(layouts["comfy_fp32"][0], dtype=dtype)
    assert enc.dtype == resolve_dtype(dtype)
    out = enc.encode(PROMPTS)
    assert out.dtype == resolve_dtype(dtype) and out.shape == (2, TEXT_LEN, 32)
    full = encoder.encode(PROMPTS)
    # bf16 keeps 8 mantissa bits (2^-8 = 0.4% per rounding), fp16 11 bits (0.05%); through two
    # layers of rounded weights and activations the relative error stays a few times that.
    rel = (out.float() - full).norm() / full.norm()
    assert rel < tolerance, rel
    assert torch.equal(out.float() == 0, full == 0)  # same zero rows
    if dtype == "fp16":  # transformers' fp16 overflow guard: the last projection stays fp32
        assert enc.model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32


def test_dtype_names():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(SamaInputError, match="'fp32', 'bf16' or 'fp16'"):
        resolve_dtype("int8")


def test_tokenizer_json_and_sentencepiece_agree(layouts, spiece_bytes):
    from_json = UMT5Tokenizer.from_path(layouts["hf_folder_tokenizer_json"][0])
    from_sp = UMT5Tokenizer.from_sentencepiece(spiece_bytes, "test")
    for text in PROMPTS + ["[Video edit] make the cat red", "Replace, remove; add!", ""]:
        assert from_json(text) == from_sp(text)
    assert from_json.eos_id == from_sp.eos_id == EOS


# ----------------------------------------------------------------------------------------------
# refusing bad files
# ----------------------------------------------------------------------------------------------


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save({"token_embedding.weight": torch.zeros(2, 2), "x": _RunsCodeWhenUnpickled(str(marker))}, evil)
    with pytest.raises(SamaModelFileError, match=r"Refused to load .*weights_only=True.*safetensors"):
        load_text_encoder(evil, dtype="fp32")
    assert not marker.exists()


def test_corrupt_files_are_reported(tmp_path):
    not_pickle = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    not_pickle.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(SamaModelFileError, match="Could not read .* as a PyTorch weight file"):
        load_text_encoder(not_pickle)
    truncated = tmp_path / "umt5_xxl_fp16.safetensors"
    truncated.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(SamaModelFileError, match="not a readable safetensors file"):
        load_text_encoder(truncated)


def test_wrong_kind_of_file_is_named(tmp_path, spiece_bytes):
    dit = tmp_path / "wan2.1_t2v_14B_bf16.safetensors"
    save_file({"patch_embedding.weight": torch.zeros(4, 16, 1, 2, 2),
               "blocks.0.self_attn.q.weight": torch.zeros(4, 4)}, str(dit))
    with pytest.raises(SamaModelFileError, match="not a UMT5-XXL text encoder.*Wan video diffusion model"):
        load_text_encoder(dit)

    vae = tmp_path / "wan_2.1_vae.safetensors"
    save_file({"encoder.conv1.weight": torch.zeros(4, 3, 3, 3, 3),
               "decoder.head.0.gamma": torch.zeros(4, 1, 1, 1)}, str(vae))
    with pytest.raises(SamaModelFileError, match="looks like a VAE"):
        load_text_encoder(vae)

    # a T5 v1.1 encoder (Flux/SD3's t5xxl): position bias in the first layer only
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16,
                                 feed_forward_proj="gated-gelu"))
    t5_file = tmp_path / "t5xxl_fp16.safetensors"
    save_file({k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"},
              str(t5_file))
    with pytest.raises(SamaModelFileError, match="T5 / mT5 text encoder"):
        load_text_encoder(t5_file)

    hf_t5 = tmp_path / "t5_folder"
    t5.save_pretrained(hf_t5)
    with pytest.raises(SamaModelFileError, match="'t5' model, not 'umt5'"):
        load_text_encoder(hf_t5)


def test_missing_paths_and_tokenizer(tmp_path, layouts):
    with pytest.raises(SamaFileNotFoundError, match="does not exist"):
        load_text_encoder(tmp_path / "nope.safetensors")
    with pytest.raises(SamaFileNotFoundError, match="Tokenizer path"):
        load_text_encoder(layouts["comfy_fp32"][0], tokenizer_path=tmp_path / "no_tokenizer")
    alone = tmp_path / "alone"
    alone.mkdir()
    path = alone / "umt5.safetensors"
    path.write_bytes(pathlib.Path(layouts["comfy_user_tokenizer"][0]).read_bytes())
    with pytest.raises(SamaInputError, match="Pass tokenizer_path"):
        load_text_encoder(path, dtype="fp32")
    with pytest.raises(SamaModelFileError, match="folder without a text encoder"):
        load_text_encoder(tmp_path / "alone")


def test_tokenizer_larger_than_model_vocab_is_refused(tmp_path, model, spiece_bytes):
    small = {k: v for k, v in hf_state_dict(model).items()}
    small["shared.weight"] = small["shared.weight"][:10].contiguous()
    path = tmp_path / "small_vocab.safetensors"
    spiece_tensor = torch.frombuffer(bytearray(spiece_bytes), dtype=torch.uint8)
    save_file({**small, "spiece_model": spiece_tensor}, str(path))
    with pytest.raises(SamaModelFileError, match="do not belong together"):
        load_text_encoder(path, dtype="fp32")
