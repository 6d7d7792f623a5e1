"""Keeping bitsandbytes' 4-bit layers trainable through evaluation and generation.

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
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch


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
