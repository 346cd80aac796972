"""`restore`: repair frames, retime or unshuffle a clip with SAMA's motion-alignment task tokens."""

from __future__ import annotations

from ..pretext import CUBE, SPEED, TUBE, with_task_token
from .edit import (add_model_args, add_sampling_args, build_pipeline, check_output_arg, check_sampling_args,
                   options_from, parse_range, progress_bar, settings_from)


def register(sub):
    p = sub.add_parser("restore", help="fill blanked frames, restore speed or unshuffle with a SAMA model",
                       description="Runs an edit whose instruction is a motion pretext's task token (what SAMA "
                                   "learns in stage 0). Example: fill frames 10-20 of a clip:\n  python -m "
                                   "sama_core restore --model BUNDLE --video in.mp4 --task cube --blank 10:21 "
                                   "--out fixed.mp4")
    add_model_args(p)
    p.add_argument("--video", required=True, help="the clip to restore")
    p.add_argument("--task", required=True, choices=[CUBE, SPEED, TUBE],
                   help="cube = fill missing (black) frames, speed = restore normal speed, tube = unshuffle")
    p.add_argument("--blank", help="START:END frames to black out first (e.g. damaged frames to regenerate)")
    p.add_argument("--caption", default="", help="optional description of the clip, after the task token")
    p.add_argument("--out", required=True, help="output .mp4")
    p.add_argument("--compare", action="store_true", help="also write a side-by-side video")
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    check_sampling_args(args)
    check_output_arg(args)
    pipe = build_pipeline(args)
    instruction = with_task_token(args.task, args.caption)
    # keep-unchanged is for edits: against the perturbed input's round trip it would put back the very frames
    # (the blank, the doubled speed, the shuffled tubes) the task repairs, so it is off whatever the bundle says
    settings = settings_from(args, use_prefix=False, blank_frames=parse_range(args.blank), keep_unchanged=0)
    result = pipe.edit_file(args.video, instruction, args.out, settings, options_from(pipe, args),
                            compare=args.compare, callback=progress_bar())
    print(f"wrote {result.output} ({result.frames.shape[0]} frames) with instruction '{instruction}'")
    return 0
