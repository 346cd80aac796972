"""The DiT's named behaviours, checked against the independent re-implementation in reference_wan.py."""

import pytest
import torch

from sama_core.errors import SamaInputError
from sama_core.model import SamaDiT
from sama_core.rope import apply_rope, rope_band_dims, sequence_frequencies
from reference_wan import rope_real, reference_wan_t2v
from tiny_models import TINY, TINY_WAN, tiny_dit, tiny_inputs


# ------------------------------------------------------------------ tests

def test_plain_wan_matches_independent_reference():
    model = tiny_dit(TINY_WAN)
    inp = tiny_inputs(TINY_WAN)
    with torch.no_grad():
        ours = model(inp["target"], inp["timestep"], inp["context"]).video
        ref = reference_wan_t2v(model.state_dict(), TINY_WAN, inp["target"], inp["timestep"], inp["context"])
    assert ours.shape == (1, 16, 2, 8, 8)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_sama_target_only_is_wan_plus_target_segment():
    model = tiny_dit(TINY)
    inp = tiny_inputs(TINY)
    sd = model.state_dict()
    with torch.no_grad():
        ours = model(inp["target"], inp["timestep"], inp["context"]).video
        ref = reference_wan_t2v(sd, TINY, inp["target"], inp["timestep"], inp["context"],
                                segment_bias=sd["segment_embedding.weight"][2])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_shapes_and_determinism(dtype):
    model = tiny_dit().to(dtype)
    inp = {k: v.to(dtype) for k, v in tiny_inputs(batch=2, frames=3, size=6).items()}
    with torch.no_grad():
        a = model(**inp)
        b = model(**inp)
    assert a.video.shape == (2, 16, 3, 6, 6) and a.video.dtype == dtype
    assert a.semantic.shape == (2, 5, TINY.siglip_dim) and a.semantic.dtype == dtype
    assert torch.equal(a.video, b.video) and torch.equal(a.semantic, b.semantic)
    assert torch.isfinite(a.video.float()).all()


def test_semantic_tokens_have_zero_q_and_k_after_rope():
    model = tiny_dit()
    inp = tiny_inputs()
    seen = []
    attn = model.blocks[0].self_attn.attention

    def record(q, k, v):
        seen.append((q.clone(), k.clone()))
        return attn(q, k, v)
    model.blocks[0].self_attn.attention = record
    with torch.no_grad():
        model(**inp)
    q, k = seen[0]
    n_src = 2 * 4 * 4  # (F=2, 8/2, 8/2) source tokens come first
    sem = slice(n_src, n_src + 5)
    assert torch.count_nonzero(q[:, sem]) == 0 and torch.count_nonzero(k[:, sem]) == 0
    assert torch.count_nonzero(q[:, :n_src]) > 0 and torch.count_nonzero(k[:, n_src + 5:]) > 0


def test_source_and_target_rope_grids_both_start_at_origin():
    freqs = sequence_frequencies(32, source_grid=(2, 3, 3), num_semantic=4, target_grid=(2, 3, 3))
    assert torch.equal(freqs[:18], freqs[22:])
    assert torch.count_nonzero(freqs[18:22]) == 0
    assert torch.equal(freqs[0], torch.ones(16, dtype=torch.complex128))  # position (0,0,0) = no rotation
    assert rope_band_dims(128) == (44, 42, 42) and rope_band_dims(32) == (12, 10, 10)


def test_rope_rotates_adjacent_pairs_like_the_real_formula():
    x = torch.randn(1, 2 * 3 * 4, 2, 32)
    ours = apply_rope(x, sequence_frequencies(32, target_grid=(2, 3, 4)))
    torch.testing.assert_close(ours, rope_real(x, (2, 3, 4), 32), atol=1e-6, rtol=1e-6)


def test_permuting_semantic_tokens_permutes_their_predictions_only():
    model = tiny_dit()
    inp = tiny_inputs(num_semantic=6)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        a = model(**inp)
        b = model(**{**inp, "semantic_tokens": inp["semantic_tokens"][:, perm]})
    torch.testing.assert_close(b.semantic, a.semantic[:, perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.video, a.video, atol=1e-5, rtol=1e-5)


def test_source_changes_the_output():
    model = tiny_dit()
    inp = tiny_inputs()
    with torch.no_grad():
        a = model(**inp).video
        b = model(**{**inp, "source": inp["source"] + 1.0}).video
        c = model(**{**inp, "source": None}).video
    assert (a - b).abs().max() > 1e-3 and (a - c).abs().max() > 1e-3


def test_text_rows_are_padded_or_truncated_to_512():
    model = tiny_dit()
    inp = tiny_inputs(text_rows=9)
    padded = torch.cat([inp["context"], torch.zeros(1, 503, TINY.text_dim)], 1)
    long = torch.cat([padded, torch.randn(1, 88, TINY.text_dim)], 1)  # 600 rows
    with torch.no_grad():
        short_out = model(**inp).video
        padded_out = model(**{**inp, "context": padded}).video
        long_out = model(**{**inp, "context": long}).video
    assert torch.equal(short_out, padded_out)
    assert torch.equal(long_out, padded_out)


def test_bf16_runs_see_the_rounded_timestep_fp32_runs_do_not():
    model = tiny_dit()
    inp = tiny_inputs()
    with torch.no_grad():
        fp32_a = model(**{**inp, "timestep": torch.tensor([937.5])}).video
        fp32_b = model(**{**inp, "timestep": torch.tensor([936.0])}).video
        bf = model.to(torch.bfloat16)
        inp16 = {k: v.to(torch.bfloat16) for k, v in inp.items() if k != "timestep"}
        bf_a = bf(**inp16, timestep=torch.tensor([937.5])).video
        bf_b = bf(**inp16, timestep=torch.tensor([936.0])).video
    assert torch.equal(bf_a, bf_b)  # 937.5 rounds to 936 in bf16
    assert not torch.equal(fp32_a, fp32_b)


def test_gradient_checkpointing_gives_the_same_gradients():
    inp = tiny_inputs()
    grads = []
    for ckpt in (False, True):
        model = tiny_dit().train()
        model.gradient_checkpointing = ckpt
        out = model(**inp)
        (out.video.square().mean() + out.semantic.square().mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_math_and_sdpa_attention_backends_agree():
    inp = tiny_inputs()
    with torch.no_grad():
        a = tiny_dit(attention_backend="auto")(**inp)
        b = tiny_dit(attention_backend="math")(**inp)
    torch.testing.assert_close(a.video, b.video, atol=1e-5, rtol=1e-5)


def test_bad_inputs_get_clear_errors():
    model = tiny_dit()
    inp = tiny_inputs()
    with pytest.raises(SamaInputError, match="semantic tokens must be"):
        model(**{**inp, "semantic_tokens": torch.randn(1, 65, 1152)})
    with pytest.raises(SamaInputError, match="target latents must be"):
        model(**{**inp, "target": torch.randn(1, 4, 2, 8, 8)})
    with pytest.raises(SamaInputError, match="plain Wan2.1 model"):
        tiny_dit(TINY_WAN)(**inp)
    with pytest.raises(SamaInputError, match="unknown attention backend 'fast'"):
        SamaDiT(TINY, attention_backend="fast")
    with pytest.raises(SamaInputError, match="needs the 'flash-attn' package"):
        SamaDiT(TINY, attention_backend="flash_attn")


def test_fast_rope_matches_exact_rope_and_keeps_semantic_qk_zero():
    from sama_core.rope import apply_rope_real, real_frequencies
    freqs = sequence_frequencies(32, source_grid=(2, 3, 3), num_semantic=4, target_grid=(2, 3, 3))
    x = torch.randn(1, freqs.shape[0], 2, 32)
    fast = apply_rope_real(x, *real_frequencies(freqs))
    torch.testing.assert_close(fast, apply_rope(x, freqs), atol=1e-6, rtol=1e-6)
    assert torch.count_nonzero(fast[:, 18:22]) == 0
    inp = tiny_inputs()
    with torch.no_grad():
        exact = tiny_dit()(**inp)
        approx = tiny_dit(rope="fast")(**inp)
    torch.testing.assert_close(approx.video, exact.video, atol=1e-5, rtol=1e-5)
    with pytest.raises(SamaInputError, match="rope must be"):
        SamaDiT(TINY, rope="quick")
