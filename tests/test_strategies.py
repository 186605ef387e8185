"""memfit.core.strategies: the units each strategy string means, and what each policy keeps."""

import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy, SelectiveCheckpointContext

from memfit import MemfitError
from memfit.core.strategies import KEEP, RECOMPUTE, SELECTIVE, Mode, Unit, check, policy, units_of

aten = torch.ops.aten


def spans(units):
    return [(u.start, u.stop, u.mode) for u in units]


def test_each_strategy_over_one_chain():
    assert spans(units_of("none", 4)) == [(0, 4, KEEP)]
    assert spans(units_of("blocks", 3)) == [(0, 1, RECOMPUTE), (1, 2, RECOMPUTE), (2, 3, RECOMPUTE)]
    assert [u.mode for u in units_of("every:3", 7)] == [RECOMPUTE, KEEP, KEEP] * 2 + [RECOMPUTE]
    assert [(u.start, u.stop) for u in units_of("segments:3", 7)] == [(0, 3), (3, 5), (5, 7)]
    assert [(u.start, u.stop) for u in units_of("sqrt", 12)] == [(0, 4), (4, 8), (8, 12)]
    assert spans(units_of("Selective", 2)) == [(0, 1, SELECTIVE), (1, 2, SELECTIVE)]


def test_a_strategy_applies_to_each_chain_alone():
    """Segments never cross from one chain into the next; every:K restarts in each chain."""
    assert [(u.start, u.stop) for u in units_of("segments:2", [3, 5])] == [(0, 2), (2, 3), (3, 6), (6, 8)]
    assert [u.start for u in units_of("every:2", [3, 3]) if u.mode == RECOMPUTE] == [0, 2, 3, 5]
    assert [(u.start, u.stop) for u in units_of("segments:3", [2, 6])] == [(0, 1), (1, 2), (2, 4), (4, 6), (6, 8)]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("every:0", "positive integer"),
        ("segments:-1", "positive integer"),
        ("every:x", "positive integer"),
        ("every:02", "positive integer"),
        ("sqrt:2", "takes no argument"),
        ("checkpoint-all", "unknown strategy"),
    ],
)
def test_bad_strategy_strings(bad, message):
    with pytest.raises(MemfitError, match=message):
        check(bad)


def test_more_segments_than_blocks_is_refused():
    with pytest.raises(MemfitError, match="more segments than the 7 blocks"):
        units_of("segments:9", [7, 3])
    assert Unit(0, 1, KEEP) == units_of("none", 1)[0]


def test_what_each_policy_keeps():
    q, k = torch.empty(8, 16, 4), torch.empty(8, 4, 16)  # q @ k^T: 16 x 16 scores from 16 x 4 inputs
    scores, v = torch.empty(8, 16, 16), torch.empty(8, 16, 4)  # scores @ v: smaller than its inputs
    save = CheckpointPolicy.MUST_SAVE
    forward = SelectiveCheckpointContext(is_recompute=False)
    kept = {
        name: [
            policy(Mode.parse(name))()(forward, op, *args) == save
            for op, args in (
                (aten.mm.default, ()),
                (aten.bmm.default, (q, k)),
                (aten.bmm.default, (scores, v)),
                (aten.gelu.default, ()),
            )
        ]
        for name in ("selective", "scores", "pointwise")
    }
    #                     linear  q @ k^T  scores @ v  gelu
    assert kept == {
        "selective": [True, False, False, False],
        "scores": [True, False, True, False],
        "pointwise": [True, True, True, False],
    }


def _two_dropouts(x):
    a, _ = torch.native_dropout(x.sin(), 0.5, True)  # ops 0 (sin), 1 (native_dropout)
    b, _ = torch.native_dropout(a.cos(), 0.5, True)  # ops 2, 3
    return (b * 2).sum()


@pytest.mark.parametrize(
    "mode", ["ops:native_dropout@1", "ops:sin@0,native_dropout@1", "ops:native_dropout@3", "ops:sin@0,cos@2"]
)
def test_op_level_modes_give_the_plain_gradients_with_random_ops(mode):
    """NOTE [random ops]: saving the first dropout and recomputing the second
    would draw the second mask from the first one's numbers; memfit saves the
    second too, and the gradient is the plain one, bitwise."""
    from memfit.core.checkpointing import run

    x = torch.randn(64, requires_grad=True)
    torch.manual_seed(3)
    (plain,) = torch.autograd.grad(_two_dropouts(x), x)
    torch.manual_seed(3)
    (got,) = torch.autograd.grad(run(_two_dropouts, (x,), {}, policy=policy(Mode.parse(mode))), x)
    assert torch.equal(plain, got)


def test_a_mode_is_a_value_printed_as_memfit_reads_it():
    from memfit.core.strategies import Kind

    mode = Mode.of_ops({12: "gelu", 3: "mm", 7: "add.Tensor"})
    assert str(mode) == "ops:mm@3,add.Tensor@7,gelu@12" and str(mode.lazy()) == "lazy:mm@3,add.Tensor@7,gelu@12"
    assert mode.saved_ops == {12: "gelu", 3: "mm", 7: "add.Tensor"} and mode.kind is Kind.OPS
    for text in ("keep", "recompute", "selective", "scores", "pointwise", "offload", str(mode), str(mode.lazy())):
        assert str(Mode.parse(text)) == text and Mode.parse(Mode.parse(text)) == Mode.parse(text)
    assert Mode.parse("selective") is not SELECTIVE and Mode.parse("selective") == SELECTIVE
    assert Mode.parse("lazy:mm@3") == Mode.of_ops({3: "mm"}, on_demand=True) != Mode.parse("ops:mm@3")
    assert len({Mode.parse("ops:mm@3"), Mode.of_ops({3: "mm"}), SELECTIVE, Mode.parse("selective")}) == 2
    for bad in ("ops:", "ops:mm", "ops:3", "ops:mm@a", "ops", "lazy", "blocks", "Keep", "keep:1", ""):
        with pytest.raises(ValueError, match="is not a mode"):
            Mode.parse(bad)
    with pytest.raises(ValueError):
        Mode(Kind.KEEP, ((0, "mm"),))
    assert Unit(0, 1, "ops:mm@3").mode == Mode.of_ops({3: "mm"})  # a Unit reads a mode's printed form


def test_attention_draws_random_numbers_only_with_dropout():
    from memfit.core.strategies import draws_random

    q = torch.empty(1, 2, 4, 8)
    flash = aten._scaled_dot_product_flash_attention_for_cpu.default
    assert draws_random(flash, (q, q, q, 0.1), {}) and not draws_random(flash, (q, q, q), {})
    assert not draws_random(flash, (q, q, q), {"dropout_p": 0.0})
    assert draws_random(aten.native_dropout.default, (q, 0.5, True), {})
    assert not draws_random(aten.mm.default, (), {})
