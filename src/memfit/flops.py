"""FLOPs of a step, counted with torch's FlopCounterMode.

NOTE: FlopCounterMode has no formula for the CPU attention kernels
(`_scaled_dot_product_flash_attention_for_cpu` and its backward), so attention
would count as free on CPU and its recomputation as costless. They take the
same arguments as the CUDA kernels, so torch's own counting functions are
registered for them here.
"""
from __future__ import annotations

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu: _attention,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward,
}


def counting_flops() -> FlopCounterMode:
    """A FlopCounterMode that also counts CPU attention; `.get_total_flops()` after."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
