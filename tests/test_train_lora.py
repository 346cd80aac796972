"""train.lora: peft adapters on the DiT, the saved key format, loading through sama_core's merge_lora and
ComfyUI's LoRA loader (same weights as peft's own merge), and a LoRA training run end to end."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import comfyui_dir
from sama_core.loading import load_dit, merge_lora, save_dit
from tiny_models import TINY, TINY_WAN, tiny_dit, tiny_inputs
from train.config import LoRAConfig
from train.lora import apply_lora, base_state_dict, lora_state_dict, merged_state_dict, save_lora

ADAPTED = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
           "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py


def lora_model(rank=4, alpha=8.0, seed=0):
    """Tiny DiT with adapters whose B is random too (peft starts B at zero, which would hide mistakes)."""
    model = tiny_dit()
    names = apply_lora(model, LoRAConfig(enabled=True, rank=rank, alpha=alpha))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model, names


def test_adapters_go_on_every_attention_and_ffn_linear_and_only_they_train():
    model, names = lora_model()
    assert sorted(names) == sorted(f"blocks.{i}.{m}" for i in range(TINY.num_layers) for m in ADAPTED)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(names)


def test_saved_keys_are_the_comfyui_format():
    model, names = lora_model(rank=4, alpha=8.0)
    sd = lora_state_dict(model)
    assert len(sd) == 3 * len(names)
    name = "blocks.1.cross_attn.v"
    assert sd[f"diffusion_model.{name}.lora_A.weight"].shape == (4, TINY.dim)
    assert sd[f"diffusion_model.{name}.lora_B.weight"].shape == (TINY.dim, 4)
    assert sd[f"diffusion_model.{name}.alpha"].item() == 8.0
    assert sd["diffusion_model.blocks.0.ffn.0.lora_B.weight"].shape == (TINY.ffn_dim, 4)


def test_merge_lora_reproduces_peft_merged_weights(tmp_path):
    model, names = lora_model(rank=4, alpha=6.0)
    path = save_lora(model, tmp_path / "lora.safetensors")
    plain = tiny_dit()  # the same base weights, no adapters
    assert merge_lora(plain, path) == len(names)

    peft_merged = copy.deepcopy(model)
    for module in peft_merged.modules():
        if hasattr(module, "merge") and hasattr(module, "lora_A"):
            module.merge()
    for name in names:
        expected = peft_merged.get_submodule(name).base_layer.weight
        torch.testing.assert_close(plain.get_submodule(name).weight, expected, rtol=1e-6, atol=1e-7)
    merged_sd = merged_state_dict(model)
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(merged_sd[name], value, rtol=1e-6, atol=1e-7)

    # and the adapted model's output is what the merged plain model computes, different from the base
    inputs = tiny_inputs()
    with torch.no_grad():
        out_lora = model(**inputs)
        out_merged = plain(**inputs)
        out_base = tiny_dit()(**inputs)
    torch.testing.assert_close(out_merged.video, out_lora.video, rtol=1e-5, atol=1e-5)
    assert (out_lora.video - out_base.video).abs().max() > 1e-3


def test_base_state_dict_has_official_names():
    model, _ = lora_model()
    sd = base_state_dict(model)
    assert set(sd) == set(tiny_dit().state_dict())
    for name, value in tiny_dit().state_dict().items():
        assert torch.equal(sd[name], value)


def test_comfyui_lora_loader_applies_the_same_delta(tmp_path):
    root = comfyui_dir()
    if root is None or not (root / "comfy").is_dir():
        pytest.skip("ComfyUI not found: set COMFYUI_DIR (default ../shared/ComfyUI)")
    model, names = lora_model(rank=3, alpha=5.0)
    path = save_lora(model, tmp_path / "lora.safetensors")
    base = tiny_dit()
    weights = {f"diffusion_model.{n}.weight": base.get_submodule(n).weight.detach() for n in names}
    torch.save(weights, tmp_path / "weights.pt")
    script = f"""
import json, sys, torch
sys.path.insert(0, {str(root)!r})
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.lora, comfy.utils
lora = comfy.utils.load_torch_file({str(path)!r}, safe_load=True)
weights = torch.load({str(tmp_path / "weights.pt")!r}, weights_only=True)
# ComfyUI's generic key map: "diffusion_model.<module>" -> "diffusion_model.<module>.weight"
key_map = {{k[: -len(".weight")]: k for k in weights}}
patches = comfy.lora.load_lora(lora, key_map)
out = {{}}
for key, adapter in patches.items():
    w = comfy.lora.calculate_weight([(1.0, adapter, 1.0, None, None)], weights[key].clone(), key)
    out[key] = w.tolist()
print(json.dumps({{"patched": sorted(patches), "weights": out}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lora key not loaded" not in proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["patched"] == sorted(weights)
    merge_lora(base, path)
    for name in names:
        comfy_weight = torch.tensor(result["weights"][f"diffusion_model.{name}.weight"])
        torch.testing.assert_close(comfy_weight, base.get_submodule(name).weight.detach(), rtol=1e-5, atol=1e-6)


def test_lora_training_run_exports_an_adapter_that_changes_the_output(tmp_path):
    from test_train_loop import loop_config, write_cache
    from train.loop import LORA_FILE, train
    init = tmp_path / "init.safetensors"
    save_dit(tiny_dit(), init, TINY)
    cfg = loop_config(tmp_path, model={"init_from": str(init), "config": None},
                      lora={"enabled": True, "rank": 4, "alpha": 4.0}, optim={"lr": 5e-3},
                      checkpoint={"every": 4})
    write_cache(cfg)
    result = train(cfg)
    exported = result.export / LORA_FILE
    sd = load_file(str(exported))
    assert all(k.startswith("diffusion_model.blocks.") for k in sd)
    meta = json.loads(__import__("safetensors").safe_open(str(exported), "pt").metadata()["sama_lora"])
    assert meta["rank"] == 4 and meta["ema"] is True
    # base weights untouched by training: the checkpoint's base equals the initial file
    ckpt = load_file(str(result.output_dir / "checkpoint-4" / "model.safetensors"))
    assert torch.equal(ckpt["blocks.0.self_attn.q.base_layer.weight"], tiny_dit().blocks[0].self_attn.q.weight)
    model = load_dit(init)
    inputs = tiny_inputs()
    with torch.no_grad():
        before = model(**inputs).video
        assert merge_lora(model, exported) == 2 * 10
        after = model(**inputs).video
    assert (after - before).abs().max() > 1e-4


def test_lora_on_a_wan_base_also_exports_the_new_sama_parts(tmp_path):
    from test_train_loop import loop_config, write_cache
    from train.loop import LORA_FILE, PARTS_FILE, train
    base = tmp_path / "base.safetensors"
    save_dit(tiny_dit(TINY_WAN), base, TINY_WAN)
    cfg = loop_config(tmp_path, model={"init_from": str(base), "config": None, "gradient_checkpointing": True},
                      lora={"enabled": True, "rank": 2}, train={"max_steps": 2}, checkpoint={"every": 2})
    write_cache(cfg)
    result = train(cfg)
    parts = load_file(str(result.export / PARTS_FILE))
    assert {k.split(".")[0] for k in parts} == {"segment_embedding", "siglip_feat_mlp", "semantic_head"}
    assert parts["segment_embedding.weight"].abs().max() > 0  # started at zero, trained in full
    model = load_dit([base, result.export / PARTS_FILE])  # base + the SAMA parts trained in full
    assert model.config.has_sama and model.config.siglip_dim == TINY.siglip_dim
    merge_lora(model, result.export / LORA_FILE)
    with torch.no_grad():
        out = model(**tiny_inputs())
    assert torch.isfinite(out.video).all() and out.semantic.shape == (1, 5, TINY.siglip_dim)
