"""`python -m train stage0|stage1|cache|tiny-setup ...` (also under `accelerate launch -m train ...`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from sama_core.cli import command_line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train", description="Two-stage SAMA training (accelerate).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for stage, what in (("stage0", "factorized pre-training: image edit pairs + raw videos with motion pretexts"),
                        ("stage1", "SFT on paired video edits (+ image edits), starting from stage 0's export")):
        p = sub.add_parser(stage, help=what, description=what)
        p.add_argument("--config", required=True, help="YAML config (see train/configs/)")
        p.add_argument("--resume", default=None,
                       help="'latest' (newest complete checkpoint in output_dir, or a fresh start) or a checkpoint "
                            "folder")
        p.add_argument("overrides", nargs="*", help="config overrides key.sub=value, e.g. train.max_steps=100")
    p = sub.add_parser("cache", help="precompute VAE latents, text rows and SigLIP anchor tokens (resumable)")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("tiny-setup", help="write tiny random encoders, synthetic data and tiny configs (CPU smoke run)")
    p.add_argument("--out", required=True, help="folder to create")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def _setup_logging(verbose: bool) -> None:
    # The launcher's environment says which process this is; creating accelerate's state here would fix
    # its settings (CPU or not) before the Accelerator is built.
    main = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0
    level = logging.DEBUG if verbose else (logging.INFO if main else logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


@command_line("interrupted: resume with --resume latest")
def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    if args.command == "tiny-setup":
        from .tiny import make_tiny_workspace
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        paths = make_tiny_workspace(args.out)
        print("tiny workspace written:")
        for name, path in paths.items():
            print(f"  {name}: {path}")
        return 0
    _setup_logging(args.verbose)
    from .config import load_config
    cfg = load_config(args.config, args.overrides)
    if args.command == "cache":
        from accelerate import Accelerator
        from .cache import build_cache
        build_cache(cfg, Accelerator())
        return 0
    cfg.stage = args.command
    from .loop import train
    result = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"finished at step {result.step}; export: {result.export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
