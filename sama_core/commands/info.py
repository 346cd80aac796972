"""`info FILE...`: what a checkpoint file (or set of files) is, and what is missing."""

from __future__ import annotations

import json


def register(sub):
    p = sub.add_parser("info", help="describe DiT checkpoint file(s): format, dtype, config, SAMA parts")
    p.add_argument("files", nargs="+", help="file(s), folder or .index.json; base shards first, SAMA file last")
    p.add_argument("--config", help="config JSON (only needed for non-Wan head counts)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..loading import inspect
    report = inspect(args.files, config=args.config)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if report.get("config") else 1
    for f in report["formats"]:
        print(f"file:       {f}")
    print(f"tensors:    {report['tensors']}  parameters: {report['parameters']:,}")
    if report.get("config"):
        cfg = report["config"]
        print(f"model:      {report['model']}  (dim {cfg['dim']}, {cfg['num_layers']} layers, "
              f"{cfg['num_heads']} heads, text_dim {cfg['text_dim']})")
        parts = ", ".join(f"{k} {'yes' if v else 'MISSING'}" for k, v in report["sama_parts"].items())
        print(f"SAMA parts: {parts}")
        print(f"keys:       {report['keys']}")
    if report.get("problem"):
        print(f"problem:    {report['problem']}")
    return 0 if report.get("config") and not report.get("problem") else 1
