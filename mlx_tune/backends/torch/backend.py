"""The PyTorch backend: the same spec on NVIDIA GPUs (and, slowly, on any CPU).

Models come from transformers, LoRA/DoRA from peft, QLoRA from bitsandbytes; the step
(``torch_step.py``) means exactly what the MLX step means. Everything the loop sees
(batches, StepResult, EvalResult, checkpoint arrays) is the same as on MLX.

The bitsandbytes trap (0.50): ``Linear4bit.forward`` on a CPU with AVX512-BF16, in eval
mode, on an input without grad, *repacks the layer's weight in place* into an
inference-only layout (``_convert_weight_packed_for_cpu``: nibbles re-tiled, absmax
transposed and cast to bf16, ``quant_state.packing_format_for_cpu = True``) and never
converts it back. From then on ``matmul_4bit`` sends every CPU call, training ones
included, to ``gemv_4bit``, an op without an autograd formula: no gradient flows
through the base weights any more (the only sign is a UserWarning); only the paths
through the adapters themselves remain, so LoRA gradients come out silently wrong. bitsandbytes' own inverse does not help: it
leaves absmax transposed in bf16 (24% error in the dequantized weight). Our loop
evaluates before the first step, so ``FourBitGuard`` makes the conversion impossible.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from mlx_tune.data.batch import Batch
from mlx_tune.config.spec import Spec
from mlx_tune.models.tokenizer import load_tokenizer
from mlx_tune.backends.base import EvalResult, ModelInfo, StepConfig, StepResult, match_targets
from mlx_tune.backends.torch.step import (TorchStep, load_optimizer_arrays, make_optimizer,
                         optimizer_arrays)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SIDECAR = "mlx_tune_adapter.json"  # how to rebuild the base an adapter was trained on


class TorchCodec:
    """torch tensors <-> safetensors for the checkpoint manager (see checkpoint_io)."""

    name = "torch"

    def is_array(self, value: object) -> bool:
        return isinstance(value, torch.Tensor)

    def materialize(self, arrays: list) -> None:
        pass  # eager: save_file copies to the host

    def save_file(self, arrays: dict[str, object], path: str) -> None:
        from safetensors.torch import save

        host, seen = {}, set()
        for k, v in arrays.items():
            t = v.detach().cpu().contiguous()
            if t.data_ptr() in seen:  # safetensors refuses tensors sharing memory
                t = t.clone()
            seen.add(t.data_ptr())
            host[k] = t
        # Serialize in memory, then plain Python I/O, so a full disk is an
        # OSError(ENOSPC) like NumpyCodec's, not a wrapped Rust error.
        data = save(host)
        with open(path, "wb") as f:
            f.write(data)

    def load_file(self, path: str) -> dict[str, object]:
        from safetensors.torch import load

        with open(path, "rb") as f:  # owns its memory: nothing stays mmapped
            return load(f.read())

    def release(self) -> None:
        pass


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-thread siblings counted once)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        allowed = os.cpu_count() or 1
    try:
        cores, phys = set(), "0"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "physical id":
                phys = value.strip()
            elif key.strip() == "core id":
                cores.add((phys, value.strip()))
        return max(1, min(len(cores) or allowed, allowed))
    except OSError:
        return max(1, allowed)


def default_threads() -> int:
    """Half the physical cores, at least 1: a deliberate trade.

    Oversubscribed CPUs collapse: every op of a step is an OpenMP region that waits for
    its slowest thread, and a thread that loses its core to another process stalls them
    all. On a loaded 2-core machine our step ran 6.9x *slower* with 2 threads than with
    1 (157 ms vs 1083 ms; elsewhere 2 threads measured 0.36x of idle speed while 1
    thread held). Leaving half the cores idle costs at most ~2x on an idle machine, and
    leaves room for the data thread and the tokenizer. CPU runs are for development,
    tests and parity (GPU runs barely use CPU threads); ``torch_threads`` overrides."""
    return max(1, physical_cores() // 2)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def load_base(model_dir: Path, *, quantize: int | None, dtype: str, device: torch.device,
              trust_remote_code: bool = False) -> torch.nn.Module:
    """transformers' model, in the spec's dtype, optionally quantized by bitsandbytes."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = device.type == "cuda"
    # "auto" keeps the stored dtype on a GPU; CPU runs (development, parity) are float32.
    torch_dtype = DTYPES.get(dtype, "auto" if cuda else torch.float32)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if quantize:
        compute = DTYPES.get(dtype, torch.bfloat16) if cuda else torch.float32
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=compute) if quantize == 4
            else BitsAndBytesConfig(load_in_8bit=True))
        kwargs["device_map"] = {"": device}
        if torch_dtype == "auto":
            kwargs["dtype"] = compute
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    return model if quantize else model.to(device)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks (``model.layers`` in Llama/Mistral/Qwen/Gemma...)."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in (
                "layers", "h", "blocks") and (best is None or len(module) > len(best)):
            best = module
    if best is None:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")
    return best


def lora_keys(block: torch.nn.Module, targets: Sequence[str]) -> list[str]:
    """Module paths inside a block (``self_attn.q_proj``) for the spec's targets."""
    return match_targets([n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)],
                         targets)


class FourBitGuard:
    """Keeps bitsandbytes' 4-bit layers on their training kernels (see the module doc).

    Three independent locks: (1) the per-layer switch that allows the CPU repacking is
    turned off at load; (2) during evaluation and generation the quantized layers stay
    in training mode (they have no dropout; for 4-bit ``training`` only gates that
    repacking, for 8-bit it picks the CPU kernel the step uses), while everything else
    is in eval mode; (3) after every evaluation/generation, a 4-bit layer found repacked
    anyway is put back *exactly*: its original packed weight and QuantState, held by
    reference since load (no copy unless a conversion happened)."""

    def __init__(self, model: torch.nn.Module):
        try:
            from bitsandbytes.nn import Linear4bit, Linear8bitLt
        except ImportError:
            Linear4bit = Linear8bitLt = ()
        self.layers = [m for m in model.modules() if Linear4bit and isinstance(m, Linear4bit)]
        self.pinned = self.layers + [m for m in model.modules()
                                     if Linear8bitLt and isinstance(m, Linear8bitLt)]
        self.saved = {}  # the repacking exists on the CPU only
        for m in self.layers:
            m.support_avx512bf16_for_cpu = False
            if m.weight.device.type == "cpu":
                self.saved[m] = (m.weight.data, copy.copy(m.weight.quant_state))
        self.repairs = 0

    @contextmanager
    def inference(self, model: torch.nn.Module) -> Iterator[None]:
        model.eval()
        for m in self.pinned:
            m.training = True
        try:
            with torch.no_grad():
                yield
        finally:
            model.train()
            self.restore()

    def restore(self) -> int:
        repaired = 0
        for m, (data, state) in self.saved.items():
            qs = m.weight.quant_state
            moved = m.weight.data_ptr() != data.data_ptr()
            if moved or getattr(qs, "packing_format_for_cpu", False):
                m.weight.data = data
                m.weight.quant_state = m.quant_state = copy.copy(state)
                repaired += 1
        if repaired and not self.repairs:
            warnings.warn(f"bitsandbytes repacked {repaired} 4-bit layer(s) for CPU inference; "
                          "restored their training layout", RuntimeWarning, stacklevel=3)
        self.repairs += repaired
        return repaired


class TorchBackend:
    name = "torch"

    def __init__(self) -> None:
        self.codec = TorchCodec()
        self.rank, self.world_size = 0, 1
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():  # torchrun
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = default_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    # -- loading ---------------------------------------------------------------
    def load(self, spec: Spec, model_dir: Path) -> ModelInfo:
        self.spec, self.model_dir = spec, Path(model_dir)
        torch.set_num_threads(spec.torch_threads or default_threads())
        if spec.quantize and spec.fine_tune_type == "full":
            raise ValueError("fine_tune_type: full cannot train a quantized base; "
                             "use lora or dora, or drop 'quantize'")
        if spec.quantize and spec.quantize_group_size != 64:
            warnings.warn("torch backend: bitsandbytes NF4 uses blocks of 64; "
                          f"quantize_group_size={spec.quantize_group_size} applies to MLX only")
        self.tokenizer = load_tokenizer(self.model_dir, spec.trust_remote_code)
        model = load_base(self.model_dir, quantize=spec.quantize, dtype=spec.dtype,
                          device=self.device, trust_remote_code=spec.trust_remote_code)
        blocks = len(decoder_layers(model))
        layers = blocks if spec.lora.layers == -1 else spec.lora.layers
        if layers > blocks:
            raise ValueError(f"lora.layers is {layers} but the model has {blocks} "
                             "blocks (-1 = all)")
        if spec.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        # The adapter's random init and LoRA dropout draw from here: seed first.
        torch.manual_seed(spec.seed)
        self.keys: list[str] = []
        if spec.fine_tune_type == "full":
            model.requires_grad_(True)
        else:
            from peft import LoraConfig, get_peft_model
            self.keys = lora_keys(decoder_layers(model)[0], spec.lora.targets)
            if spec.gradient_checkpointing:
                model.enable_input_require_grads()
            with warnings.catch_warnings():  # peft calls a deprecated transformers API
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
                model = get_peft_model(model, LoraConfig(
                    r=spec.lora.rank, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                    target_modules=self.keys, use_dora=spec.fine_tune_type == "dora", bias="none",
                    layers_to_transform=None if layers == blocks
                    else list(range(blocks - layers, blocks)), task_type="CAUSAL_LM"))
        self.model, self.num_layers = model, layers
        self.guard = FourBitGuard(model)
        self.forward = model
        if self.world_size > 1:  # torchrun: DDP sums gradients across ranks in backward
            from mlx_tune.backends.torch.ddp import wrap
            self.forward = wrap(model, self.device)
        if spec.torch_compile:
            import torch._dynamo as dynamo
            dynamo.config.suppress_errors = True  # fall back to eager where it fails
            self.forward = torch.compile(self.forward)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.optimizer = make_optimizer(spec.optimizer, list(self.params.values()),
                                        learning_rate=spec.learning_rate,
                                        weight_decay=spec.weight_decay, betas=spec.betas,
                                        eps=spec.eps, momentum=spec.momentum)
        cuda_amp = self.device.type == "cuda" and spec.dtype in ("auto", "bfloat16")
        self.step_fn = TorchStep(self.forward, self.params, self.optimizer, StepConfig(
            grad_clip=spec.grad_clip, label_smoothing=spec.label_smoothing,
            ema_decay=spec.ema.decay if spec.ema.enabled else None,
            world_size=self.world_size, gradient_noise=spec.gradient_noise.eta > 0),
            self.device, autocast=(lambda: torch.autocast("cuda", dtype=torch.bfloat16))
            if cuda_amp else nullcontext)
        model.train()
        total = sum(_numel(p) for p in model.parameters())
        trainable = sum(p.numel() for p in self.params.values())
        return ModelInfo(str(self.model_dir), total, trainable, blocks, spec.quantize)

    # -- training ----------------------------------------------------------------
    def step(self, micro_batches: Sequence[Batch], lr: float, noise_std: float) -> StepResult:
        loss, ntok, norm, finite = self.step_fn(micro_batches, lr, noise_std)
        return StepResult(loss=loss, tokens=ntok, grad_norm=norm, finite=finite)

    def evaluate(self, batches: Iterable[Batch]) -> EvalResult:
        with self.guard.inference(self.model):
            total = torch.zeros(5, device=self.device)
            for b in batches:
                total += self.step_fn.eval_batch(b)
            if self.world_size > 1:
                import torch.distributed as dist
                dist.all_reduce(total)
            return EvalResult(*total.tolist())

    def to_floats(self, values: Sequence[Any]) -> list[float]:
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        if not tensors:
            return [float(v) for v in values]
        # One device->host copy for the whole report interval.
        host = iter(torch.stack([t.detach().reshape(()).double() for t in tensors]).tolist())
        return [next(host) if isinstance(v, torch.Tensor) else float(v) for v in values]

    def memory(self) -> tuple[int, int]:
        if self.device.type == "cuda":
            return (torch.cuda.memory_allocated(self.device),
                    torch.cuda.max_memory_allocated(self.device))
        return process_memory()

    def compiled_shapes(self) -> int:
        """Distinct input shapes the model's forward has been called with in steps and
        evaluation (torch.compile, like mx.compile, specialises on them)."""
        return len(self.step_fn.shapes)

    # -- state -------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, Any], dict]:
        """Flat tensors (live references: save them before the next step) + JSON meta."""
        arrays: dict[str, Any] = {f"trainable/{k}": p.detach() for k, p in self.params.items()}
        opt, scalars = optimizer_arrays(self.optimizer, {p: k for k, p in self.params.items()})
        arrays.update(opt)
        arrays.update({f"ema/{k}": v for k, v in self.step_fn.ema.items()})
        arrays["rng/torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            arrays["rng/cuda"] = torch.cuda.get_rng_state(self.device)
        return arrays, {"backend": "torch", "optimizer": type(self.optimizer).__name__,
                        "optimizer_scalars": scalars}

    @torch.no_grad()
    def load_state_dict(self, arrays: dict[str, Any], meta: dict) -> None:
        if meta.get("optimizer", type(self.optimizer).__name__) != type(self.optimizer).__name__:
            raise ValueError("checkpoint optimizer state does not match this optimizer "
                             f"({meta.get('optimizer')} in the checkpoint)")
        missing = [k for k in self.params if f"trainable/{k}" not in arrays]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} trainable tensor(s), "
                             f"e.g. {missing[0]}")
        for k, p in self.params.items():
            p.copy_(arrays[f"trainable/{k}"])
        load_optimizer_arrays(self.optimizer, arrays, self.params,
                              meta.get("optimizer_scalars", {}))
        for k, e in self.step_fn.ema.items():
            if f"ema/{k}" in arrays:
                e.copy_(arrays[f"ema/{k}"])
        if "rng/torch" in arrays:
            torch.set_rng_state(arrays["rng/torch"].cpu())
        if "rng/cuda" in arrays and self.device.type == "cuda":
            torch.cuda.set_rng_state(arrays["rng/cuda"].cpu(), self.device)

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Evaluate (or save) with the EMA weights, then put the live ones back."""
        if not self.step_fn.ema:
            yield
            return
        with torch.no_grad():
            live = {k: p.detach().clone() for k, p in self.params.items()}
            for k, p in self.params.items():
                p.copy_(self.step_fn.ema[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(live[k])

    # -- output ------------------------------------------------------------------
    def save_adapter(self, directory: Path) -> None:
        """peft's format (adapter_config.json + adapter_model.safetensors; a full
        fine-tune: the whole model, ``save_pretrained``), plus our small sidecar that
        says how to rebuild the base (quantization). Files are swapped in atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self.model.save_pretrained(str(tmp))
            if self.spec.fine_tune_type == "full":
                self.tokenizer.save_pretrained(str(tmp))
            (tmp / SIDECAR).write_text(json.dumps({
                "trainer": "mlx-tune", "backend": "torch",
                "fine_tune_type": self.spec.fine_tune_type,
                "quantize": self.spec.quantize, "dtype": self.spec.dtype,
                "base_model": self.spec.model, "model": str(self.model_dir),
                "num_layers": self.num_layers, "keys": self.keys}, indent=2))
            for f in sorted(tmp.iterdir()):
                os.replace(f, directory / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def generate(self, messages: list[dict], max_tokens: int) -> str:
        with self.guard.inference(self.model):
            return greedy(self.model, self.tokenizer, messages, max_tokens, self.device)


def _numel(p: torch.Tensor) -> int:
    state = getattr(p, "quant_state", None)  # bitsandbytes 4-bit: packed storage
    return int(torch.Size(state.shape).numel()) if state is not None else p.numel()


def process_memory() -> tuple[int, int]:
    """(resident set size, its peak) of this process, in bytes."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE"), peak
    except (OSError, ValueError, IndexError):
        return peak, peak


@torch.no_grad()
def greedy(model: torch.nn.Module, tokenizer: Any, messages: list[dict], max_tokens: int,
           device: torch.device) -> str:
    """Greedy decoding of the assistant's reply (what ``generate`` shows at evaluations)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    inputs = torch.tensor([list(ids)], device=device)
    eos = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                         max_new_tokens=max_tokens, do_sample=False, use_cache=True,
                         eos_token_id=sorted(e for e in eos if e is not None),
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs.shape[1]:], skip_special_tokens=True)


def generate_with_adapter(model_dir: Path | str, adapter_dir: Path | str | None,
                          messages: list[dict], max_tokens: int) -> str:
    """``mlx-tune generate --backend torch``: the base (rebuilt as it was trained,
    quantization included) with a saved adapter, or a fully fine-tuned model directory."""
    model_dir = Path(model_dir)
    device = default_device()
    info: dict = {}
    if adapter_dir is not None and (Path(adapter_dir) / SIDECAR).is_file():
        info = json.loads((Path(adapter_dir) / SIDECAR).read_text())
    if adapter_dir is not None and (Path(adapter_dir) / "config.json").is_file():
        model_dir, adapter_dir = Path(adapter_dir), None  # a full fine-tune
    tokenizer = load_tokenizer(model_dir)
    model = load_base(model_dir, quantize=info.get("quantize"), dtype=info.get("dtype", "auto"),
                      device=device)
    if adapter_dir is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return greedy(model, tokenizer, messages, max_tokens, device)
