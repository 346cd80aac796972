"""Teach SAMA-Shapes' tiny text encoder which word of an instruction plays which role.

    python -m train.text_roles --encoder runs/shapes/encoders/text_encoder.safetensors \
        --data runs/shapes/data/train --out runs/shapes/encoders_roles/text_encoder.safetensors [--steps 3000]

Why: SAMA-14B reads instructions with UMT5-XXL, a pretrained language model; SAMA-Shapes' encoder is a
random, frozen 2-layer UMT5. Its token rows say which words occur but hardly in which order ("make the blue
triangle cyan" and "make the cyan triangle blue" give rows whose nearest rows differ by 0.65 at row norm 8,
session 7), and the DiT's cross-attention has no positions of its own, so it cannot tell the colour that
names the object from the colour it is to become. Here the encoder is fine-tuned on the training set's
instructions to tag every token with its role (the edited object's colour / shape as named, the new colour /
shape, or none) and to tell the edit kind and new background from its mean row, while a distillation term
keeps its rows near the random encoder's (so a DiT trained on those stays a good start). The heads are
discarded; the encoder is saved in the same layout, with the same tokenizer.

Written by hand because no library tags roles in this toy vocabulary; the model is transformers' UMT5.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sama_core.errors import SamaError, SamaFileNotFoundError, SamaInputError

from .synthetic import EDIT_KINDS

log = logging.getLogger(__name__)

ROLES = ("none", "ref_color", "to_color", "ref_shape", "to_shape")


def role_labels(row: dict) -> dict:
    """The words of each role of one ground_truth.jsonl row (None where the instruction has no such word)."""
    kind = row["kind"]
    reference, change = row.get("reference") or {}, row.get("change") or {}
    labels = {"kind": kind, "ref_color": reference.get("color"), "ref_shape": reference.get("shape"),
              "to_color": None, "to_shape": None, "background": None}
    if kind == "color":
        labels["to_color"] = change["to"]
    elif kind == "shape":
        labels["to_shape"] = change["to"]
    elif kind == "add":
        added = row["target_scene"]["objects"][row["object_index"]]
        labels["to_color"], labels["to_shape"] = added["color"], added["shape"]
    elif kind == "background":
        labels["background"] = json.dumps(change.get("to"), sort_keys=True)
    return labels


def token_roles(pieces: list[str], labels: dict) -> list[int]:
    """The role index (ROLES) of every sentencepiece piece: a piece that is a role's whole word gets it."""
    roles = []
    for piece in pieces:
        word = piece.lstrip("\u2581")
        roles.append(next((i for i, role in enumerate(ROLES) if i and labels.get(role) == word), 0))
    return roles


def read_examples(folders) -> list[tuple[str, dict]]:
    """(prompt as the DiT's encoder sees it, role labels) for every video and image instruction."""
    from sama_core.prompts import edit_prompt
    examples = []
    for folder in folders:
        path = Path(folder) / "ground_truth.jsonl"
        if not path.is_file():
            raise SamaFileNotFoundError(f"{path} not found: --data takes SAMA-Shapes folders written by "
                                        "train/synthetic.py (they hold ground_truth.jsonl)")
        for line in path.read_text().splitlines():
            row = json.loads(line)
            labels = role_labels(row)
            for text in dict.fromkeys((row["instruction"], row.get("image_instruction") or row["instruction"])):
                examples.append((edit_prompt(text), labels))
    if not examples:
        raise SamaInputError(f"no instructions in {', '.join(map(str, folders))}")
    return examples


class RoleHeads(torch.nn.Module):
    """Token role tagger + edit kind and new background from the mean row (training only, discarded)."""

    def __init__(self, width: int, backgrounds: list[str]):
        super().__init__()
        self.backgrounds = ["-", *backgrounds]
        self.token = torch.nn.Linear(width, len(ROLES))
        self.kind = torch.nn.Linear(width, len(EDIT_KINDS))
        self.background = torch.nn.Linear(width, len(self.backgrounds))


def tokenize(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[list[str]]]:
    """(ids (B, L), mask (B, L), pieces per prompt) with sama_core's rule (TextEncoder.token_ids: the cleaned
    prompt's ids, then EOS), padded to the longest prompt only. tokenizer: a SentencePieceProcessor. Pieces
    are the vocabulary's (an unknown character is "<unk>", never a role word)."""
    from sama_core.prompts import clean_prompt
    ids = [tokenizer.encode(clean_prompt(p)) + [tokenizer.eos_id()] for p in prompts]
    input_ids = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
    mask = torch.zeros(input_ids.shape)
    for i, row in enumerate(ids):
        input_ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return input_ids, mask, [[tokenizer.id_to_piece(i) for i in row] for row in ids]


def encode(model, tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[list[str]]]:
    """(rows (B, L, D), mask (B, L), pieces per prompt incl. "</s>") as sama_core's encoder tokenizes them."""
    ids, mask, pieces = tokenize(tokenizer, prompts)
    return model(input_ids=ids, attention_mask=mask).last_hidden_state, mask, pieces


def predict_roles(model, heads: RoleHeads, tokenizer, prompt: str) -> list[tuple[str, str]]:
    """[(piece, role)] of one prompt, for reading what the encoder learned."""
    with torch.no_grad():
        rows, _, pieces = encode(model, tokenizer, [prompt])
        roles = heads.token(rows[0]).argmax(-1).tolist()
    return [(p, ROLES[r]) for p, r in zip(pieces[0], roles, strict=True)]


def train_text_roles(encoder_file, data, steps: int = 3000, batch_size: int = 64, lr: float = 1e-3,
                     distill: float = 1.0, seed: int = 0, log_every: int = 100):
    """(encoder, heads, tokenizer, stats): the fine-tuned UMT5 encoder (eval mode) and what it reached."""
    import sentencepiece

    from sama_core.text import load_umt5_encoder
    if steps < 1 or batch_size < 1:
        raise SamaInputError(f"--steps and --batch-size must be at least 1, got {steps} and {batch_size}")
    torch.manual_seed(seed)
    draw = random.Random(seed)
    model, spiece = load_umt5_encoder([Path(encoder_file)], dtype=torch.float32)
    if spiece is None:
        raise SamaInputError(f"{encoder_file} has no embedded tokenizer; train/shapes.py writes one")
    tokenizer = sentencepiece.SentencePieceProcessor(model_proto=spiece)
    examples = read_examples(data)
    backgrounds = sorted({labels["background"] for _, labels in examples if labels["background"]})
    heads = RoleHeads(model.config.d_model, backgrounds)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    model.train().requires_grad_(True)
    optimizer = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=lr, weight_decay=0.0)
    stats, started = {}, time.perf_counter()
    for step in range(1, steps + 1):
        batch = [examples[draw.randrange(len(examples))] for _ in range(batch_size)]
        ids, mask, pieces = tokenize(tokenizer, [prompt for prompt, _ in batch])
        rows = model(input_ids=ids, attention_mask=mask).last_hidden_state
        with torch.no_grad():
            reference = teacher(input_ids=ids, attention_mask=mask).last_hidden_state
        roles = torch.full(mask.shape, -100, dtype=torch.long)  # padding: ignored
        for i, (piece_list, (_, labels)) in enumerate(zip(pieces, batch, strict=True)):
            roles[i, :len(piece_list)] = torch.tensor(token_roles(piece_list, labels))
        pooled = (rows * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        kinds = torch.tensor([EDIT_KINDS.index(labels["kind"]) for _, labels in batch])
        backgrounds_of = torch.tensor([heads.backgrounds.index(labels["background"] or "-") for _, labels in batch])
        token_logits = heads.token(rows)
        role_loss = F.cross_entropy(token_logits.flatten(0, 1), roles.flatten(), ignore_index=-100)
        sentence_loss = F.cross_entropy(heads.kind(pooled), kinds) + F.cross_entropy(heads.background(pooled),
                                                                                       backgrounds_of)
        # mean squared distance to the random encoder's rows, per element (rows have RMS 1 after the norm)
        drift = (((rows - reference) ** 2).mean(-1) * mask).sum() / mask.sum()
        loss = 4.0 * role_loss + sentence_loss + distill * drift
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % log_every == 0 or step == steps:
            named = roles > 0
            stats = {"step": step, "role_loss": float(role_loss.detach()), "drift": float(drift.detach()),
                     "role_accuracy": float((token_logits.argmax(-1)[named] == roles[named]).float().mean()),
                     "seconds": round(time.perf_counter() - started, 1)}
            log.info("step %d  role loss %.3f  role accuracy %.3f  drift %.3f", step, stats["role_loss"],
                     stats["role_accuracy"], stats["drift"])
    return model.eval().requires_grad_(False), heads.eval(), tokenizer, {**stats, "examples": len(examples)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.text_roles", description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", required=True, help="the run's text_encoder.safetensors (with tokenizer)")
    parser.add_argument("--data", action="append", required=True, help="SAMA-Shapes training folder; repeatable")
    parser.add_argument("--out", required=True, help="where to write the fine-tuned text_encoder.safetensors")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--distill", type=float, default=1.0, help="weight of the distance to the random rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        from sama_core.bundle import save_umt5_comfy
        model, _, tokenizer, stats = train_text_roles(args.encoder, args.data, args.steps, args.batch_size,
                                                      distill=args.distill, seed=args.seed)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_umt5_comfy(model, tokenizer.serialized_model_proto(), out)
    except SamaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: role accuracy {stats['role_accuracy']:.3f}, drift {stats['drift']:.3f} "
          f"({stats['examples']} instructions, {stats['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
