"""The morning-after commands: fuse, convert-adapter, evaluate, report (argument handling
only; the work is in mlx_tune.export, commands.evaluate and mlx_tune.reporting.summary)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def morning_cli(args: argparse.Namespace) -> int:
    # Warnings (a record a read-only run directory could not take) come after the result.
    warnings: list[str] = []
    try:
        return _run(args, warnings.append)
    finally:
        for line in warnings:
            print(line, file=sys.stderr)


def _run(args: argparse.Namespace, warn) -> int:
    if args.command == "convert-adapter":
        from mlx_tune.export.adapters import convert_adapter
        out = convert_adapter(args.src, args.dst, args.to, base=args.base)
        print(f"converted {args.src} -> {out} ({args.to} format)")
        return 0
    if args.command == "fuse":
        from mlx_tune.export.fuse import fuse_run
        result = fuse_run(Path(args.run_dir), args.checkpoint, Path(args.output),
                          dequantize=args.dequantize, gguf=args.gguf, log=print,
                          warn=warn)
        print(f"fused {result.checkpoint} (step {result.step}) into {result.output}")
        return 0
    if args.command == "evaluate":
        from mlx_tune.commands.evaluate import evaluate_run
        result = evaluate_run(Path(args.run_dir), args.checkpoint, args.data, log=print,
                              warn=warn)
        print(result.line())
        return 0
    from mlx_tune.commands.report import report_cli
    return report_cli(Path(args.run_dir), Path(args.html) if args.html else None,
                      force=args.force)
