"""The torch backend on an NVIDIA GPU, measured in one command (run by scripts/gpu_check.sh).

Steps, each in its own process, its output printed as it comes and tee'd to
``OUT/<step>.log``, its figures appended to ``OUT/figures.jsonl`` the moment it ends, so a
timeout still leaves everything measured so far:

1. ``cuda_tests``: ``pytest -m cuda`` on the torch-only test files (bf16 + 4-bit QLoRA
   training, kill -9 and exact resume);
2. ``quickstart``: ``configs/quickstart.yaml`` with ``--backend torch``;
3. ``hermes``: a Hermes-2-Pro-Mistral-7B-shaped model (its real config.json values, random
   weights made on the device, the embedded tokenizer) under the
   ``hermes-7b-qlora-nvidia-24gb`` preset and under bf16 LoRA: tokens/s, steps/s, peak GPU
   memory, next to ``mlx-tune plan``'s prediction for the same spec;
4. ``throughput``: ``benchmarks/torch_throughput.py``, our loop against a transformers
   ``Trainer`` with the same peft LoRA, batch and length.

``--cpu`` runs the same steps with small shapes on the CPU (the 7B config scaled down, no
4-bit), with MLX made unimportable so that the torch path is shown not to need it; that
run is a test (tests/e2e/test_gpu_check.py). Nothing here imports mlx.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "mlx_tune" / "assets" / "tiny-mistral"
PRESET = REPO / "configs" / "presets" / "hermes-7b-qlora-nvidia-24gb.yaml"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")

# NousResearch/Hermes-2-Pro-Mistral-7B config.json (the values that set shapes and memory).
HERMES = {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
          "vocab_size": 32032, "hidden_size": 4096, "intermediate_size": 14336,
          "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
          "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-05,
          "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
          "bos_token_id": 1, "eos_token_id": 32000, "torch_dtype": "bfloat16"}
# --cpu: the same architecture and vocabulary, narrow and shallow.
HERMES_CPU = dict(HERMES, hidden_size=64, intermediate_size=224, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, sliding_window=None)


class Check:
    def __init__(self, out: Path, cpu: bool, model_dir: Path):
        self.out, self.cpu, self.model_dir = out, cpu, model_dir
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
                        TOKENIZERS_PARALLELISM="false", MLX_TUNE_NO_BLAS_FIX="1",
                        CUBLAS_WORKSPACE_CONFIG=":4096:8")
        path = [str(REPO)]
        if cpu:  # prove the torch path needs no MLX: any `import mlx` fails loudly
            shadow = out / "no-mlx"
            for name in ("mlx", "mlx_lm"):
                (shadow / name).mkdir(parents=True, exist_ok=True)
                (shadow / name / "__init__.py").write_text(
                    f"raise ImportError('gpu_check --cpu: {name} must not be imported "
                    "on the torch path')\n")
            path.insert(0, str(shadow))
            self.env["MLX_TUNE_CUDA_TESTS_ON_CPU"] = "1"
        self.env["PYTHONPATH"] = os.pathsep.join(path + [self.env.get("PYTHONPATH", "")])

    def record(self, step: str, **figures) -> None:
        line = json.dumps({"step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **figures})
        with open(self.out / "figures.jsonl", "a") as f:
            f.write(line + "\n")
        print(f"[gpu_check] {line}", flush=True)

    def run(self, step: str, cmd: list[str], timeout: float) -> tuple[int, str, float]:
        """Stream a child's output to the terminal and OUT/<step>.log as it comes."""
        print(f"[gpu_check] {step}: {' '.join(cmd)}", flush=True)
        tic, lines = time.perf_counter(), []
        with open(self.out / f"{step}.log", "a") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    text=True)
            deadline = tic + timeout
            for line in proc.stdout:  # type: ignore[union-attr]
                sys.stdout.write(line)
                log.write(line)
                log.flush()
                lines.append(line)
                if time.perf_counter() > deadline:
                    proc.kill()
                    lines.append(f"[gpu_check] {step}: killed after {timeout:.0f} s\n")
                    break
            rc = proc.wait()
        return rc, "".join(lines), time.perf_counter() - tic

    def train(self, step: str, *flags: str, timeout: float) -> dict:
        out = self.out / step
        rc, text, wall = self.run(step, [sys.executable, "-m", "mlx_tune", "train",
                                         "--output-dir", str(out), "--dashboard", "plain",
                                         "--num-samples", "0", "--report-every", "1", *flags],
                                        timeout)
        figures = {"exit": rc, "wall_s": round(wall, 1), **metrics(out / "metrics.jsonl")}
        if rc:
            figures["tail"] = text[-600:]
        return figures


def metrics(path: Path) -> dict:
    """tokens/s and steps/s (median over reports after the first: compilation excluded),
    peak memory and the last losses, from a run's metrics.jsonl."""
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    pairs = list(zip(train, train[1:]))[1:] or list(zip(train, train[1:]))
    tok = sorted((b["trained_tokens"] - a["trained_tokens"]) / (b["wall_time"] - a["wall_time"])
                 for a, b in pairs)
    steps = sorted((b["step"] - a["step"]) / (b["wall_time"] - a["wall_time"]) for a, b in pairs)
    return {"steps": train[-1]["step"] if train else 0,
            "tokens_per_s": round(tok[len(tok) // 2], 1) if tok else None,
            "steps_per_s": round(steps[len(steps) // 2], 3) if steps else None,
            "peak_memory_gb": round(max(r.get("peak_memory_mb", 0) for r in train) / 1024, 3)
            if train else None,
            "last_loss": train[-1]["loss"] if train else None,
            "last_val_loss": evals[-1].get("val_loss", evals[-1].get("loss")) if evals else None}


def build_hermes(check: Check) -> str:
    """Write the Hermes-shaped model (random bf16 weights made on the device) and the
    embedded tokenizer into check.model_dir; returns the device used."""
    config = HERMES_CPU if check.cpu else HERMES
    d = check.model_dir
    d.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (TINY / name).exists():
            shutil.copy(TINY / name, d / name)
    code = f"""
import json, torch
from transformers import MistralConfig, MistralForCausalLM
cfg = MistralConfig(**json.loads({json.dumps(json.dumps(config))}))
dev = "cuda" if torch.cuda.is_available() and not {check.cpu} else "cpu"
torch.manual_seed(0)
with torch.device(dev):
    model = MistralForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained({str(d)!r}, safe_serialization=True, max_shard_size="5GB")
print("built on", dev, sum(p.numel() for p in model.parameters()), "parameters")
"""
    rc, text, wall = check.run("hermes_build", [sys.executable, "-c", code], timeout=300)
    check.record("hermes_build", exit=rc, wall_s=round(wall, 1),
                 params=int(m.group(1)) if (m := re.search(r"(\d+) parameters", text)) else None)
    return "cpu" if check.cpu else "cuda"


def plan_total(check: Check, step: str, flags: list[str]) -> float | None:
    """mlx-tune plan's predicted peak (GB) for the spec as given (its first column)."""
    rc, text, _ = check.run(f"{step}_plan", [sys.executable, "-m", "mlx_tune", "plan", *flags,
                                             "--memory-gb", "24"], timeout=120)
    m = re.search(r"total \(peak\)\s+([\d.]+) (GB|MB)", text)
    return None if rc or not m else round(float(m.group(1)) / (1 if m.group(2) == "GB" else 1e3), 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="small shapes on the CPU (no GPU needed)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "gpu-check-out"))
    ap.add_argument("--model-dir", default=None,
                    help="where the Hermes-shaped model is written (not under --out: 14 GB)")
    ap.add_argument("--steps", nargs="+", default=["cuda_tests", "quickstart", "hermes",
                                                   "throughput"])
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir or Path(tempfile.gettempdir()) / "gpu-check-hermes")
    check = Check(out, args.cpu, model_dir)
    import torch  # here, not at the top: the docstring and --help need no torch
    versions = {"python": sys.version.split()[0], "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    for dist in ("transformers", "peft", "bitsandbytes"):
        try:
            versions[dist] = __import__(dist).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is a figure too
            versions[dist] = None
    check.record("versions", cpu=args.cpu, **versions)
    failed = 0
    small = ["--max-steps", "4", "--eval-steps", "2", "--val-batches", "1",
             "--max-length", "128", "--batch-size", "2"] if args.cpu else []

    if "cuda_tests" in args.steps:
        rc, text, wall = check.run("cuda_tests", [
            sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
            "tests/model/test_torch_backend.py", "tests/e2e/test_cuda_resume.py"], timeout=240)
        summary = next((ln for ln in reversed(text.splitlines()) if " in " in ln), "")
        check.record("cuda_tests", exit=rc, wall_s=round(wall, 1), summary=summary.strip())
        failed += rc not in (0, 5)
    if "quickstart" in args.steps:
        figures = check.train("quickstart", "--config", "configs/quickstart.yaml",
                              "--backend", "torch", *small, timeout=240)
        check.record("quickstart", **figures)
        failed += figures["exit"] != 0
    if "hermes" in args.steps:
        device = build_hermes(check)
        base = ["--config", str(PRESET), "--model", str(model_dir), "--data", "data/recipes",
                "--eval-steps", "100000", "--checkpoint-interval", "100000"]
        runs = {"hermes_qlora": ["--max-steps", "6"], "hermes_bf16_lora": ["--max-steps", "6",
                                                                           "--quantize", "null"]}
        if args.cpu:  # bitsandbytes 4-bit needs CUDA; the preset's shape of run otherwise
            runs = {"hermes_qlora": ["--quantize", "null", "--dtype", "float32"],
                    "hermes_bf16_lora": ["--quantize", "null", "--dtype", "bfloat16"]}
            runs = {k: [*v, "--max-steps", "2", "--max-length", "128", "--batch-size", "2",
                        "--gradient-accumulation-steps", "1", "--val-batches", "1"]
                    for k, v in runs.items()}
        for step, flags in runs.items():
            predicted = plan_total(check, step, base + flags)
            figures = check.train(step, *base, *flags, timeout=300)
            measured = figures.get("peak_memory_gb")
            check.record(step, device=device, planned_peak_gb=predicted, **figures,
                         planner_error=round(predicted / measured - 1, 3)
                         if predicted and measured else None)
            failed += figures["exit"] != 0
    if "throughput" in args.steps:
        flags = ["--batch-size", "2", "--seq-len", "64", "--steps", "2", "--rounds", "1"] \
            if args.cpu else ["--batch-size", "8", "--seq-len", "512", "--steps", "10",
                              "--rounds", "3", "--compile"]
        rc, text, wall = check.run("throughput", [sys.executable,
                                                  "benchmarks/torch_throughput.py", *flags], 300)
        check.record("throughput", exit=rc, wall_s=round(wall, 1),
                     table=[ln for ln in text.splitlines() if "tokens/s" in ln or "x" in ln][-8:])
        failed += rc != 0
    check.record("done", failed_steps=failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
