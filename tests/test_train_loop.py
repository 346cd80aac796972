"""train.loop / ema / checkpoint / modeling on a feature cache written by the test (no encoders needed):
EMA formula, overfitting one batch, gradient-accumulation equivalence, a full run with checkpoints and
export, exact resume after a crash, checkpoint rotation, stage 1 from stage 0's export, fresh SAMA parts
on a Wan base, and (slow) two processes against one."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sama_core.errors import SamaInputError
from sama_core.loading import load_dit, save_dit
from sama_core.model import SamaDiT
from tiny_models import TINY, TINY_WAN, randomize, tiny_dit
from train import checkpoint as ckpt
from train.cache import cache_fingerprint, write_feature_cache
from train.config import config_from_dict
from train.ema import EMA
from train.loop import DIT_FILE, FINAL_DIR, optimizer_step, train
from train.modeling import build_dit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    reset_accelerate()
    yield
    reset_accelerate()


def small_dit():
    """The tiny DiT with small random weights (trains stably at a high learning rate)."""
    return randomize(SamaDiT(TINY), seed=0, std=0.05)


def random_samples(n_edit=4, n_raw=4, frames=3, seed=0):
    """Cached-feature samples of the tiny DiT's widths: edits with a source, raw videos with all pretexts."""
    g = torch.Generator().manual_seed(seed)
    shape = (TINY.in_dim, frames, 4, 4)

    def r(*s):
        return torch.randn(*s, generator=g)
    samples = []
    for i in range(n_edit):
        samples.append({"kind": "video_edit", "bucket": f"edit-{4 * frames - 3}x32x32", "target": r(*shape),
                        "source": r(*shape), "text": r(5 + i, TINY.text_dim), "semantic": r(65, TINY.siglip_dim),
                        "valid_latent_frames": frames - (i == 3)})  # one sample with a padded last latent frame
    for i in range(n_raw):
        s = {"kind": "raw_video", "bucket": f"raw-{4 * frames - 3}x32x32", "target": r(*shape),
             "semantic": r(65, TINY.siglip_dim)}
        for p in ("cube", "speed", "tube"):
            s[f"source/{p}"] = r(*shape)
        for p in ("none", "cube", "speed", "tube"):
            s[f"text/{p}"] = r(4 + i, TINY.text_dim)
        samples.append(s)
    return samples


def loop_config(tmp_path, name="run", cache="cache", **sections):
    values = {
        "output_dir": str(tmp_path / name), "seed": 0,
        "model": {"config": TINY.to_dict(), "gradient_checkpointing": False},
        "data": {"cache_dir": str(tmp_path / cache), "num_workers": 0},
        "train": {"batch_size": 2, "max_steps": 4, "mixed_precision": "no"},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "ema": {"decay": 0.9},
        "checkpoint": {"every": 2, "keep": 5},
        "log": {"every": 1, "tensorboard": False, "progress_bar": False},
        "export": {"dtype": "fp32"},
    }
    for section, updates in sections.items():
        values[section] = {**values.get(section, {}), **updates} if isinstance(updates, dict) else updates
    return config_from_dict(values)


def write_cache(cfg, samples=None):
    negative = torch.randn(3, TINY.text_dim, generator=torch.Generator().manual_seed(9))
    return write_feature_cache(cfg.resolve_path(cfg.data.cache_dir), samples or random_samples(),
                               cache_fingerprint(cfg), negative, shard_size=3)


# ------------------------------------------------------------------------------------------------ EMA

def test_ema_follows_its_formula():
    layer = torch.nn.Linear(3, 2)
    ema = EMA(layer.named_parameters(), decay=0.9998)
    start = {n: p.detach().clone() for n, p in layer.named_parameters()}
    expected = dict(start)
    for k in range(3):
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(torch.full_like(p, 0.5 * (k + 1)))
        ema.update(layer.named_parameters())
        for n, p in layer.named_parameters():
            expected[n] = 0.9998 * expected[n] + (1 - 0.9998) * p.detach()
    for n in expected:
        assert ema.shadow[n].dtype == torch.float32
        torch.testing.assert_close(ema.shadow[n], expected[n], rtol=0, atol=1e-7)


def test_ema_keeps_fp32_on_cpu_swaps_and_round_trips():
    layer = torch.nn.Linear(4, 4).to(torch.bfloat16)
    layer.bias.requires_grad_(False)
    ema = EMA(layer.named_parameters(), decay=0.5, device="cpu")
    assert set(ema.shadow) == {"weight"} and ema.shadow["weight"].dtype == torch.float32
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.update(layer.named_parameters())
    raw = layer.weight.detach().clone()
    with ema.swapped_in(layer.named_parameters):
        torch.testing.assert_close(layer.weight.float(), ema.shadow["weight"].to(torch.bfloat16).float())
    assert torch.equal(layer.weight, raw)
    other = EMA(layer.named_parameters(), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow["weight"], ema.shadow["weight"])
    with pytest.raises(ValueError, match="does not match"):
        other.load_state_dict({"bias": torch.zeros(4)})


# --------------------------------------------------------------------------------- optimizer steps

def cached_batch(tmp_path, items):
    from train.cache import CachedFeatureDataset, collate_features
    from train.data import BatchItem
    cfg = loop_config(tmp_path)
    write_cache(cfg)
    ds = CachedFeatureDataset(cfg.resolve_path(cfg.data.cache_dir))
    return collate_features([ds[BatchItem(i, "-", 1000 + i)] for i in items])


def test_a_few_steps_overfit_a_fixed_batch(tmp_path):
    from accelerate import Accelerator
    cfg = loop_config(tmp_path)
    batch = cached_batch(tmp_path, [0, 1])
    accelerator = Accelerator(cpu=True)
    model = small_dit().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    params = list(model.parameters())
    losses = [optimizer_step(accelerator, model, optimizer, [batch], cfg, lambda b: b, params)["loss_sums"][0].item()
              for _ in range(25)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses


def test_optimizer_step_optimises_the_edit_weighted_loss_from_the_config(tmp_path):
    """train.edit_region_weight reaches the trainer: the loss of a step is the edit-weighted loss of the
    model before it (an independent call of train.losses), not the plain one."""
    from accelerate import Accelerator
    from train.losses import training_loss
    batch = cached_batch(tmp_path, [0, 1])
    batch["source"] = batch["target"].clone()
    batch["source"][:, :, 0, 1, 2] += 2.0                # one edited latent position per sample
    reported = {}
    for weight in (0.0, 20.0):
        reset_accelerate()
        cfg = loop_config(tmp_path, train={"edit_region_weight": weight})
        accelerator = Accelerator(cpu=True)
        model = small_dit().train()
        with torch.no_grad():
            expected, _ = training_loss(model, batch, cfg.sigma, cfg.train.semantic_loss_weight,
                                        edit_weight=weight, edit_threshold=cfg.train.edit_region_threshold)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        model, optimizer = accelerator.prepare(model, optimizer)
        sums = optimizer_step(accelerator, model, optimizer, [batch], cfg, lambda b: b, list(model.parameters()))
        reported[weight] = sums["loss_sums"][1].item()
        assert reported[weight] == pytest.approx(expected.video.item(), rel=1e-5)
    assert reported[20.0] != pytest.approx(reported[0.0], rel=1e-3)


def test_keep_masks_in_the_cache_reach_the_loss_with_the_configured_weight(tmp_path, caplog):
    """A cache sample's "keep" (T, h, w) comes back in the collated batch, and train.keep_region_weight
    weights the step's loss with it (an independent call of train.losses)."""
    from accelerate import Accelerator
    from train.cache import CachedFeatureDataset, collate_features
    from train.data import BatchItem
    from train.losses import training_loss
    samples = random_samples(n_edit=2, n_raw=0)
    g = torch.Generator().manual_seed(3)
    masks = [(torch.rand(s["target"].shape[1:], generator=g) > 0.7).float() for s in samples]
    for s, m in zip(samples, masks, strict=True):
        s["keep"] = m
    cfg = loop_config(tmp_path)
    write_cache(cfg, samples)
    ds = CachedFeatureDataset(cfg.resolve_path(cfg.data.cache_dir))
    batch = collate_features([ds[BatchItem(i, "-", 1000 + i)] for i in (0, 1)])
    assert torch.equal(batch["keep"], torch.stack(masks))
    reported = {}
    for weight in (0.0, 10.0):
        reset_accelerate()
        cfg = loop_config(tmp_path, train={"edit_region_weight": 5.0, "keep_region_weight": weight})
        accelerator = Accelerator(cpu=True)
        model = small_dit().train()
        with torch.no_grad():
            expected, _ = training_loss(model, batch, cfg.sigma, cfg.train.semantic_loss_weight, edit_weight=5.0,
                                        edit_threshold=cfg.train.edit_region_threshold, keep_weight=weight)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        model, optimizer = accelerator.prepare(model, optimizer)
        sums = optimizer_step(accelerator, model, optimizer, [batch], cfg, lambda b: b, list(model.parameters()))
        reported[weight] = sums["loss_sums"][1].item()
        assert reported[weight] == pytest.approx(expected.video.item(), rel=1e-5)
    assert reported[10.0] != pytest.approx(reported[0.0], rel=1e-4)  # 10x the agreement asked above
    # a weight with no masks in the cache says so at the start of the run
    reset_accelerate()
    from train.loop import build_training_data
    bare = loop_config(tmp_path, cache="bare", train={"keep_region_weight": 10.0})
    write_cache(bare)
    with caplog.at_level("WARNING", logger="train.loop"):
        build_training_data(bare, Accelerator(cpu=True))
    assert "keep_region_weight is 10 but no sample has a keep mask" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="train.loop"):
        build_training_data(loop_config(tmp_path, train={"keep_region_weight": 10.0}), Accelerator(cpu=True))
    assert "keep mask" not in caplog.text
    # an index written before it recorded the flag (session 10's caches): read from the shards instead
    index_file = cfg.resolve_path(cfg.data.cache_dir) / "cache_index.json"
    index = json.loads(index_file.read_text())
    for s in index["samples"]:
        del s["keep"]
    index_file.write_text(json.dumps(index))
    assert [s["keep"] for s in CachedFeatureDataset(index_file.parent).samples] == [True] * len(samples)
    caplog.clear()
    with caplog.at_level("WARNING", logger="train.loop"):
        build_training_data(loop_config(tmp_path, train={"keep_region_weight": 10.0}), Accelerator(cpu=True))
    assert "keep mask" not in caplog.text
    # a batch where only some samples have a mask: zeros for the others
    samples[1].pop("keep")
    write_cache(loop_config(tmp_path, cache="cache2"), samples)
    ds = CachedFeatureDataset(tmp_path / "cache2")
    mixed = collate_features([ds[BatchItem(i, "-", 1000 + i)] for i in (0, 1)])
    assert torch.equal(mixed["keep"][0], masks[0]) and not mixed["keep"][1].any()


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    from accelerate import Accelerator
    batch = cached_batch(tmp_path, [0, 1])
    halves = [{k: (v[i:i + 1] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()} for i in (0, 1)]
    results = []
    for accum, micro in ((2, halves), (1, [batch])):
        reset_accelerate()
        cfg = loop_config(tmp_path, train={"gradient_accumulation_steps": accum, "batch_size": 2 // accum})
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accum)
        model = small_dit().train()
        # SGD: the update is linear in the gradient, so this compares the accumulated gradients themselves
        # (AdamW would divide tiny rounding differences by tiny second moments)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        model, optimizer = accelerator.prepare(model, optimizer)
        for _ in range(3):
            optimizer_step(accelerator, model, optimizer, micro, cfg, lambda b: b, list(model.parameters()))
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    changed = 0
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=0, atol=1e-6)
        changed += not torch.equal(results[0][name], small_dit().state_dict()[name])
    assert changed > 10


# ---------------------------------------------------------------------------------------- full runs

def test_training_run_logs_checkpoints_and_exports(tmp_path):
    cfg = loop_config(tmp_path)
    write_cache(cfg)
    result = train(cfg)
    assert result.step == 4 and [r["step"] for r in result.history] == [1, 2, 3, 4]
    for row in result.history:
        assert all(torch.isfinite(torch.tensor(row[k])) for k in ("loss", "loss_video", "loss_semantic"))
        assert row["loss"] == pytest.approx(row["loss_video"] + 0.1 * row["loss_semantic"], rel=1e-5)
        assert row["samples_per_s"] > 0 and row["skipped"] == 0
    assert [r["lr"] for r in result.history] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])  # 2 warm-up steps
    lines = (cfg.output_path / "logs" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]
    assert [s for s, _ in ckpt.list_checkpoints(cfg.output_path)] == [2, 4]
    # the export is the EMA of the last checkpoint, loadable as a DiT
    model = load_dit(cfg.output_path / FINAL_DIR / DIT_FILE)
    ema = load_file(str(cfg.output_path / "checkpoint-4" / "ema.safetensors"))
    for name, value in model.state_dict().items():
        assert torch.equal(value, ema[name]), name
    raw = load_file(str(cfg.output_path / "checkpoint-4" / "model.safetensors"))
    assert not torch.equal(raw["head.head.weight"], ema["head.head.weight"])


def test_a_resumed_run_can_add_a_learning_rate_step(tmp_path):
    """optim.decay_from_step/final_lr on resume: the steps before the decay keep optim.lr, the later ones
    train (and log) at final_lr; the pair is refused when only one half is given."""
    cfg = loop_config(tmp_path, train={"max_steps": 2})
    write_cache(cfg)
    train(cfg)
    reset_accelerate()
    longer = loop_config(tmp_path, train={"max_steps": 5}, optim={"decay_from_step": 3, "final_lr": 2e-4})
    result = train(longer, resume="latest")
    # the logged step s ran the update with learning_rate(s - 1): step 3 is the last at optim.lr
    assert [(r["step"], r["lr"]) for r in result.history] == pytest.approx([(3, 1e-3), (4, 2e-4), (5, 2e-4)])
    with pytest.raises(SamaInputError, match="go together"):
        loop_config(tmp_path, optim={"final_lr": 2e-4})
    with pytest.raises(SamaInputError, match="final_lr must be > 0"):
        loop_config(tmp_path, optim={"decay_from_step": 3, "final_lr": 0.0})


def test_prompt_dropout_one_trains_on_the_negative_prompt(tmp_path):
    """train.prompt_dropout = 1 replaces every prompt by the cached negative prompt's rows: the losses equal a
    run without dropout on a cache whose prompts all are those rows (an independent construction)."""
    negative = torch.randn(3, TINY.text_dim, generator=torch.Generator().manual_seed(9))  # = write_cache's
    dropped = loop_config(tmp_path, name="dropped", train={"prompt_dropout": 1.0})
    write_cache(dropped)
    rewritten = []
    for sample in random_samples():
        sample = dict(sample)
        for key in [k for k in sample if k == "text" or k.startswith("text/")]:
            sample[key] = negative.clone()
        rewritten.append(sample)
    plain = loop_config(tmp_path, name="plain", cache="cache_negative")
    write_cache(plain, rewritten)
    a = train(dropped).history
    reset_accelerate()
    b = train(plain).history
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6)
    reset_accelerate()
    with_prompts = train(loop_config(tmp_path, name="with_prompts")).history
    assert [r["loss"] for r in a] != pytest.approx([r["loss"] for r in with_prompts], rel=1e-6)


def test_dropout_copies_source_trains_the_dropped_samples_to_copy_their_source(tmp_path):
    """train.dropout_copies_source with prompt_dropout = 1: every edit becomes "negative prompt -> its own
    source", without a semantic target. The run equals one without dropout on a cache built that way
    (prompts = the negative rows, targets = the sources) with the semantic loss weighted 0."""
    negative = torch.randn(3, TINY.text_dim, generator=torch.Generator().manual_seed(9))  # = write_cache's
    copies = loop_config(tmp_path, name="copies", train={"prompt_dropout": 1.0, "dropout_copies_source": True})
    write_cache(copies, random_samples(n_raw=0))
    rewritten = []
    for sample in random_samples(n_raw=0):
        rewritten.append(dict(sample, text=negative.clone(), target=sample["source"].clone()))
    plain = loop_config(tmp_path, name="plain", cache="cache_copies", train={"semantic_loss_weight": 0.0})
    write_cache(plain, rewritten)
    a = train(copies).history
    reset_accelerate()
    b = train(plain).history
    assert [r["loss_video"] for r in a] == pytest.approx([r["loss_video"] for r in b], rel=1e-6)
    assert all(r["loss_semantic"] == 0 and r["loss"] == r["loss_video"] for r in a)
    reset_accelerate()
    dropped_only = train(loop_config(tmp_path, name="dropped_only", cache="cache",
                                     train={"prompt_dropout": 1.0})).history
    assert [r["loss_video"] for r in a] != pytest.approx([r["loss_video"] for r in dropped_only], rel=1e-3)
    with pytest.raises(SamaInputError, match="prompt_dropout > 0"):
        loop_config(tmp_path, train={"dropout_copies_source": True})
    # a stage-0 pretext batch keeps its target: its source is the corrupted clip
    from train.features import copy_source_where_dropped
    target, source = torch.zeros(2, 4, 3, 4, 4), torch.ones(2, 4, 3, 4, 4)
    pretext = {"target": target, "source": source, "seeds": torch.tensor([1, 2]), "pretext": "cube"}
    assert copy_source_where_dropped(pretext, 1.0) is pretext
    edits = copy_source_where_dropped(dict(pretext, pretext="-"), 1.0)
    assert torch.equal(edits["target"], source) and edits["semantic_mask"].tolist() == [0.0, 0.0]


def test_bf16_mixed_precision_trains_and_exports_bf16(tmp_path):
    fp32 = loop_config(tmp_path, name="fp32", train={"max_steps": 2})
    write_cache(fp32)
    bf16 = loop_config(tmp_path, name="bf16", train={"max_steps": 2, "mixed_precision": "bf16"},
                       export={"dtype": "bf16"})
    reference = train(fp32)
    reset_accelerate()  # one process, one precision: accelerate's state is per process
    result = train(bf16)
    for a, b in zip(reference.history, result.history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.02)  # autocast rounding only
    raw = load_file(str(bf16.output_path / "checkpoint-2" / "model.safetensors"))
    assert raw["head.head.weight"].dtype == torch.float32  # master weights stay fp32
    model = load_dit(result.export / DIT_FILE)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path):
    cfg = loop_config(tmp_path, name="straight")
    write_cache(cfg)
    train(cfg)

    crashed = loop_config(tmp_path, name="crashed")

    def crash(step):
        if step == 3:  # after checkpoint-2, in the middle of the next interval
            raise KeyboardInterrupt("simulated kill")
    with pytest.raises(KeyboardInterrupt):
        train(crashed, on_step=crash)
    assert [s for s, _ in ckpt.list_checkpoints(crashed.output_path)] == [2]
    result = train(crashed, resume="latest")
    assert result.step == 4 and [r["step"] for r in result.history] == [3, 4]
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(cfg.output_path / "checkpoint-4" / name))
        b = load_file(str(crashed.output_path / "checkpoint-4" / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    straight_log = [json.loads(x) for x in (cfg.output_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    resumed_log = [json.loads(x) for x in (crashed.output_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in resumed_log if r["step"] >= 3][-2:] == [r["loss"] for r in straight_log[2:]]


def test_max_minutes_stops_with_a_checkpoint_and_an_export_and_resume_finishes_like_a_straight_run(
        tmp_path, monkeypatch):
    import train.loop as loop
    straight = loop_config(tmp_path, name="straight", train={"max_steps": 6}, checkpoint={"every": 100})
    write_cache(straight)
    train(straight)

    minutes = iter(range(0, 100_000, 60))  # each look at the clock: one more minute
    monkeypatch.setattr(loop, "clock", lambda: float(next(minutes)))
    timed = loop_config(tmp_path, name="timed", train={"max_steps": 6, "max_minutes": 2.5},
                        checkpoint={"every": 100})
    result = train(timed)
    # start at 0 (deadline 150 s); after steps 1, 2, 3 the clock reads 60, 120, 180 -> stop after step 3
    assert result.step == 3 and result.history[-1]["step"] == 3
    assert [s for s, _ in ckpt.list_checkpoints(timed.output_path)] == [3]  # saved although every=100
    assert load_dit(timed.output_path / FINAL_DIR / DIT_FILE) is not None

    monkeypatch.setattr(loop, "clock", lambda: 0.0)  # a new session with time to spare
    resumed = train(timed, resume="latest")
    assert resumed.step == 6
    a = load_file(str(straight.output_path / "checkpoint-6" / "model.safetensors"))
    b = load_file(str(timed.output_path / "checkpoint-6" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("value", [0, -1.0])
def test_max_minutes_must_be_positive(tmp_path, value):
    with pytest.raises(SamaInputError, match="train.max_minutes must be > 0"):
        loop_config(tmp_path, train={"max_minutes": value})


def test_keep_last_checkpoints_and_ignore_partial_ones(tmp_path):
    cfg = loop_config(tmp_path, train={"max_steps": 6}, checkpoint={"every": 1, "keep": 2})
    write_cache(cfg)
    train(cfg)
    assert [s for s, _ in ckpt.list_checkpoints(cfg.output_path)] == [5, 6]
    (cfg.output_path / ".tmp-checkpoint-7").mkdir()         # a crash during a save
    (cfg.output_path / "checkpoint-8").mkdir()              # a folder without trainer_state.json
    assert ckpt.resolve_resume(cfg.output_path, "latest") == cfg.output_path / "checkpoint-6"
    assert ckpt.resolve_resume(tmp_path / "nowhere", "latest") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.resolve_resume(cfg.output_path, str(cfg.output_path / "checkpoint-8"))
    # resuming a finished run with a higher max_steps continues from its last checkpoint
    more = loop_config(tmp_path, train={"max_steps": 7}, checkpoint={"every": 1, "keep": 2})
    assert train(more, resume="latest").history[0]["step"] == 7


def test_stage1_starts_from_the_stage0_export(tmp_path):
    stage0 = loop_config(tmp_path, name="s0", stage="stage0")
    write_cache(stage0)
    exported = train(stage0).export / DIT_FILE
    stage1 = loop_config(tmp_path, name="s1", stage="stage1", model={"init_from": str(exported), "config": None},
                         train={"max_steps": 2})
    built = build_dit(stage1)
    assert built.fresh_modules == []
    reference = load_dit(exported).state_dict()
    for name, value in built.model.state_dict().items():
        assert torch.equal(value, reference[name]), name
    result = train(stage1)
    assert result.step == 2 and (result.export / DIT_FILE).exists()


def test_a_wan_base_gets_fresh_sama_parts(tmp_path):
    base = tiny_dit(TINY_WAN, seed=3)
    save_dit(base, tmp_path / "base.safetensors", TINY_WAN)
    cfg = loop_config(tmp_path, model={"init_from": str(tmp_path / "base.safetensors"), "config": None})
    built = build_dit(cfg)
    assert built.fresh_modules == ["segment_embedding", "siglip_feat_mlp", "semantic_head"]
    model = built.model
    assert model.config.has_sama and model.config.siglip_dim == TINY.siglip_dim  # from the file's metadata
    assert torch.equal(model.segment_embedding.weight, torch.zeros_like(model.segment_embedding.weight))
    for name, value in base.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert all(not p.is_meta for p in model.parameters())


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """Two CPU processes (gloo) vs one process, global batch 4 either way. `accelerate launch --cpu` starts a
    single process unless MPI is set up, so the two processes come from the torchrun launcher
    (`--multi_gpu`) with ACCELERATE_USE_CPU=1."""
    runs = {}
    for name, processes, batch in (("one", 1, 4), ("two", 2, 2)):
        cfg = loop_config(tmp_path, name=name, train={"batch_size": batch, "max_steps": 3},
                          checkpoint={"every": 3}, ema={"enabled": False})
        if name == "one":
            write_cache(cfg, random_samples(n_edit=8, n_raw=0))
        config_path = tmp_path / f"{name}.yaml"
        import yaml
        config_path.write_text(yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if k != "base_dir"}))
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
                   *(["--multi_gpu"] if processes > 1 else []), "--num_machines", "1", "--mixed_precision", "no",
                   "--dynamo_backend", "no", "-m", "train", "stage1", "--config", str(config_path)]
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                   "ACCELERATE_USE_CPU": "1", "PYTHONPATH": REPO})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"{processes} process" in proc.stderr
        runs[name] = cfg.output_path
    logs = {n: [json.loads(x) for x in (p / "logs" / "metrics.jsonl").read_text().splitlines()] for n, p in runs.items()}
    for a, b in zip(logs["one"], logs["two"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    one = load_file(str(runs["one"] / FINAL_DIR / DIT_FILE))
    two = load_file(str(runs["two"] / FINAL_DIR / DIT_FILE))
    # AdamW divides each gradient element by its running RMS, so where a gradient is ~0 the different
    # summation order of two processes can move a weight by a fraction of one step (lr = 1e-3): allow 10%.
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=0, atol=1e-4)


def test_disk_full_during_a_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import errno

    from accelerate import Accelerator
    cfg = loop_config(tmp_path, train={"max_steps": 4}, checkpoint={"every": 2, "keep": 3})
    write_cache(cfg)
    original = Accelerator.save_state

    def full_disk_at_step_4(self, output_dir=None, **kwargs):
        if "checkpoint-4" in str(output_dir):
            original(self, output_dir, **kwargs)  # half of it lands, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir, **kwargs)
    monkeypatch.setattr(Accelerator, "save_state", full_disk_at_step_4)
    with pytest.raises(ckpt.CheckpointWriteError, match=r"No space left.*checkpoint-2\) is intact.*--resume latest"):
        train(cfg)
    assert [s for s, _ in ckpt.list_checkpoints(cfg.output_path)] == [2]
    assert not (cfg.output_path / ".tmp-checkpoint-4").exists()
    monkeypatch.setattr(Accelerator, "save_state", original)
    reset_accelerate()
    result = train(cfg, resume="latest")  # space freed: continues from checkpoint-2
    assert [r["step"] for r in result.history] == [3, 4]


SLOW_SAVE_RUNNER = r"""
import sys, time
from accelerate import Accelerator
original = Accelerator.save_state

def slow_save_state(self, output_dir=None, **kwargs):
    result = original(self, output_dir, **kwargs)
    if "checkpoint-4" in str(output_dir):
        time.sleep(60)  # the test kills the process here, with checkpoint-4 half written
    return result

Accelerator.save_state = slow_save_state
from train.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_during_a_checkpoint_write_then_resume_latest(tmp_path):
    """A real SIGKILL while checkpoint-4 is being written: checkpoint-2 stays the latest complete one,
    and `--resume latest` finishes the run with the same weights as an uninterrupted one."""
    import signal
    import time

    import yaml
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    configs = {}
    for name in ("straight", "killed"):  # both runs in subprocesses alike (same threads, same arithmetic)
        cfg = loop_config(tmp_path, name=name, train={"max_steps": 6})
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if k != "base_dir"}))
    write_cache(cfg)
    straight_dir = tmp_path / "straight"
    run = subprocess.run([sys.executable, "-m", "train", "stage1", "--config", str(configs["straight"])],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    config_path = configs["killed"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE_RUNNER, "stage1", "--config", str(config_path)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = cfg.output_path / ".tmp-checkpoint-4"
    deadline = time.monotonic() + 240
    while not (partial.exists() and any(partial.iterdir())):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the run never reached checkpoint-4"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    assert [s for s, _ in ckpt.list_checkpoints(cfg.output_path)] == [2]
    assert ckpt.resolve_resume(cfg.output_path, "latest") == cfg.output_path / "checkpoint-2"
    done = subprocess.run([sys.executable, "-m", "train", "stage1", "--config", str(config_path), "--resume",
                           "latest"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [s for s, _ in ckpt.list_checkpoints(cfg.output_path)] == [2, 4, 6]
    a = load_file(str(straight_dir / "checkpoint-6" / "model.safetensors"))
    b = load_file(str(cfg.output_path / "checkpoint-6" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
