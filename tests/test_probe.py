"""train.probe: the text probe's numbers against an independent computation, a text-blind model, sample
selection, and the CLI with its errors."""

import json

import pytest
import torch

from tiny_models import TINY, tiny_dit
from sama_core.loading import save_dit
from train.cache import write_feature_cache
from train.probe import attention_masses, attention_probe, main, probe, small_edits

FRAMES, SIZE = 3, 4   # 48 latent positions per sample


def edit_samples(n=5, changed_positions=1, seed=0):
    """Video edits whose source equals the target except at `changed_positions` positions (+ a big edit
    and a raw clip that the probe must skip)."""
    g = torch.Generator().manual_seed(seed)
    shape = (TINY.in_dim, FRAMES, SIZE, SIZE)
    samples = []
    for i in range(n):
        target = torch.randn(shape, generator=g)
        source = target.clone()
        for k in range(changed_positions):
            source[:, k % FRAMES, (i + k) % SIZE, 1] += 2.0
        samples.append({"kind": "video_edit", "bucket": "edit-9x32x32", "target": target, "source": source,
                        "text": torch.randn(4 + i, TINY.text_dim, generator=g),
                        "semantic": torch.randn(65, TINY.siglip_dim, generator=g)})
    samples.append({"kind": "video_edit", "bucket": "edit-9x32x32", "target": torch.randn(shape, generator=g),
                    "source": torch.randn(shape, generator=g), "text": torch.randn(5, TINY.text_dim, generator=g),
                    "semantic": torch.randn(65, TINY.siglip_dim, generator=g)})  # changes everything
    return samples


@pytest.fixture()
def cache(tmp_path):
    folder = tmp_path / "cache"
    write_feature_cache(folder, edit_samples(), "test", torch.zeros(2, TINY.text_dim), shard_size=4)
    return folder


def test_selection_keeps_small_edits_only(cache):
    picked = small_edits(cache, limit=10, min_changed=0.01, max_changed=0.1)
    assert len(picked.ids) == 5                          # the big edit is left out
    assert picked.changed.sum().item() == 5               # one changed position each
    assert picked.changed.shape == (5, 1, FRAMES, SIZE, SIZE)
    assert len(small_edits(cache, limit=2).ids) == 2


def test_numbers_equal_an_independent_computation(cache):
    samples = small_edits(cache, limit=5, min_changed=0.01, max_changed=0.1)
    model = tiny_dit(seed=4)
    rows = probe(model, samples, sigmas=(0.8,), seed=3)
    g = torch.Generator().manual_seed(3)
    x0, src = samples.target, samples.source
    e = torch.randn(x0.shape, generator=g)
    es = torch.randn(samples.semantic.shape, generator=g)
    s = 0.8
    x, sem = (1 - s) * x0 + s * e, (1 - s) * samples.semantic + s * es
    texts = samples.rows
    longest = max(r.shape[0] for r in texts)

    def pad(rows):
        return torch.stack([torch.cat([r, r.new_zeros(longest - r.shape[0], r.shape[1])]) for r in rows])
    with torch.no_grad():
        own = x - s * model(x, torch.full((5,), 800.0), pad(texts), source=src, semantic_tokens=sem).video
        wrong = x - s * model(x, torch.full((5,), 800.0), pad(texts[1:] + texts[:1]), source=src,
                              semantic_tokens=sem).video
    mask = ((x0 - src).abs().mean(1) > 0.25)              # (B, T, h, w)

    def region(a, where=mask):
        return (a ** 2).mean(1)[where].mean().item()
    expected = {"error": region(own - x0), "error_wrong_prompt": region(wrong - x0),
                "copy_error": region(src - x0), "text_effect": region(own - wrong),
                "error_outside": region(own - x0, ~mask), "copy_error_outside": region(src - x0, ~mask)}
    for key, value in expected.items():
        assert rows[0][key] == pytest.approx(value, rel=1e-5, abs=1e-8), key  # text_effect: a difference of ~1e-4
    assert rows[0]["text_effect"] > 0


def test_a_model_without_cross_attention_output_has_no_text_effect(cache):
    model = tiny_dit(seed=4)
    with torch.no_grad():
        for block in model.blocks:
            block.cross_attn.o.weight.zero_()
            block.cross_attn.o.bias.zero_()
    rows = probe(model, small_edits(cache, limit=5, min_changed=0.01, max_changed=0.1), sigmas=(0.9, 0.5))
    for row in rows:
        assert row["text_effect"] == 0.0 and row["error"] == row["error_wrong_prompt"]


def test_cli_with_a_checkpoint_and_its_errors(tmp_path, cache, capsys):
    from safetensors.torch import save_file
    dit = tmp_path / "dit.safetensors"
    model = tiny_dit(seed=4)
    save_dit(model, dit)
    checkpoint = tmp_path / "checkpoint-7"
    checkpoint.mkdir()
    other = tiny_dit(seed=9)
    save_file({n: p.detach().contiguous() for n, p in other.named_parameters()}, str(checkpoint / "ema.safetensors"))
    args = ["--dit", str(dit), "--cache", str(cache), "--min-changed", "0.01", "--json", str(tmp_path / "p.json")]
    assert main(args) == 0
    plain = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert "| sigma | error |" in capsys.readouterr().out
    assert main(args + ["--checkpoint", str(checkpoint)]) == 0
    from_checkpoint = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert from_checkpoint == probe(other, small_edits(cache, min_changed=0.01), sigmas=(0.9, 0.5))
    assert from_checkpoint != plain

    assert main(args + ["--checkpoint", str(tmp_path)]) == 2
    assert "has no ema.safetensors" in capsys.readouterr().err
    assert main(args + ["--sigmas", "0,2"]) == 2
    assert "--sigmas must be" in capsys.readouterr().err
    assert main(["--dit", str(dit), "--cache", str(cache), "--min-changed", "0.5"]) == 2
    assert "the probe needs at least 2" in capsys.readouterr().err


def test_attention_masses_against_a_direct_loop_and_a_constructed_copy():
    g = torch.Generator().manual_seed(0)
    n, m, heads, hd = 4, 3, 2, 8
    q, k = torch.randn(2, 2 * n + m, heads, hd, generator=g), torch.randn(2, 2 * n + m, heads, hd, generator=g)
    got = attention_masses(q, k, n, m)
    same, source, semantic = [], [], []
    for b in range(2):
        for h in range(heads):
            for i in range(n):
                query = n + m + i
                w = torch.softmax(torch.stack([q[b, query, h] @ k[b, j, h] for j in range(2 * n + m)]) / hd ** 0.5, 0)
                same.append(w[i]), source.append(w[:n].sum()), semantic.append(w[n:n + m].sum())
    for key, values in (("same_position", same), ("source", source), ("semantic", semantic)):
        assert got[key] == pytest.approx(torch.stack(values).mean().item(), rel=1e-5), key
    # a target query equal to its own position's source key (large): all of its attention goes there
    keys = torch.zeros(1, 2 * n + m, 1, hd)
    keys[0, :n, 0, :n] = 20 * torch.eye(n)
    queries = torch.zeros_like(keys)
    queries[0, n + m:, 0, :n] = 20 * torch.eye(n)
    copy = attention_masses(queries, keys, n, m)
    assert copy["same_position"] > 0.99 and copy["source"] > 0.99 and copy["semantic"] < 0.01


def test_attention_probe_leaves_the_model_as_it_was_and_reports_every_block(cache, tmp_path, capsys):
    samples = small_edits(cache, limit=5, min_changed=0.01, max_changed=0.1)
    model = tiny_dit(seed=4)
    before = probe(model, samples, sigmas=(0.9,))
    rows = attention_probe(model, samples, sigma=1.0)
    assert [r["block"] for r in rows] == list(range(len(model.blocks)))
    for r in rows:
        assert 0 < r["same_position"] < r["source"] < 1 and 0 < r["semantic"] < 1 - r["source"] + 1e-6
    assert probe(model, samples, sigmas=(0.9,)) == before  # the attention functions were put back
    dit = tmp_path / "dit.safetensors"
    save_dit(model, dit)
    assert main(["--dit", str(dit), "--cache", str(cache), "--min-changed", "0.01", "--attention"]) == 0
    assert "| block | own position in the source |" in capsys.readouterr().out
