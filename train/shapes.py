"""SAMA-Shapes end to end: one resumable command from nothing to the embedded tiny model and its evaluation.

    python -m train.shapes run --out runs/shapes [--budget tiny|full] [--variant full|no_sa|no_ma]
                               [--reuse RUN] [--until STAGE] [--install]
    python -m train.shapes status --out runs/shapes
    python -m train.shapes curve --out runs/shapes [--limit N]      # accuracy of the kept checkpoints
    python -m train.shapes unbundle --out runs/from_bundle [--bundle B]  # a bundle as a run to continue
    python -m train.shapes swap-dit --dit D --lineage L.json --out NEW [--bundle B]  # the bundle with D
    python -m train.shapes card --bundle NEW --eval EVAL [--install]  # its card from train.eval's output

Stages (each a folder of the run; see docs/sama_shapes.md for what every one does and costs):

    data      train + held-out SAMA-Shapes sets (train/synthetic.py, npz)
    vae       the tiny Wan VAE (train/vae_train.py), latent statistics folded in
    encoders  sentencepiece tokenizer trained on the instructions/captions + tiny UMT5 and tiny SigLIP,
              both random init and frozen
    cache0    feature cache of stage 0 (python -m train cache)
    stage0    factorized pre-training (python -m train stage0): image edits + raw clips with pretexts
    cache1    feature cache of stage 1
    stage1    SFT on video edits + image edits, from stage 0's export
    demo      the demo clip (split "demo", never trained on), its instruction and ground-truth edit: a stage
              of its own so that a new demo pick re-exports the bundle without retraining anything
    export    the bundle (bundle.json + safetensors + sample clip), as sama_core.bundle.write_bundle writes it
    eval      python -m train.eval on the held-out set (+ stage 0 alone, zero-shot) and the model card

A stage is done when its stamp (RUN/stamps/<stage>.done) and its outputs exist and the stamp is newer
than its dependencies' stamps: re-running the command skips done stages and continues the others (the
training stages resume from their last checkpoint, the cache from its last shard). A stage whose
dependency ran again after it started is started over (its folders are removed first). Long stages run
as subprocesses with the exact command printed, so any of them can also be run by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import yaml

from sama_core.cli import command_line
from sama_core.errors import SamaFileNotFoundError, SamaInputError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "train" / "configs"
ASSET_BUNDLE = REPO / "sama_core" / "assets" / "sama-shapes"
RUN_FILE = "run.json"
STAMPS = "stamps"
MAX_BUNDLE_BYTES = 20 * 1024 * 1024
STAGE0_ROW = "stage 0 only (zero-shot)"
LINEAGE_FILE = "lineage.json"


# ---------------------------------------------------------------------------------------------- budgets

@dataclasses.dataclass(frozen=True)
class Budget:
    """How much of everything a run uses. Overrides are `key=value` strings applied to the config templates."""
    name: str
    train_clips: int
    heldout_clips: int
    frames: int = 17                # frames per synthetic clip (4k+1)
    data_workers: int = 2
    text_dim: int = 64              # tiny UMT5 width (= the DiT's text_dim)
    siglip_width: int = 64          # tiny SigLIP width (= the DiT's siglip_dim)
    vocab_size: int = 256           # sentencepiece pieces (fewer if the corpus has fewer)
    # Steps of train/text_roles.py on the random text encoder (0: none): it learns which instruction word
    # names the object and which is the change (session 8: held-out colour edits 17.5% -> 35%, docs/sama_shapes.md).
    text_roles_steps: int = 3000
    vae: tuple = ()
    stage0: tuple = ()
    stage1: tuple = ()
    eval_clips: Optional[int] = None  # held-out clips evaluated (5 edits each); None = all
    dit_clips: Optional[int] = None  # the DiT stages use the samples of the first N training clips (None: all)
    sample_steps: int = 20          # the bundle's default sampling steps (the demo's)
    dit_dtype: str = "fp16"         # storage dtype of the DiT in the bundle (it is computed in fp32)
    # False: the DiT stages read the clips and encode them every step (no cache0/cache1 stages). On a GPU
    # the encoders cost little next to the step and a run saves the cache's minutes of one-by-one encoding.
    cached: bool = True


_TINY_DIT = ("model.config={dim: 32, ffn_dim: 64, num_heads: 1, num_layers: 1, text_dim: 16, freq_dim: 16, "
             "siglip_dim: 16, siglip_hidden_dim: 16}")
_TINY_LOOP = ("train.batch_size=2", "checkpoint.every=2", "checkpoint.keep=2", "validation.every=0",
              "log.every=1", "optim.warmup_steps=1", "data.cache_shard_size=32", "data.frame_buckets=[9]")

BUDGETS = {
    # The real recipe: ~4 h on 2 CPU cores (docs/sama_shapes.md has the measured breakdown).
    "full": Budget("full", train_clips=1000, heldout_clips=100, eval_clips=40, dit_clips=400),
    # Checks the machinery in about a minute (the test): every stage, tiny sizes, a few steps.
    "tiny": Budget("tiny", train_clips=4, heldout_clips=1, frames=9, data_workers=1, text_dim=16, siglip_width=16,
                   vocab_size=200, text_roles_steps=5,
                   vae=("max_steps=3", "model.base_dim=4", "batch_size=1", "data.num_frames=5",
                        "data.image_steps=1", "data.image_batch_size=2", "data.stats_clips=4",
                        "data.eval_clips=1", "checkpoint.every=2", "log.every=1", "optim.warmup_steps=1"),
                   stage0=(_TINY_DIT, "train.max_steps=3", *_TINY_LOOP),
                   stage1=("train.max_steps=3", *_TINY_LOOP),
                   eval_clips=1, sample_steps=2),
}

# A GPU recipe sized for a short lease (15 minutes of one H100, machine starts included, in calls of at most
# 10 minutes): `run --budget gpu --until stage0` (~8 min), then stage 1 (~6 min). Stages stop on the clock
# (train.max_minutes / the VAE's max_minutes) with a checkpoint and an export, so the steps are upper bounds.
# The speeds behind the sizes (session 5, H100): stage 1 from raw clips at batch 64 ran 320-350 samples/s.
_GPU_LOOP = ("train.batch_size=64", "train.max_steps=1000000", "data.num_workers=12", "data.probe_workers=16",
             "checkpoint.every=1000", "checkpoint.keep=2", "log.every=100", "validation.every=0")
BUDGETS["gpu"] = Budget(
    "gpu", train_clips=2000, heldout_clips=100, data_workers=16, eval_clips=40, cached=False,
    # The role tagging runs on the CPU (~2 min for 3000 steps on one core, session 8): half of it keeps the
    # `base` call inside its 10 minutes (role accuracy 0.98 after 1500 steps, measured in the prototype).
    text_roles_steps=1500,
    # The VAE's phases are by step (single frames must come first: ~1000+ steps to leave the mean-colour
    # plateau), so its steps are sized to end inside the time limit at an estimated ~15 whole-clip steps/s.
    vae=("batch_size=16", "max_steps=4000", "max_minutes=3.5", "data.image_steps=1500", "data.image_batch_size=64",
         "data.long_from_step=2000", "data.long_batch_size=16", "optim.decay_from_step=3200", "checkpoint.every=1000",
         "log.every=100"),
    stage0=(*_GPU_LOOP, "train.max_minutes=1.5", "optim.lr=5.0e-4"),
    stage1=(*_GPU_LOOP, "train.max_minutes=4.5"))
# The GPU recipe's machinery (no caches; scripts/shapes_gpu_lease.sh) at the tiny budget's sizes.
BUDGETS["tiny_gpu"] = dataclasses.replace(BUDGETS["tiny"], name="tiny_gpu", cached=False)

# Ablations of the toy reproduction (docs/sama_shapes.md); "stage 0 only" is a row of every run's eval.
VARIANTS = {
    "full": {"stage0": (), "stage1": ()},
    "no_sa": {"stage0": ("data.semantic_anchoring=false",), "stage1": ("data.semantic_anchoring=false",)},
    "no_ma": {"stage0": ("data.pretext_mix={none: 1.0}",), "stage1": ()},
}


# ------------------------------------------------------------------------------------------------ a run

@dataclasses.dataclass
class Run:
    out: Path
    budget: Budget
    variant: str
    reuse: Optional[Path] = None
    echo: Callable[[str], None] = print

    def path(self, *parts) -> Path:
        return self.out.joinpath(*parts)

    def read_state(self) -> dict:
        path = self.path(RUN_FILE)
        return json.loads(path.read_text()) if path.exists() else {}

    def write_state(self, state: dict) -> None:
        tmp = self.path(f".{RUN_FILE}.tmp")
        tmp.write_text(json.dumps(state, indent=1) + "\n")
        os.replace(tmp, self.path(RUN_FILE))

    def record(self, stage: str, seconds: float) -> None:
        state = self.read_state()
        entry = state.setdefault("stages", {}).setdefault(stage, {"seconds": 0.0, "runs": 0})
        entry["seconds"] = round(entry["seconds"] + seconds, 2)
        entry["runs"] += 1
        entry["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.write_state(state)


def start_run(out, budget: str, variant: str, reuse=None, echo=print) -> Run:
    if budget not in BUDGETS:
        raise SamaInputError(f"--budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    if variant not in VARIANTS:
        raise SamaInputError(f"--variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    run = Run(Path(out).resolve(), BUDGETS[budget], variant, Path(reuse).resolve() if reuse else None, echo)
    run.out.mkdir(parents=True, exist_ok=True)
    state = run.read_state()
    for key, value in (("budget", budget), ("variant", variant)):
        if state.get(key, value) != value:
            raise SamaInputError(f"{run.out} was started with --{key} {state[key]}; continue it with --{key} "
                                 f"{state[key]}, or use another --out")
    state.update(budget=budget, variant=variant, reuse=str(run.reuse) if run.reuse else None)
    state.setdefault("created", time.strftime("%Y-%m-%d %H:%M:%S"))
    run.write_state(state)
    if run.reuse is not None:
        link_reused(run)
    return run


def link_reused(run: Run) -> None:
    """An ablation shares the data, the VAE and the encoders of another run (same budget): symlinks."""
    other = json.loads((run.reuse / RUN_FILE).read_text()) if (run.reuse / RUN_FILE).exists() else {}
    if other.get("budget") != run.budget.name:
        raise SamaInputError(f"--reuse {run.reuse}: that run has budget {other.get('budget')!r}, this one "
                             f"{run.budget.name!r}; reuse a run of the same budget")
    for name in ("data", "vae", "encoders"):
        source = run.reuse / name
        if not (run.reuse / STAMPS / f"{_STAGE_OF_FOLDER[name]}.done").exists():
            raise SamaInputError(f"--reuse {run.reuse}: its '{_STAGE_OF_FOLDER[name]}' stage is not done; run it "
                                 "first")
        link = run.path(name)
        if not link.exists():
            link.symlink_to(source, target_is_directory=True)
        stamp = run.path(STAMPS, f"{_STAGE_OF_FOLDER[name]}.done")
        stamp.parent.mkdir(exist_ok=True)
        if not stamp.exists():
            stamp.write_text(f"reused from {run.reuse}\n")


_STAGE_OF_FOLDER = {"data": "data", "vae": "vae", "encoders": "encoders"}


# ------------------------------------------------------------------------------------------ subprocesses

def python_command(run: Run, args: list[str], log_name: str) -> None:
    """Run `python ARGS` from the repository root, echoing its output and appending it to RUN/logs/."""
    command = [sys.executable, *args]
    run.echo("$ " + shlex.join(command))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    log_path = run.path("logs", f"{log_name}.log")
    log_path.parent.mkdir(exist_ok=True)
    with log_path.open("a") as log_file, subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        log_file.write(f"$ {shlex.join(command)}\n")
        for line in proc.stdout:
            log_file.write(line)
            log_file.flush()
            run.echo(line.rstrip("\n"))
        code = proc.wait()
    if code != 0:
        raise SamaInputError(f"`{shlex.join(args)}` failed with exit code {code} (log: {log_path}); fix the "
                             "cause and run the same `python -m train.shapes run` command again to continue")


# ------------------------------------------------------------------------------------------------ configs

def materialize_config(run: Run, template: str, overrides) -> Path:
    """RUN/<template>: the template with the overrides applied (checked by the config loader first)."""
    from .config import _set_dotted, parse_override
    values = yaml.safe_load((TEMPLATES / template).read_text())
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(values, key, value)
    target = run.path(template)
    header = (f"# written by `python -m train.shapes run` from train/configs/{template} (budget "
              f"{run.budget.name}, variant {run.variant}); paths are relative to this folder\n")
    tmp = run.path(f".{template}.tmp")
    tmp.write_text(header + yaml.safe_dump(values, sort_keys=False))
    if template.startswith("shapes_stage"):
        from .config import load_config
        load_config(tmp)  # validates (a misspelt override key is an error here, before anything runs)
    else:
        from .vae_train import load_vae_config
        load_vae_config(tmp)
    os.replace(tmp, target)
    return target


def stage_overrides(run: Run, stage: str) -> list[str]:
    b = run.budget
    overrides = list(getattr(b, stage)) + list(VARIANTS[run.variant][stage])
    if stage == "stage0":  # the encoders' widths decide the DiT's input widths
        overrides += [f"model.config.text_dim={b.text_dim}", f"model.config.siglip_dim={b.siglip_width}"]
    if b.dit_clips is not None:
        overrides.append(subset_manifests_override(stage, b.dit_clips))
    if not b.cached:
        overrides.append("data.cache_dir=null")
    return overrides


def subset_name(manifest: str, clips: int) -> str:
    """data/train/raw_videos.jsonl -> data/train/raw_videos.first400.jsonl"""
    path = Path(manifest)
    return str(path.with_name(f"{path.stem}.first{clips}{path.suffix}"))


def subset_manifests_override(stage: str, clips: int) -> str:
    """`data.manifests=[...]` of the stage's template with every manifest replaced by its subset."""
    entries = yaml.safe_load((TEMPLATES / f"shapes_{stage}.yaml").read_text())["data"]["manifests"]
    subset = [dict(e, path=subset_name(e["path"], clips)) if isinstance(e, dict) else subset_name(e, clips)
              for e in entries]
    return "data.manifests=" + yaml.safe_dump(subset, default_flow_style=True).strip()


def write_subset_manifests(run: Run) -> None:
    """The rows of the first `dit_clips` training clips of every manifest (clip index from the row id
    "train_s<seed>_<index>[_<edit>]"): the DiT stages then cache and train on fewer samples."""
    clips = run.budget.dit_clips
    folder = run.path("data", "train")
    if clips is None or not folder.exists():
        return
    for manifest in sorted(folder.glob("*.jsonl")):
        if ".first" in manifest.name:
            continue
        rows = [line for line in manifest.read_text().splitlines()
                if line.strip() and int(json.loads(line)["id"].split("_")[2]) < clips]
        target = run.path(subset_name(str(manifest.relative_to(run.out)), clips))
        if not target.exists() or target.read_text() != "\n".join(rows) + "\n":
            target.write_text("\n".join(rows) + "\n")


def write_configs(run: Run) -> dict[str, Path]:
    return {"vae": materialize_config(run, "shapes_vae.yaml", run.budget.vae),
            "stage0": materialize_config(run, "shapes_stage0.yaml", stage_overrides(run, "stage0")),
            "stage1": materialize_config(run, "shapes_stage1.yaml", stage_overrides(run, "stage1"))}


# ------------------------------------------------------------------------------------------------ stages

def stage_data(run: Run) -> None:
    from .synthetic import SynthConfig, write_dataset
    config = SynthConfig(num_frames=run.budget.frames)
    for split, clips in (("train", run.budget.train_clips), ("heldout", run.budget.heldout_clips)):
        run.echo(f"generating {clips} {split} clips")
        write_dataset(run.path("data", split), clips, seed=0, split=split, config=config, video_format="npz",
                      workers=run.budget.data_workers, overwrite=True)


def stage_demo(run: Run) -> None:
    write_demo_clip(run.path("demo"))


# The demo's edit kind. Removal, because it is what the model does most reliably: on 100 held-out edits the
# session-7 model (step 17083) removed 13 of 20 objects (5 of 5 on plain backgrounds) but recoloured only 5
# of 20, and on the session-7 colour demo it recoloured both objects (docs/sama_shapes.md, session 8).
DEMO_KIND = "remove"
DEMO_KINDS = ("color", "remove")


def check_demo_kind(kind: str) -> None:
    if kind not in DEMO_KINDS:
        raise SamaInputError(f"the demo shows a {' or '.join(DEMO_KINDS)} edit, not {kind!r}")


def is_clear_demo(scene, edit) -> bool:
    """An edit that is easy to see: 2-3 objects, the edited one large (radius >= 7 px) and never within 1 px of
    another object (rendered outlines), on a plain background. A colour edit also needs the two colours far
    apart (RGB distance >= 0.6) and neither used by another object; a removal needs the removed object's
    colour used by no other object and far (>= 0.6) from the background's. Why plain: textures are the VAE's
    weakest case (session 6, 100 held-out edits: background PSNR of VAE(target) 18 dB on checkerboards, 23 dB
    on plain) and the model's (accuracy 15% on checkerboards, 48% on plain), and a blurred texture hides the
    edit the demo is there to show."""
    import numpy as np
    import torch

    from .synthetic import BACKGROUND_COLORS, OBJECT_COLORS, render_scene
    check_demo_kind(edit.kind)
    objects = scene.objects
    edited = objects[edit.object_index]
    others = [o for i, o in enumerate(objects) if i != edit.object_index]
    if not 2 <= len(objects) <= 3 or edited.radius < 7:
        return False
    if scene.background.style != "plain":
        return False
    if edit.kind == "color":
        old, new = (np.array(OBJECT_COLORS[edit.change[k]]) for k in ("from", "to"))
        if np.linalg.norm(old - new) < 0.6:
            return False
        if any(o.color in (edit.change["from"], edit.change["to"]) for o in others):
            return False
    else:
        background = np.array(BACKGROUND_COLORS[scene.background.colors[0]])
        if np.linalg.norm(np.array(OBJECT_COLORS[edited.color]) - background) < 0.6:
            return False
        if any(o.color == edited.color for o in others):
            return False
    coverage = render_scene(scene, supersample=1).coverage > 0  # (N, F, H, W); last: the costliest check
    near = torch.nn.functional.max_pool2d(coverage[edit.object_index].float()[:, None], 3, 1, 1)[:, 0] > 0
    others_mask = coverage[[i for i in range(len(objects)) if i != edit.object_index]].any(0)
    return not bool((near & others_mask).any())


def pick_demo_clip(kind: str = DEMO_KIND, max_tries: int = 4000):
    """The first clip of the "demo" split (never trained on) whose `kind` edit is clear (is_clear_demo).
    Deterministic and independent of any model's results."""
    from .synthetic import (
        _EDIT_STREAM_BASE,
        _SCENE_STREAM,
        EDIT_KINDS,
        SynthConfig,
        clip_generator,
        generate_clip,
        make_edit,
        sample_scene,
    )
    check_demo_kind(kind)
    config = SynthConfig(edits=(kind,))
    for index in range(max_tries):  # scenes and edits only (no rendering) until one fits
        scene = sample_scene(clip_generator(0, index, "demo", _SCENE_STREAM), config)
        rng = clip_generator(0, index, "demo", _EDIT_STREAM_BASE + EDIT_KINDS.index(kind))
        if is_clear_demo(scene, make_edit(scene, kind, rng, config)):
            return generate_clip(0, index, "demo", config)
    raise SamaInputError(f"no clear {kind} demo clip in the first {max_tries} demo clips")


def write_demo_clip(folder: Path) -> None:
    from .synthetic import save_clip
    folder.mkdir(parents=True, exist_ok=True)
    clip = pick_demo_clip()
    edit = clip.edits[0]
    save_clip(folder / "sample.mp4", clip.source.frames, crf=12)  # the demo reads ordinary video files
    save_clip(folder / "sample_target.npz", edit.target.frames)
    (folder / "sample.json").write_text(json.dumps(
        {"clip": clip.clip_id, "kind": edit.edit.kind, "instruction": edit.edit.instruction,
         "change": edit.edit.change, "caption": clip.caption}, indent=1) + "\n")


DEMO_REGION = "sample_region.png"
DEMO_REGION_GROW = 3   # px: a rough brush around the path, like a user's (the objects are 8-20 px wide)
DEMO_REGION_CHANGE = 0.1  # max RGB difference that counts as changed (the mp4s' coding noise stays under it)


def demo_region(source, target, grow: int = DEMO_REGION_GROW):
    """(F, H, W, 3) source and target clips in [0, 1] -> (H, W) bool: every pixel the edit changes in any frame,
    grown by `grow` px. One image for the whole clip, what a user paints over an object's path."""
    from .eval import dilate
    changed = (source - target).abs().amax(-1).amax(0) > DEMO_REGION_CHANGE  # (H, W)
    return dilate(changed.numpy()[None], grow)[0]


def write_demo_region(bundle: Path) -> Path:
    """The bundle's `sample_region.png`: the demo edit's region as a white-on-black mask of the clip's size,
    from the bundle's own sample.mp4 and sample_target.mp4. `python -m sama_core edit --mask` reads it, and
    so does ComfyUI's Load Image (as Mask) with channel red (workflows/sama_shapes_region_demo_api.json)."""
    from PIL import Image

    from sama_core.video import read_video
    source, _ = read_video(bundle / "sample.mp4")
    target, _ = read_video(bundle / "sample_target.mp4")
    path = bundle / DEMO_REGION
    Image.fromarray(demo_region(source, target).astype("uint8") * 255).save(path)
    return path


def stage_vae(run: Run) -> None:
    python_command(run, ["-m", "train.vae_train", "--config", str(run.path("shapes_vae.yaml")), "--resume",
                         "latest"], "vae")


def instruction_corpus(data_dir: Path) -> list[str]:
    """Every instruction and caption of the training set and the fixed prompts the model sees. Not the demo's
    instruction (its stage comes later, so a new pick retrains nothing): it comes from the same templates,
    and the export refuses one with pieces the tokenizer does not know (check_known_pieces)."""
    from sama_core.pretext import TASK_TOKENS

    from .synthetic import MANIFEST_NAMES, read_manifest
    lines = []
    for row in read_manifest(data_dir / "train" / MANIFEST_NAMES["ground_truth"]):
        lines += [row["instruction"], row["image_instruction"], row["caption"]]
    lines += ["[Video edit] " + line for line in lines[:200]]
    lines += list(TASK_TOKENS.values()) + ["[Video edit]"]
    return lines


def check_known_pieces(spiece: bytes, text: str, what: str) -> None:
    """Refuse a prompt that the tokenizer maps to its unknown piece (characters it never saw)."""
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_proto=spiece)
    unknown = [piece for piece, i in zip(sp.encode(text, out_type=str), sp.encode(text)) if i == sp.unk_id()]
    if unknown:
        raise SamaInputError(f"{what} {text!r} has pieces the tokenizer never saw ({unknown}): the model cannot "
                             "read it; pick a prompt made from the training templates (train/synthetic.py), whose "
                             "words the tokenizer was trained on")


def train_tokenizer(corpus: list[str], vocab_size: int) -> bytes:
    """A sentencepiece model of the corpus with UMT5's special ids (pad 0, eos 1, unk 2)."""
    import io

    import sentencepiece
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buffer, vocab_size=vocab_size, hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=False, minloglevel=2)
    return buffer.getvalue()


def stage_encoders(run: Run) -> None:
    import sentencepiece
    import torch

    from sama_core.bundle import save_umt5_comfy, tiny_siglip, tiny_umt5
    folder = run.path("encoders")
    tmp = run.path(".tmp-encoders")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    corpus = instruction_corpus(run.path("data"))
    spiece = train_tokenizer(corpus, run.budget.vocab_size)
    vocab = sentencepiece.SentencePieceProcessor(model_proto=spiece).get_piece_size()
    g = torch.Generator().manual_seed(0)
    text = tiny_umt5(vocab, run.budget.text_dim, g)
    save_umt5_comfy(text, spiece, tmp / "text_encoder.safetensors")
    init = "random (std 0.15), frozen"
    if run.budget.text_roles_steps:
        from .text_roles import train_text_roles
        text, _, _, stats = train_text_roles(tmp / "text_encoder.safetensors", [run.path("data", "train")],
                                             steps=run.budget.text_roles_steps)
        save_umt5_comfy(text, spiece, tmp / "text_encoder.safetensors")
        init = (f"random (std 0.15), then {stats['step']} steps of word-role tagging (train/text_roles.py: "
                f"role accuracy {stats['role_accuracy']:.3f}, drift {stats['drift']:.3f}), frozen")
    siglip = tiny_siglip(run.budget.siglip_width, g, image_size=64, patch=8, heads=2)  # 8x8 patch grid
    siglip.save_pretrained(str(tmp / "siglip"))  # a folder: train/ reads the head count from its config
    (tmp / "encoders.json").write_text(json.dumps({
        "text_encoder": {"kind": "UMT5 encoder", "d_model": run.budget.text_dim, "layers": 2, "vocab": vocab,
                         "init": init, "tokenizer": f"sentencepiece unigram, {vocab} "
                         f"pieces, trained on {len(corpus)} instructions and captions"},
        "siglip": {"kind": "SigLIP vision tower", "width": run.budget.siglip_width, "layers": 1, "image_size": 64,
                   "patch": 8, "init": "random (std 0.05), frozen"}}, indent=1) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def stage_cache(run: Run, stage: str) -> None:
    write_subset_manifests(run)
    config = run.path(f"shapes_{stage}.yaml")
    if run.reuse is not None and link_reused_cache(run, stage, config):
        return
    python_command(run, ["-m", "train", "cache", "--config", str(config)], f"cache_{stage}")


def link_reused_cache(run: Run, stage: str, config: Path) -> bool:
    """Share the reused run's feature cache when this run's config would build the same one (same
    fingerprint; a cache with anchor tokens also serves a run without them): an ablation then skips the
    encoding (no_ma shares stage 1's cache, no_sa both). False: build our own."""
    from .cache import CachedFeatureDataset, cache_fingerprint
    from .config import load_config
    other = run.reuse / "cache" / stage
    if not (run.reuse / STAMPS / f"cache{stage[-1]}.done").exists():
        return False
    cfg = load_config(config, [])
    try:  # what the trainer itself will accept from that cache
        CachedFeatureDataset(other, cache_fingerprint(cfg), cfg.data.semantic_anchoring)
    except SamaInputError:
        return False  # incomplete, or other settings (e.g. no_ma's stage-0 pretexts): not the same features
    link = run.path("cache", stage)
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        shutil.rmtree(link)  # a partial cache of our own, from before the reused one was complete
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(other.resolve(), target_is_directory=True)
    run.echo(f"[cache{stage[-1]}] the same features as {other}: shared (symlink)")
    return True


def stage_train(run: Run, stage: str) -> None:
    python_command(run, ["-m", "train", stage, "--config", str(run.path(f"shapes_{stage}.yaml")), "--resume",
                         "latest"], stage)


def stage_export(run: Run) -> None:
    export_bundle(run, run.path("bundle"))


def stage_eval(run: Run) -> None:
    # The baselines depend only on the data and the VAE: an ablation that reuses them leaves them to that run.
    baselines = "copy,ground_truth,vae" if run.reuse is None else "copy"
    args = ["-m", "train.eval", "--bundle", str(run.path("bundle")), "--data", str(run.path("data", "heldout")),
            "--out", str(run.path("eval")), "--baselines", baselines,
            "--extra-dit", f"{STAGE0_ROW}={run.path('stage0', 'final', 'sama_dit.safetensors')}",
            "--train-data", str(run.path("data", "train"))]
    if run.budget.eval_clips is not None:
        args += ["--limit", str(run.budget.eval_clips)]
    t0 = time.perf_counter()
    python_command(run, args, "eval")
    # The card is written inside this stage, before run_stage records it: count the evaluation's time here.
    write_card(run, run.path("bundle"), extra_seconds={"eval": round(time.perf_counter() - t0, 2)})


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    deps: tuple
    outputs: tuple          # relative to the run folder; all must exist for the stage to count as done
    workdirs: tuple         # removed before a restart forced by a dependency that ran again
    action: Callable[[Run], None]
    # For a stage whose outputs are a pure function of the run's settings (the data): a digest of them.
    # When the stage runs again (its outputs were deleted, or the run folder was copied without them) and
    # the digest is unchanged, the later stages stay done.
    digest: Optional[Callable[[Run], str]] = None


def data_digest(run: Run) -> str:
    """SHA-256 of what defines the data: each split's dataset.json (generator version, seed, config, count;
    not the seconds it took) and manifests (every instruction, edit and caption)."""
    h = hashlib.sha256()
    files = []
    for split in ("train", "heldout"):
        folder = run.path("data", split)
        files += [folder / "dataset.json", *sorted(folder.glob("*.jsonl"))]
    for path in files:
        content = path.read_bytes()
        if path.name == "dataset.json":
            content = json.dumps({k: v for k, v in json.loads(content).items() if k != "seconds"},
                                 sort_keys=True).encode()
        h.update(path.relative_to(run.out).as_posix().encode() + b"\0" + content)
    return h.hexdigest()


def demo_digest(run: Run) -> str:
    """SHA-256 of the demo pick (sample.json: clip, kind, instruction, change); the clip follows from it."""
    return hashlib.sha256(run.path("demo", "sample.json").read_bytes()).hexdigest()


STAGES = (
    Stage("data", (), ("data/train/dataset.json", "data/heldout/dataset.json"), ("data",), stage_data,
          digest=data_digest),
    Stage("vae", ("data",), ("vae/final/vae.safetensors",), ("vae",), stage_vae),
    Stage("encoders", ("data",), ("encoders/encoders.json",), ("encoders",), stage_encoders),
    Stage("cache0", ("data", "vae", "encoders"), ("cache/stage0/cache_index.json",), ("cache/stage0",),
          lambda run: stage_cache(run, "stage0")),
    Stage("stage0", ("cache0",), ("stage0/final/sama_dit.safetensors",), ("stage0",),
          lambda run: stage_train(run, "stage0")),
    Stage("cache1", ("data", "vae", "encoders"), ("cache/stage1/cache_index.json",), ("cache/stage1",),
          lambda run: stage_cache(run, "stage1")),
    Stage("stage1", ("cache1", "stage0"), ("stage1/final/sama_dit.safetensors",), ("stage1",),
          lambda run: stage_train(run, "stage1")),
    Stage("demo", (), ("demo/sample.json", "demo/sample.mp4", "demo/sample_target.npz"), ("demo",), stage_demo,
          digest=demo_digest),
    Stage("export", ("stage1", "vae", "encoders", "data", "demo"),
          ("bundle/dit.safetensors", "bundle/bundle.json"), ("bundle",), stage_export),
    Stage("eval", ("export", "stage0"), ("eval/results.md", "bundle/README.md"), ("eval",), stage_eval),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
_CACHE_STAGES = ("cache0", "cache1")


def stages_of(run: Run) -> tuple:
    """The stages of this run: without the cache stages when its budget trains from the clips (a stage that
    depended on a cache depends on what the cache depended on)."""
    if run.budget.cached:
        return STAGES
    cache_deps = {s.name: s.deps for s in STAGES if s.name in _CACHE_STAGES}
    out = []
    for stage in STAGES:
        if stage.name in cache_deps:
            continue
        deps = []
        for d in stage.deps:
            for dep in cache_deps.get(d, (d,)):
                if dep not in deps:
                    deps.append(dep)
        out.append(dataclasses.replace(stage, deps=tuple(deps)))
    return tuple(out)


def _stamp(run: Run, name: str, what: str = "done") -> Path:
    return run.path(STAMPS, f"{name}.{what}")


def _mtime(path: Path) -> float:
    return path.stat().st_mtime_ns if path.exists() else -1


def stage_state(run: Run, stage: Stage) -> str:
    """'done', 'stale' (done before a dependency ran again) or 'pending'."""
    done = _stamp(run, stage.name)
    if not done.exists() or not all(run.path(o).exists() for o in stage.outputs):
        return "pending"
    newest_dep = max((_mtime(_stamp(run, d)) for d in stage.deps), default=-1)
    return "done" if _mtime(done) >= newest_dep else "stale"


def run_stage(run: Run, stage: Stage) -> None:
    started, done = _stamp(run, stage.name, "started"), _stamp(run, stage.name)
    newest_dep = max((_mtime(_stamp(run, d)) for d in stage.deps), default=-1)
    if started.exists() and _mtime(started) < newest_dep:
        # A dependency ran again since this stage began: its partial or old results are not resumable.
        for folder in stage.workdirs:
            path = run.path(folder)
            if path.is_symlink():
                continue  # shared with the reused run: never removed from here
            if path.exists():
                run.echo(f"[{stage.name}] a dependency changed: removing {path}")
                shutil.rmtree(path)
    started.parent.mkdir(exist_ok=True)
    old_digest, old_started, old_done = _stamped_digest(done), _mtime(started), _mtime(done)
    done.unlink(missing_ok=True)
    started.touch()
    _touch_later_than(started, newest_dep)
    t0 = time.perf_counter()
    stage.action(run)
    missing = [o for o in stage.outputs if not run.path(o).exists()]
    if missing:
        raise SamaInputError(f"stage {stage.name} finished without writing {missing}; see {run.path('logs')}")
    digest = stage.digest(run) if stage.digest is not None else None
    done.write_text(time.strftime("%Y-%m-%d %H:%M:%S\n") + (f"digest {digest}\n" if digest else ""))
    _touch_later_than(done, _mtime(started))
    if digest is not None and digest == old_digest:
        # The same outputs as before: the stamps keep their times, so the later stages stay done.
        run.echo(f"[{stage.name}] the same {stage.name} as before (digest {digest[:12]}): later stages stay done")
        for path, ns in ((started, old_started), (done, old_done)):
            if ns >= 0:
                os.utime(path, ns=(ns, ns))
    run.record(stage.name, time.perf_counter() - t0)


def _stamped_digest(done: Path) -> Optional[str]:
    if not done.exists():
        return None
    lines = [line for line in done.read_text().splitlines() if line.startswith("digest ")]
    return lines[0].split(" ", 1)[1] if lines else None


def _touch_later_than(path: Path, other_ns: float) -> None:
    """Make path's mtime strictly newer than other_ns (coarse file-system clocks can tie)."""
    if _mtime(path) <= other_ns:
        ns = int(other_ns) + 1_000_000
        os.utime(path, ns=(ns, ns))


def run_pipeline(run: Run, until: Optional[str] = None, install: bool = False) -> list[str]:
    """Run every stage that is not done (up to `until`); returns the names of the stages that ran."""
    stages = stages_of(run)
    names = [stage.name for stage in stages]
    if until is not None and until not in names:
        raise SamaInputError(f"--until must be one of {', '.join(names)}, got {until!r}")
    write_configs(run)
    ran = []
    for stage in stages:
        state = stage_state(run, stage)
        if state == "done":
            run.echo(f"[{stage.name}] done, skipped")
        else:
            why = "running" if state == "pending" else "running again (a dependency changed)"
            run.echo(f"[{stage.name}] {why}")
            run_stage(run, stage)
            ran.append(stage.name)
        if stage.name == until:
            break
    if install:
        if stage_state(run, stages[-1]) != "done":
            raise SamaInputError("--install needs a complete run (the eval stage writes the model card)")
        install_bundle(run.path("bundle"), ASSET_BUNDLE)
        run.echo(f"installed the bundle into {ASSET_BUNDLE}")
    return ran


# ------------------------------------------------------------------------------------------------ export

def export_bundle(run: Run, folder: Path) -> Path:
    """The bundle of the run: stage 1's DiT (stored in the budget's dtype), the VAE, the encoders, the demo
    clip; written next to `folder` and renamed into place when complete."""
    import torch

    from sama_core.anchors import load_siglip_vision
    from sama_core.bundle import write_bundle
    from sama_core.loading import load_dit
    from sama_core.text import load_umt5_encoder
    from sama_core.vae import load_wan_vae
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    tmp = folder.with_name(f".tmp-{folder.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    dit = load_dit(run.path("stage1", "final", "sama_dit.safetensors"), dtype=torch.float32)
    dit = dit.to(dtypes[run.budget.dit_dtype])
    vae = load_wan_vae(run.path("vae", "final", "vae.safetensors"))
    text, spiece = load_umt5_encoder([run.path("encoders", "text_encoder.safetensors")], dtype=torch.float32)
    siglip = load_siglip_vision(run.path("encoders", "siglip"))
    demo = json.loads(run.path("demo", "sample.json").read_text())
    check_known_pieces(spiece, demo["instruction"], "the demo instruction")
    # FlowEdit where it combines with the user's options (sama_core/flowedit.py): on 500 held-out edits of
    # three sets it lowered the motion error by 0.34-0.42 px at -2.5 to +1 accuracy points (sessions 16-17).
    # Keep unchanged (sama_core/region.py): the source's own pixels wherever the decoded edit matches the
    # source's round trip; on 200 held-out edits -1.51 px of motion error at -6.5 accuracy points (session 20).
    from sama_core.region import KEEP_UNCHANGED_DEFAULT
    defaults = {"steps": run.budget.sample_steps, "guidance": default_guidance(run), "shift": 5.0,
                "target_area": 64 * 64, "flowedit": "auto", "keep_unchanged": KEEP_UNCHANGED_DEFAULT}
    write_bundle(tmp, dit, vae, text, spiece, siglip, defaults, card=base_card(run, demo))
    shutil.copy2(run.path("demo", "sample.mp4"), tmp / "sample.mp4")
    # The ground-truth edit of the demo clip (same motion, only the requested change): what the tests and
    # users compare the demo's output with.
    from .synthetic import load_clip, save_clip
    save_clip(tmp / "sample_target.mp4", load_clip(run.path("demo", "sample_target.npz")), crf=12)
    write_demo_region(tmp)
    size = sum(p.stat().st_size for p in tmp.iterdir())
    if size > MAX_BUNDLE_BYTES and run.budget.name == "full":
        raise SamaInputError(f"the bundle is {size / 2**20:.1f} MB, over the {MAX_BUNDLE_BYTES / 2**20:.0f} MB "
                             "the repository ships: lower the DiT or VAE width")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    run.echo(f"bundle written to {folder} ({size / 2**20:.2f} MB)")
    return folder


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def default_guidance(run: Run) -> float:
    """The bundle's guidance: 2.0 when stage 1 trained with prompt dropout (the DiT then knows the
    unconditional prediction that guidance extrapolates from; session 5 measured 2 best on the demo), else
    1.0 (no guidance: without dropout, guidance > 1 made edits worse, session 4)."""
    from .config import load_config
    return 2.0 if load_config(run.path("shapes_stage1.yaml")).train.prompt_dropout > 0 else 1.0


def final_config(run: Run, stage: str):
    """The config a stage's exported DiT was trained with last (a resumed run may have overridden the run's
    shapes_<stage>.yaml, e.g. with a learning-rate step), else the run's."""
    from .config import load_config
    used = run.path(stage, "final", "config.yaml")
    return load_config(used if used.exists() else run.path(f"shapes_{stage}.yaml"))


def trained_steps(run: Run, stage: str) -> int:
    """The step of the stage's export (the run may have stopped on the clock before max_steps)."""
    export = _read_json(run.path(stage, "final", "export.json"))
    return export["step"] if "step" in export else final_config(run, stage).train.max_steps


def decoder_card(stats: dict) -> dict:
    """A VAE whose decoder was (re)trained behind the frozen encoder (train/vae_train.py trainable: decoder):
    the encoder is the run's, the decoder's width and last steps are these (the lineage has the history)."""
    if stats.get("trainable") != "decoder":
        return {}
    return {"decoder": {"trained": "behind the frozen encoder (train/vae_train.py trainable: decoder)",
                        "base_dim": stats.get("decoder_base_dim"), "last_run_steps": stats.get("step")}}


def base_card(run: Run, demo: dict) -> dict:
    import torch
    s0, s1 = (final_config(run, s) for s in ("stage0", "stage1"))
    vae_cfg = yaml.safe_load(run.path("shapes_vae.yaml").read_text())
    stats = _read_json(run.path("vae", "final", "latent_stats.json"))
    data = _read_json(run.path("data", "train", "dataset.json"))
    heldout = _read_json(run.path("data", "heldout", "dataset.json"))
    state = run.read_state()
    return {
        "name": "SAMA-Shapes", "trained": True, "budget": run.budget.name, "variant": run.variant,
        "demo_prompt": demo["instruction"], "demo_video": "sample.mp4", "demo_target_video": "sample_target.mp4",
        "demo_clip": demo["clip"], "demo_kind": demo.get("kind"), "demo_change": demo["change"],
        "what": "A tiny SAMA (Wan2.1-architecture DiT with semantic anchoring and motion alignment) trained by "
                "this repository's train/ on procedurally generated clips of moving shapes. It edits 64x64 "
                "clips of coloured circles/squares/triangles/stars; it knows nothing else.",
        "data": {"generator": "train/synthetic.py (SAMA-Shapes)", "train_clips": data.get("num_clips"),
                 "train_counts": data.get("counts"), "heldout_clips": heldout.get("num_clips"),
                 "frames": run.budget.frames, "size": "64x64", "seed_scheme": data.get("seed_scheme")},
        "components": {
            "dit": {**s0.model.config, "stored_dtype": run.budget.dit_dtype},
            "vae": {"base_dim": vae_cfg["model"]["base_dim"], "z_dim": 16, "steps": vae_cfg["max_steps"],
                    "heldout_psnr_db": stats.get("heldout_psnr"), "train_psnr_db": stats.get("train_psnr"),
                    "latent_normalisation": "measured mean/std folded into quant_conv/post_quant_conv so the "
                                            "Wan2.1 constants normalise it (train/vae_train.py)",
                    **decoder_card(stats)},
            **_read_json(run.path("encoders", "encoders.json"))},
        "training": {"stage0_steps": trained_steps(run, "stage0"), "stage1_steps": trained_steps(run, "stage1"),
                     "batch_size": s0.train.batch_size, "stage0_lr": s0.optim.lr, "stage1_lr": s1.optim.lr,
                     **({"stage1_lr_from_step": s1.optim.decay_from_step, "stage1_final_lr": s1.optim.final_lr}
                        if s1.optim.decay_from_step is not None else {}),
                     "semantic_anchoring": s1.data.semantic_anchoring, "pretext_mix": s0.data.pretext_mix,
                     "ema_decay": s0.ema.decay},
        "hardware": {"machine": platform.machine(), "processor": platform.processor() or None,
                     "cpu_count": os.cpu_count(), "torch": torch.__version__,
                     "device": "cuda" if torch.cuda.is_available() else "cpu"},
        "seconds": {k: v["seconds"] for k, v in state.get("stages", {}).items()},
        # A model continued from earlier runs (e.g. on a GPU lease, or from a model trained on older data)
        # says so: RUN/lineage.json, a list of {"what", "steps", "batch", "data", "hardware", "minutes"}.
        **({"lineage": _read_json_list(run.path(LINEAGE_FILE))} if run.path(LINEAGE_FILE).exists() else {}),
    }


def _read_json_list(path: Path) -> list:
    value = json.loads(path.read_text())
    if not isinstance(value, list) or not all(isinstance(step, dict) for step in value):
        raise SamaInputError(f"{path} must hold a JSON list of objects (one per stage of the model's "
                             "history), e.g. [{\"what\": \"stage 1\", \"steps\": 1000}].")
    return value


def write_card(run: Run, folder: Path, extra_seconds: Optional[dict] = None) -> None:
    """Put the evaluation into bundle.json's card and write the human-readable model card README.md."""
    from sama_core.bundle import BUNDLE_FILE
    spec = json.loads((folder / BUNDLE_FILE).read_text())
    card = spec.setdefault("card", {})
    card["seconds"] = {k: v["seconds"] for k, v in run.read_state().get("stages", {}).items()}
    for stage, seconds in (extra_seconds or {}).items():
        card["seconds"][stage] = card["seconds"].get(stage, 0.0) + seconds
    card["metrics"] = card_metrics(_read_json(run.path("eval", "metrics.json")).get("summaries", {}))
    table = run.path("eval", "results.md").read_text() if run.path("eval", "results.md").exists() else ""
    write_card_files(folder, spec, table)


def card_metrics(summaries: dict) -> dict:
    """train.eval's metrics.json "summaries" -> the card's metrics: each row's overall numbers plus its
    accuracy per edit kind and per background style."""
    return {method: {k: v for k, v in s["all"].items()} | {
        "accuracy_per_kind": {kind: block["accuracy"] for kind, block in s.items()
                              if kind not in ("all", "by_background")},
        "accuracy_per_background": {style: block["accuracy"] for style, block in s.get("by_background", {}).items()}}
        for method, s in summaries.items()}


def write_card_files(folder: Path, spec: dict, table: str) -> None:
    """bundle.json (atomically) and README.md, the model card in words, with `table` (train.eval's
    results.md) as its evaluation."""
    from sama_core.bundle import BUNDLE_FILE
    card = spec.setdefault("card", {})
    tmp = folder / f".{BUNDLE_FILE}.tmp"
    tmp.write_text(json.dumps(spec, indent=2) + "\n")
    os.replace(tmp, folder / BUNDLE_FILE)
    total = sum(card.get("seconds", {}).values())

    def block(title, value):
        return [f"## {title}", "", "```json", json.dumps(value, indent=1), "```", ""]

    text = [f"# {card.get('name', 'SAMA-Shapes')} model card", "", card.get("what", ""), "",
            "## Use", "", "```bash",
            "# the demo prompt on the bundled clip (BUNDLE = this folder):",
            "python -m sama_core demo --bundle BUNDLE --video BUNDLE/sample.mp4",
            ("python -m sama_core edit --model BUNDLE --video CLIP.mp4 --prompt 'make the red circle blue' "
             "--out edit.mp4"),
            "```", "",
            (f"Demo clip: `sample.mp4` ({card.get('demo_clip')}, never trained on), prompt: "
             f"\"{card.get('demo_prompt')}\" (a {card.get('demo_kind') or 'colour'} edit: the first clear one of "
             "the demo split, train/shapes.py is_clear_demo). "
             f"Defaults: {json.dumps(spec.get('defaults', {}))}."), ""]
    text += block("Data", card.get("data", {}))
    text += block("Components", card.get("components", {}))
    text += block("Training", card.get("training", {}))
    if card.get("lineage"):
        text += ["## Lineage", "",
                 "The DiT was continued from earlier runs; every step of its history, oldest first:", "",
                 "| what | steps | batch | data | hardware | minutes |", "|---|---|---|---|---|---|"]
        text += [f"| {step.get('what', '')} | {step.get('steps', '')} | {step.get('batch', '')} | "
                 f"{step.get('data', '')} | {step.get('hardware', '')} | {step.get('minutes', '')} |"
                 for step in card["lineage"]]
        text += [""]
    text += [(f"Hardware: {json.dumps(card.get('hardware', {}))}. Wall time per stage (s): "
              f"{json.dumps(card.get('seconds', {}))}, {total / 3600:.2f} h in total."), ""]
    text += ["## Evaluation (held-out clips, train/eval.py)", "",
             table.replace("# SAMA-Shapes evaluation\n", "") if table else
             "Not evaluated yet: `python -m train.eval --bundle BUNDLE ...`, then `python -m train.shapes card`."]
    text += ["## Limits", "",
             ("Toy data only: 64x64 clips of four shapes in eight colours on eight backgrounds. The text encoder "
              "and SigLIP are frozen (SigLIP random; the text encoder as Components says); the VAE is tiny, so "
              "outputs are blurrier than the inputs. "
              + (f"Guidance {spec['defaults']['guidance']} (stage 1 trained with prompt dropout)."
                 if spec.get("defaults", {}).get("guidance", 1.0) > 1.0
                 else "Guidance is 1.0 (no prompt dropout in training).")
              + (" Sampling is FlowEdit where it combines with the options given (flowedit \"auto\"; "
                 "`--no-flowedit` for the released sampler): it keeps more of what the instruction leaves alone."
                 if spec.get("defaults", {}).get("flowedit") else "")
              + (f" Keep unchanged {spec['defaults']['keep_unchanged']:g}: wherever the decoded edit matches the "
                 "source's round trip through the VAE, the output is the source's own pixels (`--keep-unchanged 0` "
                 "shows the edit as decoded)."
                 if spec.get("defaults", {}).get("keep_unchanged") else ""))]
    (folder / "README.md").write_text("\n".join(text) + "\n")


CARD_DIT_FIELDS = ("dim", "ffn_dim", "num_heads", "num_layers", "text_dim", "freq_dim", "siglip_dim",
                   "siglip_hidden_dim")


def swap_dit(bundle: Path, dit_file: Path, out: Path, lineage: list) -> Path:
    """A copy of `bundle` in `out` (a new folder) with the DiT of `dit_file` (a continued stage 1's export,
    e.g. from scripts/shapes_stage1_gpu.sh) stored in the bundle's DiT dtype, `lineage` (a list of
    {"what", "steps", "batch", "data", "hardware", "minutes"}) appended to the card's history, and the card's
    metrics cleared: they described the old DiT. `python -m train.eval` on the new bundle, then
    `python -m train.shapes card`, puts the new DiT's evaluation in."""
    import torch
    from safetensors import safe_open

    from sama_core.bundle import BUNDLE_FILE
    from sama_core.loading import load_dit, save_dit
    from sama_core.pipeline import read_bundle_spec
    bundle, out = Path(bundle), Path(out)
    if not (bundle / BUNDLE_FILE).is_file():
        raise SamaFileNotFoundError(f"{bundle} holds no {BUNDLE_FILE}: give a bundle folder")
    if out.exists():
        raise SamaInputError(f"{out} already exists: give a new folder for the bundle with the swapped DiT")
    if not isinstance(lineage, list) or not all(isinstance(step, dict) and step.get("what") for step in lineage):
        raise SamaInputError("the lineage must be a JSON list of objects, each with a \"what\" (e.g. [{\"what\": "
                             "\"stage 1 continued\", \"steps\": 2000, \"batch\": 8}])")
    spec = read_bundle_spec(bundle / BUNDLE_FILE)
    with safe_open(str(bundle / spec["dit"]), "pt") as f:
        stored = f.get_slice(next(iter(f.keys()))).get_dtype()
    dtypes = {"F16": (torch.float16, "fp16"), "BF16": (torch.bfloat16, "bf16"), "F32": (torch.float32, "fp32")}
    dtype, dtype_name = dtypes.get(stored, (torch.float32, "fp32"))
    dit = load_dit(dit_file, dtype=torch.float32)
    tmp = out.with_name(f".tmp-{out.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(bundle, tmp)
    save_dit(dit.to(dtype), tmp / spec["dit"])
    card = spec.setdefault("card", {})
    config = dataclasses.asdict(dit.config)
    card.setdefault("components", {})["dit"] = {k: config[k] for k in CARD_DIT_FIELDS if k in config} | {
        "stored_dtype": dtype_name}
    card["lineage"] = list(card.get("lineage", [])) + lineage
    card["metrics"], card["seconds"] = {}, {}
    write_card_files(tmp, spec, "")
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def card_from_eval(bundle: Path, evaluation: Path) -> dict:
    """The card of `bundle` rewritten from a finished `python -m train.eval --bundle bundle` (or its --merge):
    its rows as the metrics, its per-row seconds, its results.md as the README's table. The bundle's own row
    must be in it under train.eval's default name, SAMA-Shapes (what the tests and the README read)."""
    from sama_core.bundle import BUNDLE_FILE
    bundle, evaluation = Path(bundle), Path(evaluation)
    if not (bundle / BUNDLE_FILE).is_file():
        raise SamaFileNotFoundError(f"--bundle {bundle} holds no {BUNDLE_FILE}: give the bundle that was evaluated")
    if not (evaluation / "results.md").is_file() or not (evaluation / "metrics.json").is_file():
        raise SamaInputError(f"{evaluation} is not a finished train.eval output (results.md, metrics.json)")
    spec = json.loads((bundle / BUNDLE_FILE).read_text())
    card = spec.setdefault("card", {})
    metrics = json.loads((evaluation / "metrics.json").read_text())
    summaries = metrics.get("summaries", {})
    name = "SAMA-Shapes"
    if name not in summaries:
        raise SamaInputError(f"{evaluation} has no row '{name}' (it has {', '.join(summaries) or 'none'}): "
                             f"evaluate this bundle with python -m train.eval --bundle {bundle}")
    card["metrics"] = card_metrics(summaries)
    card["seconds"] = {"eval": round(sum(metrics.get("seconds", {}).values()), 2)}
    write_card_files(bundle, spec, (evaluation / "results.md").read_text())
    return card


def install_bundle(source: Path, target: Path) -> Path:
    """Copy the bundle into the package (atomically: a half-copied bundle never appears there)."""
    if not (source / "bundle.json").exists():
        raise SamaFileNotFoundError(f"{source} holds no bundle.json: run the export stage first")
    tmp = target.with_name(f".tmp-{target.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(source, tmp)
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    return target


def unpack_bundle(bundle: Path, out: Path) -> Path:
    """The frozen parts and the DiT of a bundle, laid out as a run folder for continued stage-1 training
    (what scripts/shapes_stage1_gpu.sh and shapes_stage1_gpu_arms.sh take as RUN / BASE_RUN):

        out/vae/final/vae.safetensors          the bundle's VAE, byte for byte
        out/encoders/text_encoder.safetensors  the bundle's text encoder with its tokenizer, byte for byte
        out/encoders/siglip/                   the bundle's SigLIP as a transformers folder (its config carries
                                               the head count, which the single file does not)
        out/init/sama_dit.safetensors          the bundle's DiT, byte for byte

    So the bundled model can be fine-tuned without the run that made it: train/ then encodes exactly what
    the bundle's pipeline encodes (tested)."""
    from sama_core.anchors import load_siglip_vision
    from sama_core.bundle import BUNDLE_FILE
    from sama_core.pipeline import read_bundle_spec
    bundle, out = Path(bundle), Path(out)
    if not (bundle / BUNDLE_FILE).is_file():
        raise SamaFileNotFoundError(f"{bundle} holds no {BUNDLE_FILE}: give a bundle folder such as "
                                    f"{ASSET_BUNDLE.relative_to(REPO)}")
    spec = read_bundle_spec(bundle / BUNDLE_FILE)
    if not spec.get("siglip"):
        raise SamaInputError(f"{bundle / BUNDLE_FILE} names no 'siglip': stage 1 needs the anchor encoder")
    files = {name: bundle / spec[name] for name in ("dit", "vae", "text_encoder", "siglip")}
    for name, path in files.items():
        if not path.is_file():
            raise SamaFileNotFoundError(f"{path} (the bundle's '{name}') is missing")
    taken = [str(out / name) for name in ("vae", "encoders", "init") if (out / name).exists()]
    if taken:
        raise SamaInputError(f"{', '.join(taken)} already exist: give an empty --out folder")
    siglip = load_siglip_vision(files["siglip"], num_attention_heads=spec.get("siglip_num_heads"))
    # Written aside first, so a failure (a full disk) leaves no half folder behind.
    tmp = out / ".tmp-unbundle"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        for folder in ("vae/final", "encoders", "init"):
            (tmp / folder).mkdir(parents=True)
        shutil.copy2(files["vae"], tmp / "vae" / "final" / "vae.safetensors")
        shutil.copy2(files["text_encoder"], tmp / "encoders" / "text_encoder.safetensors")
        shutil.copy2(files["dit"], tmp / "init" / "sama_dit.safetensors")
        siglip.save_pretrained(str(tmp / "encoders" / "siglip"))
        for name in ("vae", "encoders", "init"):
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------------ curves

def checkpoint_dit(checkpoint: Path, final_dit: Path, out_file: Path) -> Path:
    """A DiT file with a checkpoint's EMA weights (the config and any frozen weights from the stage's export)."""
    from sama_core.loading import save_dit

    from .checkpoint import load_dit_with_ema
    save_dit(load_dit_with_ema(final_dit, checkpoint), out_file)
    return out_file


def convergence_curves(run: Run, limit: int = 20, kinds=("color", "remove", "add")) -> Path:
    """Edit accuracy of every kept checkpoint of stage 0 and stage 1 on the first `limit` held-out clips,
    and the training losses; RUN/curves/curves.json + curves.png."""
    import tempfile

    from sama_core.pipeline import SamaPipeline

    from .checkpoint import list_checkpoints
    from .eval import evaluate, pipeline_method, read_cases
    rows = read_cases(run.path("data", "heldout"), limit, kinds)
    points = []
    for stage in ("stage0", "stage1"):
        final = run.path(stage, "final", "sama_dit.safetensors")
        if not final.exists():
            continue
        for step, folder in list_checkpoints(run.path(stage)):
            with tempfile.TemporaryDirectory() as tmp:
                dit = checkpoint_dit(folder, final, Path(tmp) / "dit.safetensors")
                pipe = SamaPipeline.from_bundle(run.path("bundle"), device="cpu", dtype="fp32", dit=str(dit))
                report = evaluate({"model": pipeline_method(pipe, pipe.sampler_options())}, rows)
            accuracy = report.summaries["model"]["all"]["accuracy"]
            points.append({"stage": stage, "step": step, "accuracy": accuracy,
                           "progress": report.summaries["model"]["all"]["progress"]})
            run.echo(f"[curve] {stage} step {step}: accuracy {accuracy:.3f}")
    losses = {}
    for stage in ("stage0", "stage1"):
        path = run.path(stage, "logs", "metrics.jsonl")
        if path.exists():
            losses[stage] = [json.loads(line) for line in path.read_text().splitlines()]
    folder = run.path("curves")
    folder.mkdir(exist_ok=True)
    (folder / "curves.json").write_text(json.dumps({"variant": run.variant, "kinds": list(kinds), "limit": limit,
                                                    "points": points}, indent=1) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for stage, rows_ in losses.items():
        axes[0].plot([r["step"] for r in rows_], [r["loss_video"] for r in rows_], label=f"{stage} video loss")
    axes[0].set_xlabel("step")
    axes[0].set_yscale("log")
    axes[0].legend()
    for stage in ("stage0", "stage1"):
        pts = [p for p in points if p["stage"] == stage]
        axes[1].plot([p["step"] for p in pts], [p["accuracy"] for p in pts], marker="o", label=stage)
    axes[1].set_xlabel("step (of the stage)")
    axes[1].set_ylabel(f"edit accuracy ({', '.join(kinds)})")
    axes[1].set_ylim(0, 1)
    axes[1].legend()
    fig.suptitle(f"SAMA-Shapes {run.variant}")
    fig.tight_layout()
    fig.savefig(folder / "curves.png", dpi=100)
    plt.close(fig)
    return folder / "curves.png"


# ------------------------------------------------------------------------------------------------ CLI

@command_line("interrupted: run the same command again to continue")
def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m train.shapes", description="SAMA-Shapes end to end.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("run", help="run (or continue) every stage up to the bundle and its evaluation")
    p.add_argument("--out", required=True, help="run folder, e.g. runs/shapes")
    p.add_argument("--budget", default="full", help=f"one of {', '.join(BUDGETS)} (default full)")
    p.add_argument("--variant", default="full", help=f"ablation: one of {', '.join(VARIANTS)} (default full)")
    p.add_argument("--reuse", default=None, help="share data, VAE and encoders with this (finished) run")
    p.add_argument("--until", default=None, help=f"stop after this stage ({', '.join(STAGE_NAMES)})")
    p.add_argument("--install", action="store_true",
                   help=f"copy the bundle into {ASSET_BUNDLE.relative_to(REPO)}")
    p.add_argument("--resume", action="store_true", help="accepted for clarity: every run continues what exists")
    p = sub.add_parser("status", help="which stages are done")
    p.add_argument("--out", required=True)
    p = sub.add_parser("curve", help="edit accuracy of the kept checkpoints + loss curves (RUN/curves/)")
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=20, help="held-out clips per checkpoint (default 20)")
    p = sub.add_parser("compare", help="the toy reproduction: several finished runs in one table + plot")
    p.add_argument("--runs", nargs="+", required=True, help="run folders, e.g. runs/shapes runs/shapes_no_sa")
    p.add_argument("--out", required=True, help="folder for results.md, compare.json, convergence.png")
    p = sub.add_parser("unbundle", help="a bundle's VAE, encoders and DiT as a run folder to continue stage 1 "
                       "from (scripts/shapes_stage1_gpu.sh RUN)")
    p.add_argument("--bundle", default=str(ASSET_BUNDLE), help="bundle folder (default: the shipped one)")
    p.add_argument("--out", required=True, help="new run folder, e.g. runs/from_bundle")
    p = sub.add_parser("swap-dit", help="a copy of a bundle with another DiT (a continued stage 1) and the "
                       "history in its card; its metrics cleared until `card`")
    p.add_argument("--bundle", default=str(ASSET_BUNDLE), help="bundle folder (default: the shipped one)")
    p.add_argument("--dit", required=True, help="the DiT file, e.g. RUN/stage1/final/sama_dit.safetensors")
    p.add_argument("--lineage", required=True,
                   help="JSON file: a list of {what, steps, batch, data, hardware, minutes}, the DiT's new history")
    p.add_argument("--out", required=True, help="new bundle folder")
    p = sub.add_parser("card", help="a bundle's card and README from a finished train.eval of it (then "
                       "--install copies the bundle into the package)")
    p.add_argument("--bundle", required=True)
    p.add_argument("--eval", required=True, help="train.eval --out folder (or its --merge)")
    p.add_argument("--install", action="store_true",
                   help=f"copy the bundle into {ASSET_BUNDLE.relative_to(REPO)}")
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.command == "run":
        run = start_run(args.out, args.budget, args.variant, args.reuse)
        t0 = time.perf_counter()
        ran = run_pipeline(run, args.until, args.install)
        print(f"ran {', '.join(ran) or 'nothing (all done)'} in {time.perf_counter() - t0:.1f} s; "
              f"bundle: {run.path('bundle')}, evaluation: {run.path('eval', 'results.md')}")
        return 0
    if args.command == "unbundle":
        out = unpack_bundle(Path(args.bundle), Path(args.out))
        print(f"{out}: vae/final, encoders and init/sama_dit.safetensors from {args.bundle}; continue stage 1 "
              f"with: RUN={out} CACHE={out / 'cache'} CLIPS=400 MINUTES=30 bash scripts/shapes_stage1_gpu.sh "
              "(on a CPU add BATCH=8 CACHE_BATCH=8)")
        return 0
    if args.command == "swap-dit":
        lineage_file = Path(args.lineage)
        if not lineage_file.is_file():
            raise SamaFileNotFoundError(f"--lineage {lineage_file}: no such file")
        try:
            lineage = json.loads(lineage_file.read_text())
        except ValueError as e:
            raise SamaInputError(f"--lineage {lineage_file} is not valid JSON ({e})") from None
        out = swap_dit(Path(args.bundle), Path(args.dit), Path(args.out), lineage)
        print(f"{out}: the bundle with {args.dit}; evaluate it (python -m train.eval --bundle {out} --data HELDOUT "
              f"--baselines copy,ground_truth,vae --flowedit off --out EVAL), then python -m train.shapes card "
              f"--bundle {out} --eval EVAL")
        return 0
    if args.command == "card":
        card = card_from_eval(Path(args.bundle), Path(args.eval))
        print(f"{args.bundle}: card rows {', '.join(card['metrics'])}")
        if args.install:
            print(f"installed into {install_bundle(Path(args.bundle), ASSET_BUNDLE)}")
        return 0
    if args.command == "compare":
        from .shapes_compare import compare
        print(f"toy reproduction: {compare(args.runs, Path(args.out))}")
        return 0
    if not (Path(args.out) / RUN_FILE).exists():
        raise SamaFileNotFoundError(f"{args.out} is not a SAMA-Shapes run (no {RUN_FILE})")
    state = json.loads((Path(args.out) / RUN_FILE).read_text())
    run = start_run(args.out, state["budget"], state["variant"], state.get("reuse"))
    if args.command == "status":
        for stage in stages_of(run):
            seconds = state.get("stages", {}).get(stage.name, {}).get("seconds")
            spent = "" if seconds is None else f"{seconds:.0f} s"
            print(f"{stage.name:9s} {stage_state(run, stage):8s} {spent}")
        return 0
    print(f"curves: {convergence_curves(run, args.limit)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
