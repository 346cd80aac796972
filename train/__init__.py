"""Headless two-stage SAMA training on accelerate.

    python -m train cache  --config cfg.yaml             precompute VAE latents, text rows, anchor tokens
    python -m train stage0 --config cfg.yaml              factorized pre-training (image edits + raw videos)
    python -m train stage1 --config cfg.yaml              SFT on paired video edits (+ images)
    accelerate launch [--config_file train/accelerate/fsdp2.yaml] -m train stage1 --config cfg.yaml

Modules: config (YAML -> dataclasses), data (manifests, buckets, batch plan, decoding), features (frozen
encoders), cache (feature shards), losses (flow matching + semantic L1), ema, lora (peft, ComfyUI-readable
files), modeling (which DiT to start from), checkpoint (atomic accelerate states), loop (the loop, export),
validation (periodic edits), tiny (tiny random encoders + synthetic data for smoke runs and tests),
synthetic (SAMA-Shapes: procedural clips with ground-truth edits, docs/sama_shapes_data.md).
See docs/training.md.
"""
