"""The SAMA nodes in a real ComfyUI (tests/comfy_host.py), with tiny random models written by the tests.

- The tiny workflows of workflows/ (plain edit, anchored edit, native KSampler) run end to end on a
  video: the saved video has the source's frame count, size and fps.
- The pretext preview workflow: perturbed frames, mask and task instruction.
- Sampler semantics through the server: anchors at strength 0 change nothing, anchors at 0.5 do; a
  Wan2.1 base (sharded) + SAMA file equals the merged file.
- Invalid inputs (a 2-frame source, a non-SAMA model file, an empty instruction) fail in their node
  with the pack's clean error, and the server keeps serving.
- Progress reaches the client over the websocket, and the interrupt button stops SAMA Sampler.

Most prompts here skip the VAE (a Wan latent from EmptyHunyuanLatentVideo as the source, SaveLatent as
the output): the DiT is tiny, so they take milliseconds.
"""

import asyncio
import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfy_host import PromptFailed, load_workflow

pytest_plugins = ["comfy_host"]  # the session-scoped `comfy_server` fixture
pytestmark = pytest.mark.comfy_host

# The tiny models under the names the tiny workflows use (workflows/tiny_demo*_api.json).
DIT = "sama_tiny_dit.safetensors"
TEXT_ENCODER = "sama_tiny_umt5.safetensors"
VAE = "sama_tiny_vae.safetensors"
SIGLIP = "sama_tiny_siglip.safetensors"
SIGLIP_HEADS = 2
BASE_SHARD = "sama_tiny_base/diffusion_pytorch_model-00001-of-00002.safetensors"
SAMA_ONLY = "sama_tiny_sama_parts.safetensors"
NOT_A_DIT = "sama_tiny_vae_as_dit.safetensors"

SOURCE_VIDEO = "sama_tiny_demo.mp4"  # the file name the tiny workflows load
SOURCE_LEVELS = [30, 90, 150, 210]  # 4 frames (padded to 5 for the edit), one grey level each
SOURCE_SIZE = (48, 32)  # (width, height): not the 32x32 the tiny workflows edit at, so restoring is tested
SOURCE_FPS = 8
TINY_EDIT_SIZE = (32, 32)

SAMPLER_NODE = "10"  # the SAMA Sampler / KSampler node id in the tiny workflows


def _unique(prefix: str) -> str:
    """Fresh names per run: the server caches node results of identical inputs."""
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------------------------------------
# Fixtures: model files and inputs in the server's folders


def _write_sharded_base_and_sama_file(dit_path, base_dir, sama_path) -> None:
    """The merged tiny DiT split like the released files: the Wan2.1 base in two shards with an index,
    and the SAMA parts (segment embedding, SigLIP MLP, semantic head) in a file of their own."""
    from sama_core.config import SAMA_KEY_PREFIXES

    state = load_file(str(dit_path))
    with safe_open(str(dit_path), framework="pt") as f:
        metadata = f.metadata()  # the config (heads) travels with the SAMA file
    sama_keys = sorted(k for k in state if k.startswith(tuple(SAMA_KEY_PREFIXES)))
    wan_keys = sorted(set(state) - set(sama_keys))
    assert sama_keys and wan_keys
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": wan_keys[: len(wan_keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": wan_keys[len(wan_keys) // 2:]}
    base_dir.mkdir(parents=True, exist_ok=True)
    for name, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(base_dir / name))
    index = {"metadata": {}, "weight_map": {k: name for name, keys in shards.items() for k in keys}}
    (base_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    save_file({k: state[k] for k in sama_keys}, str(sama_path), metadata=metadata)


def _write_video(path, levels, size, fps) -> None:
    import imageio_ffmpeg

    width, height = size
    writer = imageio_ffmpeg.write_frames(str(path), (width, height), fps=fps, codec="libx264",
                                         pix_fmt_out="yuv420p", quality=9)
    writer.send(None)
    for level in levels:
        writer.send(np.full((height, width, 3), level, np.uint8).tobytes())
    writer.close()


def _read_video(path):
    """(frames (F, H, W, 3) uint8, fps) of a saved video."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
        return frames, float(stream.average_rate)


def _read_png(path):
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def tiny(comfy_server, tmp_path_factory):
    """The tiny random bundle's files in the server's model folders, and the source video in input/."""
    from sama_core.bundle import write_tiny_random_bundle

    bundle = write_tiny_random_bundle(tmp_path_factory.mktemp("tiny_bundle") / "bundle")
    host = comfy_server
    shutil.copy(bundle / "dit.safetensors", host.model_path("diffusion_models", DIT))
    shutil.copy(bundle / "text_encoder.safetensors", host.model_path("text_encoders", TEXT_ENCODER))
    shutil.copy(bundle / "siglip.safetensors", host.model_path("clip_vision", SIGLIP))
    shutil.copy(bundle / "vae.safetensors", host.model_path("diffusion_models", NOT_A_DIT))  # a wrong file
    shutil.copyfile(bundle / "vae.safetensors", host.model_path("vae", VAE))  # SAMA Load VAE: any width
    _write_sharded_base_and_sama_file(bundle / "dit.safetensors",
                                      host.model_path("diffusion_models", BASE_SHARD).parent,
                                      host.model_path("diffusion_models", SAMA_ONLY))
    _write_video(host.input_path(SOURCE_VIDEO), SOURCE_LEVELS, SOURCE_SIZE, SOURCE_FPS)
    from PIL import Image
    anchor = np.full((32, 32, 3), (200, 40, 40), np.uint8)  # the "edited first frame"
    Image.fromarray(anchor).save(host.input_path("sama_tiny_anchor.png"))
    return host


# --------------------------------------------------------------------------------------------------------
# Prompts without the VAE


def _latent_edit_prompt(prefix, seed=0, steps=2, dit=DIT, sama_weights="none",
                        instruction="make the circle blue", anchor_strength=None, size=32, length=5):
    """Tiny SAMA Sampler edit of a zero Wan latent (32x32 pixels, 5 frames) saved as a .latent file.
    anchor_strength: None = no anchors; else anchors of a red 32x32 image at that strength."""
    prompt = {
        "1": {"class_type": "EmptyHunyuanLatentVideo",
              "inputs": {"width": size, "height": size, "length": length, "batch_size": 1}},
        "2": {"class_type": "SamaLoadModel", "inputs": {"dit_name": dit, "sama_weights": sama_weights,
                                                        "weight_dtype": "default", "attention": "auto"}},
        "3": {"class_type": "SamaTextEncodeFile",
              "inputs": {"text_encoder": TEXT_ENCODER, "instruction": instruction, "negative": "",
                         "use_prefix": True}},
        "4": {"class_type": "SamaSampler",
              "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["3", 1],
                         "source_latent": ["1", 0], "seed": seed, "steps": steps, "cfg": 5.0, "shift": 5.0,
                         "denoise": 1.0}},
        "5": {"class_type": "SaveLatent",
              "inputs": {"samples": ["4", 0], "filename_prefix": f"{prefix}/latent"}},
    }
    if anchor_strength is not None:
        prompt["6"] = {"class_type": "EmptyImage",
                       "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0xC82828}}
        prompt["7"] = {"class_type": "SamaAnchorEncodeFile",
                       "inputs": {"siglip": SIGLIP, "num_heads": SIGLIP_HEADS, "images": ["6", 0],
                                  "num_anchors": 1}}
        prompt["4"]["inputs"].update(anchors=["7", 0], anchor_strength=anchor_strength)
    return prompt


def _saved_latent(result, node_id="5") -> torch.Tensor:
    files = result.files(node_id)
    assert len(files) == 1 and files[0].suffix == ".latent"
    return load_file(str(files[0]))["latent_tensor"]


def _assert_still_serving(host) -> None:
    """A fresh valid prompt (a seed never used before, so nothing is cached) runs and saves its latent."""
    seed = int(uuid.uuid4().int % 2**31)
    result = host.run(_latent_edit_prompt(_unique("sama_alive"), seed=seed), timeout=120)
    latent = _saved_latent(result)
    assert latent.shape == (1, 16, 2, 4, 4) and torch.isfinite(latent).all()


# --------------------------------------------------------------------------------------------------------
# The tiny workflows on a video


def _run_tiny_workflow(host, name):
    workflow = load_workflow(name)
    assert workflow["1"]["inputs"]["file"] == SOURCE_VIDEO
    assert (workflow["4"]["inputs"]["width"], workflow["4"]["inputs"]["height"]) == TINY_EDIT_SIZE
    workflow["17"]["inputs"]["filename_prefix"] = _unique(f"video/{name[:-len('_api.json')]}")
    return host.run(workflow, timeout=300)


def _assert_video_like_the_source(result):
    videos = result.files("17")
    assert len(videos) == 1 and videos[0].suffix == ".mp4" and videos[0].is_file()
    frames, fps = _read_video(videos[0])
    width, height = SOURCE_SIZE
    assert frames.shape == (len(SOURCE_LEVELS), height, width, 3)  # trimmed back and resized back
    assert fps == pytest.approx(SOURCE_FPS)


@pytest.mark.parametrize("workflow", ["tiny_demo_api.json", "tiny_demo_anchor_api.json",
                                      "tiny_demo_native_ksampler_api.json"])
def test_tiny_workflow_edits_a_video_end_to_end(tiny, workflow):
    result = _run_tiny_workflow(tiny, workflow)
    _assert_video_like_the_source(result)
    cached = {node for event, data in result.messages if event == "execution_cached"
              for node in data["nodes"]}
    assert SAMPLER_NODE not in cached  # the sampler really ran
    # No network at run time: the server runs behind a socket guard that refuses (and records) every
    # non-loopback connection, with HF_HUB_OFFLINE=1; the workflow succeeded without any attempt.
    assert tiny.network_attempts() == []


def test_pretext_preview_workflow_blanks_a_block_of_frames(tiny):
    """Cube pretext on the 4-frame source padded to 5: round(0.3 * 5) = 2 contiguous frames (never the
    first) are black in the output and white in the mask; the others are the source frames."""
    workflow = load_workflow("pretext_preview_api.json")
    workflow["1"]["inputs"]["file"] = SOURCE_VIDEO
    workflow["5"]["inputs"]["filename_prefix"] = _unique("sama_pretext/perturbed")
    assert workflow["4"]["inputs"]["pretext"] == "cube"

    result = tiny.run(workflow, timeout=120)

    padded_levels = SOURCE_LEVELS + [SOURCE_LEVELS[-1]]  # 4k+1 padding repeats the last frame
    perturbed = [_read_png(p) for p in result.files("5")]
    masks = [_read_png(p) for p in result.files("6")]
    assert len(perturbed) == len(masks) == len(padded_levels)
    blanked = [i for i, mask in enumerate(masks) if mask.min() == 255]
    kept = [i for i, mask in enumerate(masks) if mask.max() == 0]
    assert len(blanked) + len(kept) == len(masks), "mask frames are all white or all black"
    assert len(blanked) == int(np.floor(0.3 * len(padded_levels) + 0.5))  # 30% of the frames, halves up
    assert blanked == list(range(blanked[0], blanked[0] + len(blanked))) and blanked[0] >= 1
    for index in blanked:
        assert perturbed[index].max() == 0
    for index in kept:  # H.264 moves flat grey levels by a few units
        assert abs(float(perturbed[index].mean()) - padded_levels[index]) < 6
    assert result.outputs["7"]["text"] == ["[Complete the missing regions in the video.]"]


@pytest.mark.parametrize("pretext", ["speed", "tube"])
def test_pretext_preview_workflow_runs_the_other_pretexts(tiny, pretext):
    """Speed (2x) and tube shuffle keep the 4k+1 frame count of the padded source; the mask is white
    exactly where a frame now shows another moment; the task instruction is the pretext's own."""
    from sama_core.pretext import TASK_TOKENS

    workflow = load_workflow("pretext_preview_api.json")
    workflow["1"]["inputs"]["file"] = SOURCE_VIDEO
    workflow["4"]["inputs"]["pretext"] = pretext
    workflow["5"]["inputs"]["filename_prefix"] = _unique(f"sama_pretext/{pretext}")

    result = tiny.run(workflow, timeout=120)

    perturbed = [_read_png(p) for p in result.files("5")]
    masks = [_read_png(p) for p in result.files("6")]
    assert len(perturbed) == len(masks) == len(SOURCE_LEVELS) + 1
    if pretext == "speed":  # frame i shows source frame 2i (held at the end): levels 0, 2, 4, 4, 4
        padded_levels = SOURCE_LEVELS + [SOURCE_LEVELS[-1]]
        expected = [padded_levels[min(2 * i, len(padded_levels) - 1)] for i in range(len(padded_levels))]
        assert [round(float(frame.mean())) for frame in perturbed] == pytest.approx(expected, abs=6)
        changed = [level != original for level, original in zip(expected, padded_levels)]
        assert changed == [False, True, True, False, False]  # frames 3 and 4 show equal padded frames
        assert [bool(mask.min() == 255) for mask in masks] == changed
        assert [bool(mask.max() == 0) for mask in masks] == [not c for c in changed]
    assert result.outputs["7"]["text"] == [TASK_TOKENS[pretext]]


# --------------------------------------------------------------------------------------------------------
# Sampler semantics through the server (no VAE)


def test_anchors_at_strength_zero_change_nothing_and_at_half_steer_the_edit(tiny):
    plain = _saved_latent(tiny.run(_latent_edit_prompt(_unique("sama_anchor0"), seed=11), timeout=120))
    zero = _saved_latent(tiny.run(_latent_edit_prompt(_unique("sama_anchor1"), seed=11, anchor_strength=0.0),
                                  timeout=120))
    half = _saved_latent(tiny.run(_latent_edit_prompt(_unique("sama_anchor2"), seed=11, anchor_strength=0.5),
                                  timeout=120))
    assert plain.shape == (1, 16, 2, 4, 4)
    torch.testing.assert_close(zero, plain, rtol=0, atol=0)
    assert (half - plain).abs().max() > 1e-3


def _with_mask(prompt, size=32, painted=16):
    """SolidMask 0 of size x size with a painted x painted square of 1 at the top left, into SAMA Sampler."""
    prompt["20"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": size, "height": size}}
    prompt["21"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": painted, "height": painted}}
    prompt["22"] = {"class_type": "MaskComposite", "inputs": {"destination": ["20", 0], "source": ["21", 0],
                                                              "x": 0, "y": 0, "operation": "add"}}
    prompt["4"]["inputs"]["mask"] = ["22", 0]
    return prompt


def _assert_the_mask_keeps_the_source_outside_it(host, build_prompt, name, seed, full_mask_atol):
    """build_prompt(prefix, seed=...) -> a tiny edit of the zero latent; run it without a mask, with the
    top-left 16x16 pixels painted, and with everything painted."""
    plain = _saved_latent(host.run(build_prompt(_unique(f"{name}_nomask"), seed=seed), timeout=120))
    masked = _saved_latent(host.run(_with_mask(build_prompt(_unique(f"{name}_mask"), seed=seed)), timeout=120))
    assert masked.shape == plain.shape == (1, 16, 2, 4, 4)
    # the source is EmptyHunyuanLatentVideo's zero latent; 16x16 painted pixels = the top-left 2x2 latent cells
    inside = torch.zeros(1, 16, 2, 4, 4, dtype=torch.bool)
    inside[..., :2, :2] = True
    torch.testing.assert_close(masked[~inside], torch.zeros_like(masked[~inside]), atol=1e-5, rtol=0)
    assert (masked[inside] - plain[inside]).abs().max() > 1e-3 and plain[~inside].abs().max() > 1e-2
    everywhere = _saved_latent(host.run(_with_mask(build_prompt(_unique(f"{name}_maskall"), seed=seed), painted=32),
                                        timeout=120))
    torch.testing.assert_close(everywhere, plain, atol=full_mask_atol, rtol=0)


def test_a_mask_keeps_the_source_latent_outside_it_and_a_wrong_frame_count_is_refused(tiny):
    _assert_the_mask_keeps_the_source_outside_it(tiny, _latent_edit_prompt, "sama", seed=13, full_mask_atol=0)

    # A mask painted at another size (here twice the edit's) is stretched to the frames: the same edit.
    small = _saved_latent(tiny.run(_with_mask(_latent_edit_prompt(_unique("sama_mask_32"), seed=13)), timeout=120))
    large = _saved_latent(tiny.run(_with_mask(_latent_edit_prompt(_unique("sama_mask_64"), seed=13), size=64,
                                              painted=32), timeout=120))
    torch.testing.assert_close(large, small, atol=0, rtol=0)

    def per_frame(prefix, count):  # the painted mask repeated `count` times, one per frame
        prompt = _with_mask(_latent_edit_prompt(_unique(prefix), seed=13))
        prompt["23"] = {"class_type": "MaskToImage", "inputs": {"mask": ["22", 0]}}
        prompt["24"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["23", 0], "amount": count}}
        prompt["25"] = {"class_type": "ImageToMask", "inputs": {"image": ["24", 0], "channel": "red"}}
        prompt["4"]["inputs"]["mask"] = ["25", 0]
        return prompt

    # 4 masks for the 5-frame video: the masks of a 4-frame clip that SAMA Frames To 4k+1 padded, padded alike
    torch.testing.assert_close(_saved_latent(tiny.run(per_frame("sama_mask_4", 4), timeout=120)), small,
                               atol=0, rtol=0)
    with pytest.raises(PromptFailed) as failed:
        tiny.run(per_frame("sama_mask_7", 7), timeout=120)
    error = failed.value.result.error
    assert (error["node_type"], error["exception_type"].split(".")[-1]) == ("SamaSampler", "SamaInputError")
    assert "mask has 7 frames but the video has 5" in error["exception_message"]
    _assert_still_serving(tiny)


def test_flowedit_on_the_sampler_node_edits_from_the_source(tiny):
    """SAMA Sampler with flowedit on: with the instruction as its own negative prompt the edit and the
    reconstruction agree, so the output is the source (here the zero latent) where the released sampler
    regenerates a video; with the real negative it edits; a clash (unipc) is a clear node error."""
    def prompt(name, flowedit, negative=("3", 1), **extra):
        p = _latent_edit_prompt(_unique(name), seed=4, steps=3)
        p["4"]["inputs"].update(flowedit=flowedit, flowedit_skip=1, negative=list(negative), **extra)
        return p
    blind = _saved_latent(tiny.run(prompt("sama_flow_blind", True, negative=("3", 0)), timeout=120))
    torch.testing.assert_close(blind, torch.zeros_like(blind), atol=1e-5, rtol=0)
    regenerated = _saved_latent(tiny.run(prompt("sama_flow_off", False, negative=("3", 0)), timeout=120))
    assert regenerated.abs().max() > 1e-2
    edited = _saved_latent(tiny.run(prompt("sama_flow_edit", True), timeout=120))
    assert edited.shape == blind.shape and edited.abs().max() > 1e-3

    def with_source_anchors(p):  # SAMA Anchor Encode of a frame, as the source's own semantic tokens
        p["6"] = {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0x202020}}
        p["7"] = {"class_type": "SamaAnchorEncodeFile",
                  "inputs": {"siglip": SIGLIP, "num_heads": SIGLIP_HEADS, "images": ["6", 0], "num_anchors": 1}}
        p["4"]["inputs"]["flowedit_source_anchors"] = ["7", 0]
        return p
    joint_blind = _saved_latent(tiny.run(with_source_anchors(prompt("sama_flow_joint_blind", True, negative=("3", 0))),
                                         timeout=120))
    torch.testing.assert_close(joint_blind, torch.zeros_like(joint_blind), atol=1e-5, rtol=0)
    joint = _saved_latent(tiny.run(with_source_anchors(prompt("sama_flow_joint", True)), timeout=120))
    assert (joint - edited).abs().max() > 1e-4  # the semantic stream now follows FlowEdit: another edit
    with pytest.raises(PromptFailed) as failed:
        tiny.run(prompt("sama_flow_unipc", True, solver="unipc"), timeout=120)
    error = failed.value.result.error
    assert (error["node_type"], error["exception_type"].split(".")[-1]) == ("SamaSampler", "SamaInputError")
    assert "turn off solver" in error["exception_message"]
    _assert_still_serving(tiny)


def _native_edit_prompt(prefix, seed=0, steps=2):
    """The same tiny edit through SAMA In-Context + the stock KSampler + SAMA Extract Latent."""
    prompt = _latent_edit_prompt(prefix, seed=seed, steps=steps)
    prompt["4"] = {"class_type": "SamaInContext",
                   "inputs": {"positive": ["3", 0], "negative": ["3", 1], "source_latent": ["1", 0],
                              "model": ["2", 0]}}
    prompt["8"] = {"class_type": "KSampler",
                   "inputs": {"model": ["2", 0], "seed": seed, "steps": steps, "cfg": 5.0, "sampler_name": "euler",
                              "scheduler": "simple", "positive": ["4", 0], "negative": ["4", 1],
                              "latent_image": ["4", 2], "denoise": 1.0}}
    prompt["9"] = {"class_type": "SamaExtractLatent", "inputs": {"latent": ["8", 0]}}
    prompt["5"]["inputs"]["samples"] = ["9", 0]
    return prompt


def test_a_mask_on_sama_in_context_becomes_the_native_samplers_noise_mask(tiny):
    # the (1, 16, 2, 4, 4) shape checked inside also says Extract dropped the semantic frames
    _assert_the_mask_keeps_the_source_outside_it(tiny, _native_edit_prompt, "sama_native", seed=17,
                                                 full_mask_atol=1e-6)


def test_sharded_wan_base_plus_sama_file_equals_the_merged_file(tiny):
    """dit_name = the first shard of a sharded Wan2.1 base (as ComfyUI lists it), sama_weights = the SAMA
    parts: the same edit, bit for bit, as the merged file."""
    merged = _saved_latent(tiny.run(_latent_edit_prompt(_unique("sama_merged"), seed=5), timeout=120))
    layered = _saved_latent(tiny.run(_latent_edit_prompt(_unique("sama_layered"), seed=5, dit=BASE_SHARD,
                                                         sama_weights=SAMA_ONLY), timeout=120))
    torch.testing.assert_close(layered, merged, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------
# Invalid inputs: a clean error in the node, and the server keeps serving


def test_a_two_frame_source_without_the_4k_plus_1_node_fails_in_the_sampler(tiny):
    video = _unique("sama_two_frames") + ".mp4"
    _write_video(tiny.input_path(video), [60, 180], (32, 32), SOURCE_FPS)
    workflow = load_workflow("tiny_demo_api.json")
    workflow["1"]["inputs"]["file"] = video
    workflow["4"]["inputs"]["image"] = ["2", 0]  # skip SAMA Frames To 4k+1
    workflow["13"]["inputs"]["count"] = 2
    del workflow["3"]

    with pytest.raises(PromptFailed) as failed:
        tiny.run(workflow, timeout=120)

    error = failed.value.result.error
    assert (error["node_id"], error["node_type"]) == (SAMPLER_NODE, "SamaSampler")
    assert error["exception_type"].endswith("SamaInputError")
    assert "the source has 2 frames; SAMA needs 4k+1 frames" in error["exception_message"]
    assert "insert 'SAMA Frames To 4k+1' before this node" in error["exception_message"]
    _assert_still_serving(tiny)


def test_keep_unchanged_refuses_a_source_of_another_size_naming_both(tiny):
    """SAMA Keep Unchanged compares the decoded edit with the source's VAE round trip pixel by pixel: a source
    at another size (here the unresized 48x32 frames against the 32x32 edit) is refused in that node, naming
    both sizes and what to connect, and the server keeps serving."""
    workflow = load_workflow("tiny_demo_api.json")
    assert workflow["13"]["inputs"]["images"] == ["12", 0]
    workflow["22"] = {"class_type": "SamaKeepUnchanged",
                      "inputs": {"edited": ["12", 0], "source": ["3", 0], "vae": ["8", 0], "threshold": 0.2}}
    workflow["13"]["inputs"]["images"] = ["22", 0]
    workflow["17"]["inputs"]["filename_prefix"] = _unique("video/sama_keep_mismatch")

    with pytest.raises(PromptFailed) as failed:
        tiny.run(workflow, timeout=300)

    error = failed.value.result.error
    assert (error["node_id"], error["node_type"]) == ("22", "SamaKeepUnchanged")
    assert error["exception_type"].endswith("SamaInputError")
    assert "'edited' is 5 frames at 32x32 but 'source' is 5 frames at 48x32" in error["exception_message"]
    assert "source_images" in error["exception_message"]
    _assert_still_serving(tiny)


def test_a_non_sama_file_as_the_dit_says_what_the_file_is(tiny):
    with pytest.raises(PromptFailed) as failed:
        tiny.run(_latent_edit_prompt(_unique("sama_wrong_file"), dit=NOT_A_DIT), timeout=120)

    error = failed.value.result.error
    assert (error["node_id"], error["node_type"]) == ("2", "SamaLoadModel")
    assert error["exception_type"].endswith("SamaModelFileError")
    assert "is not a Wan2.1/SAMA DiT file: it looks like a Wan VAE" in error["exception_message"]
    assert NOT_A_DIT in error["exception_message"]
    _assert_still_serving(tiny)


@pytest.mark.parametrize("instruction", ["", "  \n "])
def test_an_empty_instruction_fails_in_the_text_encoder(tiny, instruction):
    with pytest.raises(PromptFailed) as failed:
        tiny.run(_latent_edit_prompt(_unique("sama_empty"), instruction=instruction), timeout=120)

    error = failed.value.result.error
    assert (error["node_id"], error["node_type"]) == ("3", "SamaTextEncodeFile")
    assert error["exception_type"].endswith("SamaInputError")
    assert error["exception_message"].startswith("The edit instruction is empty.")
    _assert_still_serving(tiny)


# --------------------------------------------------------------------------------------------------------
# Progress and interrupt, as the frontend sees them (websocket messages)


def _run_watching_websocket(host, prompt, on_message=None, timeout=120.0, previews=None) -> tuple[str, list[dict]]:
    """Queue `prompt` with a websocket open, as the frontend does; returns (prompt id, the JSON messages
    of that prompt up to its execution_success / _error / _interrupted). on_message(message, prompt_id)
    is called for each one (e.g. to press interrupt); binary frames (preview images) go to `previews`."""
    aiohttp = pytest.importorskip("aiohttp")  # a ComfyUI requirement
    client_id = uuid.uuid4().hex
    done = {"execution_success", "execution_error", "execution_interrupted"}

    async def watch():
        url = f"{host.base_url}/ws?clientId={client_id}"
        async with aiohttp.ClientSession(trust_env=False) as session, session.ws_connect(url) as ws:
            prompt_id = await asyncio.to_thread(host.queue, prompt, client_id)
            messages = []
            async for frame in ws:
                if frame.type == aiohttp.WSMsgType.BINARY and previews is not None:
                    previews.append(frame.data)  # preview images
                if frame.type != aiohttp.WSMsgType.TEXT:
                    continue
                message = json.loads(frame.data)
                if message.get("data", {}).get("prompt_id") != prompt_id:
                    continue
                messages.append(message)
                if on_message is not None:
                    await asyncio.to_thread(on_message, message, prompt_id)
                if message["type"] in done:
                    return prompt_id, messages
            raise AssertionError(f"the websocket closed before the prompt finished: {messages}")

    return asyncio.run(asyncio.wait_for(watch(), timeout))


def test_sama_sampler_reports_progress_and_previews_per_step(tiny):
    steps = 4
    previews = []
    _prompt_id, messages = _run_watching_websocket(
        tiny, _latent_edit_prompt(_unique("sama_progress"), seed=21, steps=steps), previews=previews)
    # The session server runs with --preview-method latent2rgb: one JPEG preview per step (ComfyUI's binary
    # frame: 4-byte event type, 4-byte image type, then the image).
    jpegs = [p for p in previews if p[8:10] == b"\xff\xd8"]
    assert len(jpegs) >= steps

    assert messages[-1]["type"] == "execution_success"
    progress = [m["data"] for m in messages if m["type"] == "progress" and m["data"]["node"] == "4"]
    assert [(p["value"], p["max"]) for p in progress] == [(step, steps) for step in range(1, steps + 1)]


def test_interrupt_stops_sama_sampler_between_steps(tiny):
    steps = 1000  # far more than it runs before the interrupt lands

    def interrupt_after_first_step(message, prompt_id):
        if message["type"] == "progress" and message["data"]["node"] == "4" and message["data"]["value"] == 1:
            tiny.interrupt(prompt_id)

    prompt_id, messages = _run_watching_websocket(
        tiny, _latent_edit_prompt(_unique("sama_interrupt"), seed=22, steps=steps),
        on_message=interrupt_after_first_step, timeout=60)

    assert messages[-1]["type"] == "execution_interrupted"
    assert messages[-1]["data"]["node_id"] == "4"
    last_step = max(m["data"]["value"] for m in messages
                    if m["type"] == "progress" and m["data"]["node"] == "4")
    assert 1 <= last_step < steps
    result = tiny.wait(prompt_id, timeout=30)
    assert result.interrupted and result.files() == []
    _assert_still_serving(tiny)


def _rss_mb(host) -> float:
    """Resident memory of the ComfyUI server process (MB), from /proc."""
    status = Path(f"/proc/{host._process.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's memory from /proc")
def test_interrupted_prompts_do_not_keep_memory(tiny):
    """Interrupting SAMA Sampler releases what the prompt held: six prompts interrupted mid-sampling in a row
    do not make the server's resident memory grow (a prompt that kept its latents, noise and activations
    alive would add its working set each time), and the next prompt runs. Measured: the allocator moves the
    resident size by +-40 MB between prompts without a trend, so the check compares the first two and last
    two interruptions."""
    size, length = 512, 33  # 16 x 9 x 64 x 64 latents, 2 x 9,216 video tokens
    tiny.run(_latent_edit_prompt(_unique("sama_mem_warm"), seed=30, steps=2, size=size, length=length),
             timeout=300)
    during, after = [], []

    def interrupt_after_first_step(message, prompt_id):
        if message["type"] == "progress" and message["data"]["node"] == "4" and message["data"]["value"] == 1:
            during.append(_rss_mb(tiny))
            tiny.interrupt(prompt_id)

    for seed in range(31, 37):
        _prompt_id, messages = _run_watching_websocket(
            tiny, _latent_edit_prompt(_unique("sama_mem"), seed=seed, steps=1000, size=size, length=length),
            on_message=interrupt_after_first_step, timeout=300)
        assert messages[-1]["type"] == "execution_interrupted"
        after.append(_rss_mb(tiny))
    print("server RSS after each interrupted prompt (MB):", [round(m) for m in after],
          "while sampling:", [round(m) for m in during])
    growth = (after[-1] + after[-2]) / 2 - (after[0] + after[1]) / 2
    assert growth < 48, after
    _assert_still_serving(tiny)


# --------------------------------------------------------------------------------------------------------
# The shipped SAMA-Shapes model (issue 9) through its workflow, with no model files copied anywhere

SHAPES_BUNDLE = Path(__file__).resolve().parents[1] / "sama_core" / "assets" / "sama-shapes"


@pytest.mark.skipif(not (SHAPES_BUNDLE / "bundle.json").is_file(),
                    reason=f"no trained bundle at {SHAPES_BUNDLE} (python -m train.shapes run --install)")
def test_sama_shapes_workflow_makes_the_demo_edit_like_the_pipeline(comfy_server):
    from edit_judge import edit_region, judge, kept_objects, vae_round_trip

    from sama_core.pipeline import EditSettings, SamaPipeline
    from sama_core.video import read_video

    spec = json.loads((SHAPES_BUNDLE / "bundle.json").read_text())
    card = spec["card"]
    shutil.copy(SHAPES_BUNDLE / "sample.mp4", comfy_server.input_path("sama_shapes_sample.mp4"))
    workflow = load_workflow("sama_shapes_demo_api.json")
    assert workflow["7"]["inputs"]["instruction"] == card["demo_prompt"]
    assert workflow["10"]["inputs"]["cfg"] == spec["defaults"]["guidance"]  # what the CLI and pipeline use
    assert workflow["5"]["inputs"]["dit_name"] == "sama-shapes/dit.safetensors"  # listed from the pack itself
    workflow["17"]["inputs"]["filename_prefix"] = _unique("video/sama_shapes_demo")
    # SAMA Keep Unchanged's "changed" mask (output 1) saved beside what it blended: the decoded edit, the source
    # at the edit's size, and the node's own frames (lossless PNGs)
    workflow["30"] = {"class_type": "MaskToImage", "inputs": {"mask": ["22", 1]}}
    saved = {"changed": ["30", 0], "decoded": ["12", 0], "source": ["4", 0], "kept": ["22", 0]}
    for i, (name, image) in enumerate(saved.items()):
        workflow[str(31 + i)] = {"class_type": "SaveImage",
                                 "inputs": {"images": image, "filename_prefix": _unique(f"sama_shapes_{name}")}}

    result = comfy_server.run(workflow, timeout=300)

    videos = result.files("17")
    assert len(videos) == 1
    frames, _ = _read_video(videos[0])
    output = torch.from_numpy(frames).float() / 255
    source, _ = read_video(SHAPES_BUNDLE / "sample.mp4")
    target, _ = read_video(SHAPES_BUNDLE / "sample_target.mp4")
    # The same model as the headless pipeline: equal up to ComfyUI's video decode/encode and VAE wrapper.
    pipe = SamaPipeline.from_bundle(SHAPES_BUNDLE, device="cpu", dtype="fp32")
    # more than halfway to the requested edit, as the bundle's VAE draws it, the other objects kept
    # (tests/edit_judge.py)
    verdict = judge(output, source, target, vae_round_trip(pipe))
    assert verdict["progress"] > 0.5 and verdict["kept_error"] < 0.15, verdict
    steps = workflow["10"]["inputs"]["steps"]
    expected, _ = pipe.edit_frames(source, card["demo_prompt"], options=pipe.sampler_options(steps=steps, seed=0))
    assert (output - expected.clamp(0, 1)).abs().mean() < 0.03
    # SAMA Keep Unchanged (the bundle's keep_unchanged, in the workflow as node 22): the objects the instruction
    # leaves alone are the source's own pixels, far closer to it than the edit as decoded
    assert workflow["22"]["class_type"] == "SamaKeepUnchanged"
    assert workflow["22"]["inputs"]["threshold"] == spec["defaults"]["keep_unchanged"]
    decoded, _ = pipe.edit_frames(source, card["demo_prompt"], EditSettings(keep_unchanged=0),
                                  pipe.sampler_options(steps=steps, seed=0))
    kept = kept_objects(source, edit_region(source, target))
    kept_error, decoded_kept_error = ((x.clamp(0, 1) - source).abs()[kept].mean() for x in (output, decoded))
    assert kept_error < decoded_kept_error / 2, (kept_error, decoded_kept_error)
    # its mask is the weight it blended with (kept = changed * decoded + (1 - changed) * source, up to 8-bit
    # PNGs), 1 on the removed circle and near 0 on the objects the instruction leaves alone
    from PIL import Image
    images = {name: torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).float() / 255
                                 for f in result.files(str(31 + i))]) for i, name in enumerate(saved)}
    changed = images["changed"][..., :1]
    assert images["changed"].shape == images["kept"].shape == (source.shape[0], 64, 64, 3)
    blended = changed * images["decoded"] + (1 - changed) * images["source"]
    assert (images["kept"] - blended).abs().max() < 3 / 255
    removed = edit_region(source, target)
    assert changed[..., 0][removed].mean() > 0.8 and changed[..., 0][kept].mean() < 0.2, \
        (changed[..., 0][removed].mean(), changed[..., 0][kept].mean())
    assert comfy_server.network_attempts() == []


@pytest.mark.skipif(not (SHAPES_BUNDLE / "sample_region.png").is_file(),
                    reason=f"no demo region at {SHAPES_BUNDLE} (python -m train.shapes run --install writes it)")
def test_sama_shapes_region_workflow_keeps_the_source_outside_the_mask(comfy_server):
    """workflows/sama_shapes_region_demo: Load Image (as Mask) -> SAMA Sampler's mask and Image Composite Masked.
    Outside the painted region the saved video is the source (up to the mp4 coding, which the plain demo's
    blurred objects exceed several times); inside it the edit happens as in the headless pipeline given the
    same mask file (python -m sama_core edit --mask)."""
    from edit_judge import edit_region, judge, kept_objects, vae_round_trip
    from PIL import Image

    from sama_core.pipeline import EditSettings, SamaPipeline
    from sama_core.video import read_video

    card = json.loads((SHAPES_BUNDLE / "bundle.json").read_text())["card"]
    shutil.copy(SHAPES_BUNDLE / "sample.mp4", comfy_server.input_path("sama_shapes_sample.mp4"))
    shutil.copy(SHAPES_BUNDLE / "sample_region.png", comfy_server.input_path("sama_shapes_sample_region.png"))
    workflow = load_workflow("sama_shapes_region_demo_api.json")
    assert workflow["10"]["inputs"]["mask"] == ["9", 0] and workflow["18"]["inputs"]["mask"] == ["9", 0]
    workflow["17"]["inputs"]["filename_prefix"] = _unique("video/sama_shapes_region_demo")

    result = comfy_server.run(workflow, timeout=300)

    frames, _ = _read_video(result.files("17")[0])
    output = torch.from_numpy(frames).float() / 255
    source, _ = read_video(SHAPES_BUNDLE / "sample.mp4")
    target, _ = read_video(SHAPES_BUNDLE / "sample_target.mp4")
    region = torch.from_numpy(np.array(Image.open(SHAPES_BUNDLE / "sample_region.png")) > 127)  # (H, W)
    assert 0.05 < region.float().mean() < 0.5
    # Saving re-codes the video (lossy): the sample passed straight through Load Video -> Save Video is off
    # by 0.008 on average and up to 0.23 (measured), so only the mean is held to the source here.
    outside = (output - source).abs()[:, ~region].mean()
    assert outside < 0.006, outside

    pipe = SamaPipeline.from_bundle(SHAPES_BUNDLE, device="cpu", dtype="fp32")
    steps = workflow["10"]["inputs"]["steps"]
    expected, _ = pipe.edit_frames(source, card["demo_prompt"], options=pipe.sampler_options(steps=steps, seed=0),
                                   mask=region.float())
    assert (output - expected.clamp(0, 1)).abs().mean() < 0.03
    plain, _ = pipe.edit_frames(source, card["demo_prompt"], EditSettings(keep_unchanged=0),
                                pipe.sampler_options(steps=steps, seed=0))
    verdict = judge(output, source, target, vae_round_trip(pipe))
    assert verdict["progress"] > 0.5, verdict
    # the objects the instruction leaves alone, against the source itself (judge's kept_error compares with
    # the VAE's blurred source): kept far better than by the instruction alone as decoded (keep-unchanged off;
    # the purple circle crosses the region in the first frames, so not all of it is kept)
    kept = kept_objects(source, edit_region(source, target))
    kept_error, plain_kept_error = ((x.clamp(0, 1) - source).abs()[kept].mean() for x in (output, plain))
    assert kept_error < plain_kept_error / 2, (kept_error, plain_kept_error)  # measured 0.040 vs 0.111
    assert outside < (plain.clamp(0, 1) - source).abs()[:, ~region].mean() / 3  # the plain edit: ~0.024
