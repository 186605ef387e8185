"""Models with several stacks (tests/real_models.py STACKS): memfit finds every
chain of blocks, checkpoints them all with the plain gradients, saves at least
what the model's own gradient checkpointing saves, and plans one budget
across all of them (issue: every stack of a model)."""

import copy
import warnings

import pytest
import torch
from real_models import STACKS, needs

import memfit
from memfit.core.blocks import find_chains
from memfit.core.memory import track_memory
from memfit.planning.profiling import CoverageWarning, coverage

CHAINS = {  # the containers of the chains found, in model order
    # the upsampler is a lone composite block beside the resnets' container (NOTE [discovery])
    "diffusers UNet2DConditionModel": [
        "down_blocks.0.attentions",
        "down_blocks.0.resnets",
        "down_blocks.1.resnets",
        "up_blocks.0.resnets",
        "up_blocks.0.upsamplers",
        "up_blocks.1.attentions",
        "up_blocks.1.resnets",
        "mid_block.attentions",
        "mid_block.resnets",
    ],
    "CLIP (two towers)": ["text_model.encoder.layers", "vision_model.encoder.layers"],
    "t5 (encoder-decoder)": ["encoder.block", "decoder.block"],
    "Whisper (encoder-decoder)": ["model.encoder.layers", "model.decoder.layers"],
    "Swin (stages)": ["swin.encoder.layers.0.blocks", "swin.encoder.layers.1.blocks"],
    "ConvNeXt (stages)": [f"convnext.encoder.stages.{k}.layers" for k in range(4)],
    # the same block in sibling containers forms one chain, as a ResNet's layer1..layer4 do
    "plain-torch U-Net (skip concatenations)": ["down+up"],
}


@pytest.fixture(scope="module", params=list(STACKS))
def built(request):
    for extra in needs(request.param):
        pytest.importorskip(extra)
    torch.manual_seed(0)
    return request.param, *STACKS[request.param]()


def test_every_stack_is_found(built):
    name, model, _, _ = built
    found = ["+".join(dict.fromkeys(n.rpartition(".")[0] for n, _ in chain)) for chain in find_chains(model)]
    assert found == CHAINS[name]


def step(model, batch, loss_fn, how):
    """A warm-up step, then a measured one: (peak bytes, loss, gradients, buffers)."""
    m = copy.deepcopy(model).train()
    if how == "own":
        if hasattr(m, "enable_gradient_checkpointing"):
            m.enable_gradient_checkpointing()
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:  # "none" for the plain step: the KV cache off, as in every run here (NOTE [no KV cache])
        memfit.apply(m, how or "none")
    opt = torch.optim.AdamW(m.parameters())
    torch.manual_seed(0)
    loss_fn(m, batch).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with track_memory(m, opt, batch) as mem:
        loss = loss_fn(m, batch)
        loss.backward()
        opt.step()  # AdamW leaves the gradients as they are
    grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    return mem.peak_bytes, loss.detach(), grads, list(m.buffers())


def same(a, b):
    return (
        torch.equal(a[1], b[1])
        and a[2].keys() == b[2].keys()
        and all(torch.equal(a[2][n], b[2][n]) for n in a[2])
        and all(torch.equal(x, y) for x, y in zip(a[3], b[3]))
    )


def test_blocks_saves_what_the_models_own_checkpointing_saves_with_the_plain_gradients(built):
    name, model, batch, loss_fn = built
    plain, blocks = step(model, batch, loss_fn, None), step(model, batch, loss_fn, "blocks")
    assert same(plain, blocks), name
    assert blocks[0] < plain[0]
    if hasattr(model, "enable_gradient_checkpointing") or getattr(model, "supports_gradient_checkpointing", False):
        assert blocks[0] <= step(model, batch, loss_fn, "own")[0], name


def test_one_plan_across_every_stack_fits_and_predicts_the_peak(built):
    name, model, batch, loss_fn = built
    plain, blocks = step(model, batch, loss_fn, None)[0], step(model, batch, loss_fn, "blocks")[0]
    budget = (plain + blocks) // 2
    plan = memfit.plan(model, batch, loss_fn, budget, cost="flops")
    chains = {n.rpartition(".")[0] for n, _ in memfit.find_blocks(model)}
    assert {b.name.rpartition(".")[0] for b in plan.blocks} == chains  # one plan over every chain
    measured = step(model, batch, loss_fn, plan)
    assert plan.predicted_peak_bytes <= budget and measured[0] <= budget * 1.01, name
    assert abs(plan.predicted_peak_bytes / measured[0] - 1) <= 0.01, name
    assert same(step(model, batch, loss_fn, None), measured), name
    fresh = STACKS[name]()[0]  # the plan, as JSON, applies to a fresh model of the same shape
    memfit.apply(fresh, memfit.Plan.from_json(plan.to_json()))
    assert memfit.wrapped_blocks(fresh) == memfit.wrapped_blocks(memfit.apply(copy.deepcopy(model), plan))


def test_coverage_says_when_blocks_leave_out_most_of_the_model():
    pytest.importorskip("transformers")
    model, batch, loss_fn = STACKS["CLIP (two towers)"]()
    everything = coverage(model, batch, loss_fn)
    one_tower = coverage(model, batch, loss_fn, blocks="text_model.encoder.layers")
    assert everything > 0.9 and one_tower < 0.5
    with pytest.warns(CoverageWarning, match="inside the blocks"):
        plan = memfit.plan(model, batch, loss_fn, "95%", blocks="text_model.encoder.layers", cost="flops")
    assert plan.coverage == one_tower and "coverage: " in str(plan)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CoverageWarning)
        assert memfit.plan(model, batch, loss_fn, "95%", cost="flops").coverage == everything


def test_the_kv_cache_is_off_while_applied_and_on_again_after():
    pytest.importorskip("transformers")
    model = STACKS["t5 (encoder-decoder)"]()[0]
    configs = [model.config, model.decoder.config]
    assert [c.use_cache for c in configs] == [True, True]
    memfit.apply(model, "blocks")
    assert [c.use_cache for c in configs] == [False, False]
    memfit.remove(model)
    assert [c.use_cache for c in configs] == [True, True]
