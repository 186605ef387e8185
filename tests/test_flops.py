"""memfit.core.flops: the counter counts what torch's own counter leaves out, as the same work written plainly."""

import torch
import torch.nn.functional as F

from memfit.core.flops import counting_flops


def count(fn, *args) -> int:
    with counting_flops() as c:
        fn(*args)
    return c.get_total_flops()


def test_cpu_attention_counts_as_its_two_matmuls():
    """torch has no formula for the CPU flash kernel: without memfit's, attention counts as free on CPU."""
    q, k, v = (torch.randn(2, 3, 16, 8) for _ in range(3))
    plain = count(lambda: torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v)
    assert plain > 0 and count(F.scaled_dot_product_attention, q, k, v) == plain
    q.requires_grad_()
    with counting_flops() as c:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    assert c.get_total_flops() > 2 * plain  # the backward recomputes the scores, then two matmuls per input


def test_grouped_matmuls_count_as_the_matmuls_they_group():
    a, b = torch.randn(2, 8, 16, dtype=torch.bfloat16), torch.randn(2, 16, 24, dtype=torch.bfloat16)
    assert count(torch._grouped_mm, a, b) == count(torch.bmm, a, b) > 0
    tokens, experts = torch.randn(32, 16, dtype=torch.bfloat16), torch.randn(3, 16, 24, dtype=torch.bfloat16)
    offs = torch.tensor([8, 16, 32], dtype=torch.int32)  # 3 experts' tokens: 8, 8 and 16
    per_expert = sum(
        count(torch.mm, tokens[lo:hi], experts[g]) for g, (lo, hi) in enumerate([(0, 8), (8, 16), (16, 32)])
    )
    assert count(lambda: torch._grouped_mm(tokens, experts, offs=offs)) == per_expert
