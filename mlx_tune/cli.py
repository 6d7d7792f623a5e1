"""`mlx-tune train | generate | lr-find | plan | doctor | fuse | convert-adapter | evaluate |
report`.

Every spec field gets a flag generated from the spec itself (``lora.rank`` ->
``--lora-rank``), so YAML and the command line can never drift apart. Errors a user
can fix are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from dataclasses import MISSING
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from mlx_tune import __version__
from mlx_tune.backends import registry
from mlx_tune.config.schema import Spec, leaf_fields, to_yaml
from mlx_tune.config.spec import build_spec
from mlx_tune.errors import UserError
from mlx_tune.exit_codes import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK

# Which top-level fields go under which heading in `mlx-tune train --help`.
SECTIONS = {
    "model": ("model", "backend", "fine_tune_type", "quantize", "quantize_group_size", "dtype",
              "trust_remote_code", "lora", "init_adapter"),
    "objective": ("objective", "preference"),
    "data": ("data", "data_split", "data_fields", "max_length", "mask_prompt", "val_split", "streaming", "shuffle_buffer",
             "bucket_widths", "packing", "pack_length", "prefetch", "curriculum", "quality", "augmentation"),
    "optimization": ("batch_size", "gradient_accumulation_steps", "memory_budget_gb", "memory", "max_steps",
                     "num_epochs", "optimizer", "learning_rate", "weight_decay", "betas", "eps", "momentum",
                     "grad_clip", "label_smoothing", "gradient_noise", "gradient_checkpointing",
                     "memory", "ema"),
    "schedule": ("lr_schedule", "warmup_steps", "warmup_ratio", "min_lr", "cosine_restarts",
                 "onecycle"),
    "evaluation and early stopping": ("eval_steps", "eval_schedule", "val_batches",
                                      "eval_at_start", "sample_prompts", "num_samples",
                                      "sample_max_tokens", "eval_metrics", "early_stopping",
                                      "test_at_end", "test_batches"),
    "checkpoints and output": ("output_dir", "checkpoint_interval", "keep_checkpoints", "seed"),
    "reporting": ("report_every", "dashboard", "report_to", "tensorboard", "allow_sleep"),
    "supervision (--supervise)": ("supervise",),
    "torch backend": ("torch_compile", "torch_threads"),
}


def _flag(key: str, meta: dict) -> str:
    return "--" + (meta.get("flag") or key.replace(".", "-").replace("_", "-"))


def _parse_value(tp: Any):
    """Flag values are YAML scalars ('4', 'null', '[q, v]'); comma lists for list fields."""
    def parse(text: str) -> Any:
        for number in (int, float):  # YAML 1.1 reads '1e-3' as a string
            try:
                return number(text)
            except ValueError:
                pass
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        if (tp is list or getattr(tp, "__origin__", None) is list) and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return value
    return parse


def add_spec_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per spec leaf, grouped under the spec's sections in --help."""
    leaves = {key: (f, tp) for key, f, tp in leaf_fields()}
    for title, tops in SECTIONS.items():
        group = parser.add_argument_group(title)
        for key, (f, tp) in leaves.items():
            if key.split(".")[0] not in tops:
                continue
            meta = dict(f.metadata)
            default = f.default if f.default is not MISSING else f.default_factory()
            help_text = meta.get("help", "").replace("%", "%%")  # argparse formats help with %
            if tp is bool or tp == Optional[bool]:  # Optional: unset means 'not given'
                group.add_argument(_flag(key, meta), dest="spec:" + key, default=argparse.SUPPRESS,
                                   action=argparse.BooleanOptionalAction, help=help_text)
            else:
                group.add_argument(_flag(key, meta), dest="spec:" + key, default=argparse.SUPPRESS,
                                   type=_parse_value(tp), metavar="X",
                                   help=f"{help_text} (default: {default})")
    extra = parser.add_argument_group("switches")
    extra.add_argument("--disable-cosine-schedule", action="store_true",
                       help="use linear decay instead of cosine (same as --lr-schedule linear)")
    extra.add_argument("--disable-gradient-noise", action="store_true",
                       help="turn gradient noise off (same as --gradient-noise-eta 0)")


def spec_from_args(args: argparse.Namespace) -> Spec:
    overrides = {k[len("spec:"):]: v for k, v in vars(args).items() if k.startswith("spec:")}
    if getattr(args, "disable_cosine_schedule", False):
        overrides["lr_schedule"] = "linear"
    if getattr(args, "disable_gradient_noise", False):
        overrides["gradient_noise.eta"] = 0.0
    return build_spec(getattr(args, "config", None), overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-tune", description="Unattended LoRA/QLoRA "
                                     "fine-tuning on Apple Silicon (MLX) and NVIDIA (PyTorch).")
    parser.add_argument("--version", action="version", version=f"mlx-tune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune a model")
    train.add_argument("--config", "-c", help="YAML spec (command-line flags override it)")
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved spec and exit")
    resume = train.add_mutually_exclusive_group()
    resume.add_argument("--auto-resume", action="store_true",
                        help="resume from the newest valid checkpoint without asking")
    resume.add_argument("--force-fresh", action="store_true",
                        help="start over; the old run directory is moved aside, nothing deleted")
    # Given by the supervisor to the runs it restarts: resume without asking, whatever
    # --force-fresh the first run was started with.
    train.add_argument("--supervisor-restart", action="store_true", help=argparse.SUPPRESS)
    train.add_argument("--accept-changes", action="store_true",
                       help="resume even though settings that change what the checkpoint "
                            "means (lora.alpha, batch_size, data content...) differ")
    add_spec_flags(train)

    gen = sub.add_parser("generate", help="generate with a base model and an adapter")
    gen.add_argument("--model", required=True)
    gen.add_argument("--adapter", help="adapter directory (output_dir/adapters)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--system", help="optional system message")
    gen.add_argument("--tools", metavar="FILE.json",
                     help="JSON list of function specs, passed to the chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--backend", default="auto", choices=("auto", *registry.names()))

    lr = sub.add_parser("lr-find", help="sweep the learning rate and suggest one")
    lr.add_argument("--config", "-c")
    lr.add_argument("--start-lr", type=float, default=1e-7, help="first learning rate of the sweep")
    lr.add_argument("--end-lr", type=float, default=1.0, help="last learning rate of the sweep")
    lr.add_argument("--steps", type=int, default=100, help="sweep length in steps")
    lr.add_argument("--plot", help="PNG path (default: OUTPUT_DIR/lr_find.png); an existing "
                    "file is replaced only if lr-find wrote it")
    lr.add_argument("--force", action="store_true",
                    help="replace the --plot file (and its .csv) even if lr-find did not write it")
    add_spec_flags(lr)

    plan = sub.add_parser("plan", help="estimate peak memory; propose batch and accumulation")
    plan.add_argument("--config", "-c")
    plan.add_argument("--memory-gb", type=float, help="memory to plan for (default: detected)")
    add_spec_flags(plan)

    sub.add_parser("doctor", help="check the installation: MLX device, BLAS, dependencies")
    add_morning_commands(sub)
    return parser


def add_morning_commands(sub: Any) -> None:
    """What users run after a night's training: fuse, convert-adapter, report."""
    fuse = sub.add_parser("fuse", help="merge a run's adapter into its base (Hugging Face "
                          "format, optionally GGUF)")
    fuse.add_argument("run_dir", metavar="RUN_DIR", help="the run's output_dir")
    fuse.add_argument("--checkpoint", default="final",
                      help="final (the saved adapter), best, or step-N (default: final)")
    fuse.add_argument("--output", "-o", required=True, help="directory for the fused model")
    fuse.add_argument("--dequantize", action="store_true",
                      help="write float weights even when the base was quantized")
    fuse.add_argument("--gguf", action="store_true",
                      help="also write model.gguf (llama/mistral/mixtral; implies float weights)")

    conv = sub.add_parser("convert-adapter", help="convert a LoRA/DoRA adapter between "
                          "mlx-lm and peft formats")
    conv.add_argument("--to", required=True, choices=("mlx", "peft"))
    conv.add_argument("--base", help="base model directory or repo id, when the adapter's "
                      "own config does not name one that is available here")
    conv.add_argument("src", metavar="SRC")
    conv.add_argument("dst", metavar="DST")

    ev = sub.add_parser("evaluate", help="loss, perplexity and token accuracy of a run's "
                        "checkpoint on its test set (or --data)")
    ev.add_argument("run_dir", metavar="RUN_DIR", help="the run's output_dir")
    ev.add_argument("--checkpoint", default="final",
                    help="final (the saved adapter), best, or step-N (default: final)")
    ev.add_argument("--data", metavar="PATH", help="a JSONL file, or a data directory / "
                    "dataset whose test.jsonl / 'test' split is scored (default: the run's data)")

    report = sub.add_parser("report", help="the morning report of a run: terminal summary "
                            "and a self-contained HTML page with plots")
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.add_argument("--html", help="HTML path (default: RUN_DIR/report.html); an existing "
                        "file is replaced only if it is an mlx-tune report")
    report.add_argument("--force", action="store_true",
                        help="replace the --html file even if it is not an mlx-tune report")


def run_command(args: argparse.Namespace) -> int:
    if args.command == "doctor":
        from rich.console import Console
        from mlx_tune.commands.doctor import run_doctor
        return run_doctor(Console())
    if args.command in ("fuse", "convert-adapter", "evaluate", "report"):
        from mlx_tune.commands.morning import morning_cli
        return morning_cli(args)
    if args.command == "generate":
        from mlx_tune.commands.generate import generate_cli
        return generate_cli(args)
    spec = spec_from_args(args)
    if args.command == "train":
        if args.print_config:
            print(to_yaml(spec), end="")
            return EXIT_OK
        if spec.supervise.enabled:
            from mlx_tune.supervise.night import supervise
            return supervise(spec, getattr(args, "argv", None) or sys.argv[1:])
        from mlx_tune.training.recipe import train
        restarted = getattr(args, "supervisor_restart", False)
        mode = "auto" if args.auto_resume or restarted else "fresh" if args.force_fresh else "ask"
        return train(spec, resume=mode, accept_changes=args.accept_changes).exit_code
    if args.command == "lr-find":
        from mlx_tune.commands.lr_find import lr_find_cli
        return lr_find_cli(spec, args)
    from mlx_tune.commands.plan import plan_cli
    return plan_cli(spec, args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Parsed first: --help, --version and a mistyped flag answer at once, with no BLAS
    # notice before them. Every command then runs on OpenBLAS where the fix applies; the
    # notice says so once, for the runs whose speed it is about (train, lr-find).
    args = build_parser().parse_args(argv)
    args.argv = argv  # the supervisor starts its runs with the same command line
    from mlx_tune.system.blas import maybe_reexec_with_openblas
    maybe_reexec_with_openblas(argv, notice=args.command in ("train", "lr-find"))
    try:
        return run_command(args)
    except KeyboardInterrupt:
        print("mlx-tune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UserError as e:  # bad input: one line, and the error's own exit code
        print(f"mlx-tune: error: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - the one place that turns errors into exit codes
        log = Path.cwd() / "mlx-tune-crash.log"
        try:
            log.write_text(traceback.format_exc())
            where = f"traceback in {log}"
        except OSError as write_error:  # a read-only working directory: still one line
            where = f"no traceback saved: {log}: {write_error.strerror or write_error}"
        print(f"mlx-tune: error: {type(e).__name__}: {e} ({where})", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
