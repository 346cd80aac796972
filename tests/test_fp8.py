"""fp8 block linears (torch._scaled_mm): accuracy against the exact model, loading fp8 files unexpanded."""

import pytest
import torch
from safetensors.torch import save_file

from sama_core.fp8 import E4M3, Fp8Linear, convert_block_linears, quantize
from sama_core.loading import load_dit, save_dit
from tiny_models import TINY, tiny_dit, tiny_inputs


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("rowwise", [False, True])
def test_fp8_linear_matches_the_dequantised_product(rowwise):
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=g))
    q = Fp8Linear.from_linear(linear, rowwise=rowwise)
    assert q.weight.dtype == E4M3 and q.weight_scale.shape == ((48, 1) if rowwise else (1, 1))
    x = torch.randn(2, 7, 64, generator=g)
    # Against the same product with the activations quantised the same way, computed in float32:
    xq, xs = quantize(x.reshape(-1, 64), rowwise)
    manual = (xq.float() * xs) @ q.dequantized_weight().t() + linear.bias
    torch.testing.assert_close(q(x).reshape(-1, 48), manual, atol=1e-4, rtol=1e-4)
    assert rel(q(x), linear(x)) < 0.08  # e4m3 has a 3-bit mantissa


def test_converted_model_stays_close_to_the_exact_one():
    model = tiny_dit(seed=1)
    inp = tiny_inputs()
    with torch.no_grad():
        exact = model(**inp)
        n = convert_block_linears(model, "tensor")
        approx = model(**inp)
    assert n == TINY.num_layers * 10
    assert rel(approx.video, exact.video) < 0.1 and rel(approx.semantic, exact.semantic) < 0.1


@pytest.mark.parametrize("mode", ["tensor", "row"])
def test_scaled_fp8_file_loads_without_upcasting(tmp_path, mode):
    model = tiny_dit(seed=2)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    stored = {"scaled_fp8": torch.zeros(0, dtype=E4M3)}
    for k, v in sd.items():
        if k.startswith("blocks.") and v.ndim == 2:
            values, scale = quantize(v, rowwise=False)
            stored[k], stored[k[:-6] + "scale_weight"] = values, scale.reshape(1)
        else:
            stored[k] = v
    path = tmp_path / "scaled.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in stored.items()}, str(path),
              metadata={"sama_config": TINY.to_json()})
    loaded = load_dit(path, fp8=mode, dtype=torch.float32)
    q = loaded.blocks[0].self_attn.q
    assert isinstance(q, Fp8Linear) and q.weight.dtype == E4M3
    if mode == "tensor":  # the file's fp8 values are used as they are
        assert torch.equal(q.weight.view(torch.uint8), stored["blocks.0.self_attn.q.weight"].view(torch.uint8))
    exact = load_dit(path, dtype=torch.float32)  # dequantised
    inp = tiny_inputs()
    with torch.no_grad():
        assert rel(loaded(**inp).video, exact(**inp).video) < 0.1
    fp8_bytes = sum(p.numel() * p.element_size() for n, p in loaded.named_parameters() if p.dtype == E4M3)
    assert fp8_bytes > 0.9 * sum(p.numel() for n, p in loaded.named_parameters() if ".ffn." in n or "_attn." in n
                                 and n.endswith("weight") and p.ndim == 2)


def test_full_precision_file_is_quantised_while_loading(tmp_path):
    model = tiny_dit(seed=3)
    path = tmp_path / "fp32.safetensors"
    save_dit(model, path)
    loaded = load_dit(path, fp8="row")
    assert all(isinstance(loaded.blocks[i].ffn[0], Fp8Linear) for i in range(TINY.num_layers))
    inp = tiny_inputs()
    with torch.no_grad():
        assert rel(loaded(**inp).video, model(**inp).video) < 0.1
