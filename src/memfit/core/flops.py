"""FLOPs of a step, counted with torch's FlopCounterMode.

NOTE: FlopCounterMode has no formula for the CPU attention kernels
(`_scaled_dot_product_flash_attention_for_cpu` and its backward), so attention
would count as free on CPU and its recomputation as costless. They take the
same arguments as the CUDA kernels, so torch's own counting functions are
registered for them here. Nor has it one for `_grouped_mm`, the experts'
matmul of a mixture of experts (its backward is made of `_grouped_mm` too).

The counter's mode says `ignore_compile_internals`, as the memory tracker's
does (NOTE [compiled code] in memfit.core.memory): compiled code runs under it,
and it counts the aten ops that code calls. Inductor's fused kernels are
not ops it sees; the matmuls inductor leaves to aten are.
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


class _CompiledToo(flop_counter._FlopCounterMode):
    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # compiled code wraps random ops (dropout) in these; torch's counter has no rule for them
        hops = torch.ops.higher_order
        if func in (hops.run_and_save_rng_state, hops.run_with_rng_state):
            out = func(*args, **(kwargs or {}))
            op, op_args = (args[0], args[1:]) if func is hops.run_and_save_rng_state else (args[1], args[2:])
            result = out[1] if func is hops.run_and_save_rng_state else out
            self.counter._count_flops(op._overloadpacket, result, op_args, kwargs or {})
            return out
        return super().__torch_dispatch__(func, types, args, kwargs)


class _Counter(FlopCounterMode):
    """FlopCounterMode's totals ("Global"), without its module hooks (dynamo would trace them into compiled code),
    and with the mode above."""

    def __enter__(self):
        self.flop_counts.clear()
        self.mode = _CompiledToo(self)
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        mode, self.mode = self.mode, None
        return mode.__exit__(*exc)


def counting_flops() -> FlopCounterMode:
    """A FlopCounterMode that also counts CPU attention and grouped matmuls, and compiled code; `.get_total_flops()`
    after."""
    return _Counter(display=False, custom_mapping=MISSING)


_REGISTRY = counting_flops().flop_registry


def op_flops(func, args, kwargs, out) -> int:
    """The FLOPs the counter above counts for one call of `func`."""
    formula = _REGISTRY.get(getattr(func, "overloadpacket", None))
    return int(formula(*args, **(kwargs or {}), out_val=out)) if formula else 0
