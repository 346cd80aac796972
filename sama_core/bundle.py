"""Model bundles: one folder holding everything an edit needs, described by bundle.json.

    bundle.json = {"dit": "dit.safetensors", "vae": "vae.safetensors", "text_encoder": "text_encoder.safetensors",
                   "siglip": "siglip.safetensors", "siglip_num_heads": 2, "defaults": {...}, "card": {...}}

Every file is in the layout ComfyUI's own loaders (or our pack loaders) read: the DiT in official Wan
names with its config in the metadata, the VAE in the original/ComfyUI layout, the UMT5 encoder in
ComfyUI's single-file layout with its sentencepiece tokenizer embedded (`spiece_model`), SigLIP with
the `vision_model.` prefix.

"defaults" holds the bundle's own settings: any SamplerOptions field (steps, guidance, shift, flowedit,
...), target_area and keep_unchanged; the command line and EditSettings override them per edit. Reading a
bundle checks every one (sama_core.pipeline.BUNDLE_DEFAULTS) and names bundle.json, the setting and the rule
when one is wrong; a name it does not know is ignored with a warning.

`write_tiny_random_bundle` builds a bundle of tiny RANDOM models with the real code paths: tests use
it, and so does the demo until the trained SAMA-Shapes bundle is shipped.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import torch

from .config import SamaConfig
from .loading import save_dit
from .model import SamaDiT

BUNDLE_FILE = "bundle.json"

# Vocabulary of the tiny tokenizer: instructions about coloured shapes and their motion.
TINY_WORDS = ("make turn change replace remove add the a an into to of with and on in from it them this that "
              "red green blue yellow orange purple pink white black gray cyan magenta colour color "
              "circle square triangle star shape object ball box background sky striped checkered plain "
              "moving left right up down fast slow bigger smaller video edit frame frames missing regions "
              "restore complete normal speed shuffled order").split()

TINY_DIT = SamaConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, freq_dim=32,
                      siglip_dim=48, siglip_hidden_dim=64)


def train_tiny_tokenizer(words=TINY_WORDS, vocab_size: int = 128, seed: int = 0) -> bytes:
    """A sentencepiece model (pad 0, eos 1, unk 2, like UMT5's) trained on random sentences of `words`."""
    import sentencepiece
    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) for _ in range(400)]
    corpus += ["[Video edit] make the red circle blue", "[Complete the missing regions in the video.]"]
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buffer, vocab_size=vocab_size, hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=False, minloglevel=2)
    return buffer.getvalue()


def _randomize(module: torch.nn.Module, generator: torch.Generator, std: float, skip=("norm",)):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not any(s in name for s in skip):
                p.normal_(0.0, std, generator=generator)


def tiny_umt5(vocab_size: int, d_model: int, generator: torch.Generator):
    from transformers import UMT5Config, UMT5EncoderModel
    config = UMT5Config(vocab_size=vocab_size, d_model=d_model, d_ff=2 * d_model, num_layers=2, num_heads=2,
                        d_kv=d_model // 2, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                        feed_forward_proj="gated-gelu", dropout_rate=0.0)
    model = UMT5EncoderModel(config).eval()
    _randomize(model, generator, 0.15, skip=("layer_norm",))
    return model


def tiny_wan_vae(generator: torch.Generator, base_dim: int = 8):
    from diffusers import AutoencoderKLWan
    model = AutoencoderKLWan(base_dim=base_dim, z_dim=16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def tiny_siglip(width: int, generator: torch.Generator, image_size: int = 32, patch: int = 4, heads: int = 2):
    from transformers import SiglipVisionConfig, SiglipVisionModel
    config = SiglipVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                                num_attention_heads=heads, image_size=image_size, patch_size=patch,
                                vision_use_head=False)
    model = SiglipVisionModel(config).eval()
    _randomize(model, generator, 0.05, skip=("layer_norm", "layernorm"))
    return model


def save_umt5_comfy(model, spiece: bytes, path):
    """ComfyUI's single-file UMT5 layout: transformers names without the tied copy, tokenizer embedded."""
    from safetensors.torch import save_file
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    sd["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    save_file(sd, str(path))


def save_siglip_comfy(model, path):
    from safetensors.torch import save_file
    sd = {k if k.startswith("vision_model.") else "vision_model." + k: v.detach().contiguous()
          for k, v in model.state_dict().items()}
    save_file(sd, str(path))


def write_bundle(folder, dit: SamaDiT, vae_model, text_model, spiece: bytes, siglip_model=None,
                 defaults: dict | None = None, card: dict | None = None) -> Path:
    from .vae import save_original_layout
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_dit(dit, folder / "dit.safetensors")
    save_original_layout(vae_model, folder / "vae.safetensors")
    save_umt5_comfy(text_model, spiece, folder / "text_encoder.safetensors")
    spec = {"dit": "dit.safetensors", "vae": "vae.safetensors", "text_encoder": "text_encoder.safetensors",
            "defaults": defaults or {}, "card": card or {}}
    if siglip_model is not None:
        save_siglip_comfy(siglip_model, folder / "siglip.safetensors")
        spec.update(siglip="siglip.safetensors", siglip_num_heads=siglip_model.config.num_attention_heads)
    (folder / BUNDLE_FILE).write_text(json.dumps(spec, indent=2))
    return folder


def write_tiny_random_bundle(folder, seed: int = 0, config: SamaConfig = TINY_DIT,
                             defaults: dict | None = None) -> Path:
    """A complete bundle of tiny random models (seconds to build, milliseconds per step on a CPU)."""
    g = torch.Generator().manual_seed(seed)
    dit = SamaDiT(config).eval()
    _randomize(dit, g, 0.1)
    spiece = train_tiny_tokenizer(seed=seed)
    import sentencepiece
    vocab = sentencepiece.SentencePieceProcessor(model_proto=spiece).get_piece_size()
    text = tiny_umt5(vocab, config.text_dim, g)
    vae_model = tiny_wan_vae(g)
    siglip = tiny_siglip(config.siglip_dim, g)
    defaults = {"steps": 4, "guidance": 5.0, "shift": 5.0, "target_area": 64 * 64, **(defaults or {})}
    card = {"name": "tiny random SAMA bundle", "trained": False,
            "note": "random weights: exercises every code path, produces noise-like edits"}
    return write_bundle(folder, dit, vae_model, text, spiece, siglip, defaults, card)
