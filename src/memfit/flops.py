"""FLOPs of a step, counted with torch's FlopCounterMode.

NOTE: FlopCounterMode has no formula for the CPU attention kernels
(`_scaled_dot_product_flash_attention_for_cpu` and its backward), so attention
would count as free on CPU and its recomputation as costless. They take the
same arguments as the CUDA kernels, so torch's own counting functions are
registered for them here. Nor has it one for `_grouped_mm`, the experts'
matmul of a mixture of experts (its backward is made of `_grouped_mm` too).
"""
from __future__ import annotations

import math

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _grouped_mm(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """2 x output elements x the contracted size. Two 2-D operands grouped
    along the contracted dimension (a weight gradient) give one output matrix
    per group, each contracting only its group's share."""
    elements = math.prod(out_shape)
    if len(a_shape) == len(b_shape) == 2:
        elements //= out_shape[0]
    return 2 * elements * a_shape[-1]


MISSING = {
    aten._scaled_dot_product_flash_attention_for_cpu: _attention,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward,
    aten._grouped_mm: _grouped_mm,
}


def counting_flops() -> FlopCounterMode:
    """A FlopCounterMode that also counts CPU attention and grouped matmuls; `.get_total_flops()` after."""
    return FlopCounterMode(display=False, custom_mapping=MISSING)
