"""train/text_roles.py: the tiny text encoder learns which word of an instruction names the object and which
is the change, and is saved in the layout sama_core loads (same tokenizer)."""

import json

import pytest
import torch

from sama_core.errors import SamaFileNotFoundError, SamaInputError
from train import text_roles
from train.synthetic import EDIT_KINDS, write_dataset


@pytest.fixture(scope="module")
def encoder_and_data(tmp_path_factory):
    import sentencepiece

    from sama_core.bundle import save_umt5_comfy, tiny_umt5
    from train import shapes
    root = tmp_path_factory.mktemp("roles")
    write_dataset(root / "data" / "train", 12, seed=0, split="train", video_format="npz", image_pairs=False)
    spiece = shapes.train_tokenizer(shapes.instruction_corpus(root / "data"), 134)
    vocab = sentencepiece.SentencePieceProcessor(model_proto=spiece).get_piece_size()
    encoder = root / "text_encoder.safetensors"
    save_umt5_comfy(tiny_umt5(vocab, 64, torch.Generator().manual_seed(0)), spiece, encoder)
    return encoder, root / "data" / "train"


def test_token_roles_tag_whole_words_only():
    labels = {"ref_color": "blue", "ref_shape": "triangle", "to_color": "cyan", "to_shape": None}
    pieces = ["\u2581make", "\u2581the", "\u2581blue", "\u2581triangle", "\u2581cyan", "</s>"]
    assert [text_roles.ROLES[i] for i in text_roles.token_roles(pieces, labels)] == [
        "none", "none", "ref_color", "ref_shape", "to_color", "none"]
    assert text_roles.token_roles(["\u2581cy", "an"], labels) == [0, 0]  # a split word is not tagged


def test_role_labels_of_every_edit_kind(encoder_and_data):
    _, data = encoder_and_data
    rows = [json.loads(line) for line in (data / "ground_truth.jsonl").read_text().splitlines()]
    seen = set()
    for row in rows:
        labels = text_roles.role_labels(row)
        seen.add(labels["kind"])
        if row["kind"] == "color":
            assert labels["to_color"] == row["change"]["to"] and labels["to_color"] in row["instruction"]
            assert labels["ref_color"] != labels["to_color"]
        if row["kind"] == "add":
            added = row["target_scene"]["objects"][row["object_index"]]
            assert (labels["to_color"], labels["to_shape"]) == (added["color"], added["shape"])
        if row["kind"] == "background":
            assert labels["background"] and labels["to_color"] is None
    assert seen == set(EDIT_KINDS)


def test_fine_tuned_encoder_tags_roles_and_loads_like_the_original(encoder_and_data, tmp_path):
    from sama_core.text import load_umt5_encoder
    encoder, data = encoder_and_data
    examples = text_roles.read_examples([data])
    model, heads, tokenizer, stats = text_roles.train_text_roles(encoder, [data], steps=300, batch_size=32,
                                                                 log_every=300)
    assert stats["step"] == 300 and stats["role_accuracy"] > 0.9, stats
    # the roles of a colour edit's two colour words, read back through the public predictor
    prompt, labels = next((p, lab) for p, lab in examples if lab["kind"] == "color" and lab["ref_color"])
    predicted = dict(text_roles.predict_roles(model, heads, tokenizer, prompt))
    assert predicted["\u2581" + labels["to_color"]] == "to_color"
    assert predicted["\u2581" + labels["ref_color"]] == "ref_color"

    original, spiece = load_umt5_encoder([encoder], dtype=torch.float32)
    rows_before, _, _ = text_roles.encode(original, tokenizer, [prompt])
    drifts = {}
    for distill in ("0", "30"):
        out = tmp_path / distill / "text_encoder.safetensors"
        assert text_roles.main(["--encoder", str(encoder), "--data", str(data), "--out", str(out),
                                "--steps", "40", "--batch-size", "8", "--distill", distill]) == 0
        tuned, tuned_spiece = load_umt5_encoder([out], dtype=torch.float32)
        assert tuned_spiece == spiece  # the same tokenizer, embedded
        with torch.no_grad():
            rows_after, _, _ = text_roles.encode(tuned, tokenizer, [prompt])
        drifts[distill] = float(((rows_after - rows_before) ** 2).mean())
    # the rows changed, and the distillation term keeps them nearer the ones the DiT was trained on
    assert 0 < drifts["30"] < drifts["0"] / 2, drifts


def test_bad_inputs_are_named(encoder_and_data, tmp_path, capsys):
    encoder, data = encoder_and_data
    with pytest.raises(SamaFileNotFoundError, match="ground_truth.jsonl"):
        text_roles.read_examples([tmp_path])
    with pytest.raises(SamaInputError, match="--steps and --batch-size must be at least 1"):
        text_roles.train_text_roles(encoder, [data], steps=0)
    assert text_roles.main(["--encoder", str(encoder), "--data", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "train/synthetic.py" in capsys.readouterr().err
