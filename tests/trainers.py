"""Tiny models trained with the trainers people use, with and without
memfit's callback, for tests/test_integrations.py. Also a script: under
torchrun each process trains without, then with, memfit and writes what it
saw to OUT.rankN.json.

    python -m torch.distributed.run --nproc-per-node 2 tests/trainers.py hf|lightning|lightning-fsdp OUT BUDGET
"""

import json
import sys
import warnings

import torch
from torch import nn

STEPS, BATCH, SEQ, VOCAB = 3, 8, 32, 96


def _tokens(n=4 * BATCH):
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(0))


# --- Hugging Face Trainer: a tiny GPT-2 fine-tuned with dropout on -------------------------------------


class TokenData(torch.utils.data.Dataset):
    def __init__(self):
        self.x = _tokens()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def weights(model) -> dict:
    """The trained weights (state_dict), detached copies: what the trainers' tests compare, bitwise, since some
    transformers versions round the logged losses to 4 digits."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


def digest(model) -> str:
    """A hash of this rank's trained weights (its shards, under FSDP): equal hashes, bitwise equal weights."""
    import hashlib

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.to_local() if hasattr(t, "to_local") else t
        h.update(name.encode() + t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def hf_run(
    callback=None, out_dir="/tmp/memfit-hf", gradient_checkpointing=False, steps=STEPS, accumulation=1, lora=False
):
    """(losses per step, trainer) of a tiny GPT-2 (dropout 0.1) trained for `steps`; `lora`: a peft LoRA
    adapter on its attention, the base weights frozen."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=4, n_head=2, bos_token_id=0, eos_token_id=0)
    )
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=BATCH // 2,
        max_steps=steps,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        gradient_accumulation_steps=accumulation,
        **({"gradient_checkpointing": True} if gradient_checkpointing else {}),
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(), callbacks=[callback] if callback else [])
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], trainer


# --- Lightning: a LightningModule with its own blocks, written the way people write them ----------------


def lightning_module(sharded=False):
    """The module; `sharded`: FSDP2 in `configure_model`, for ModelParallelStrategy."""
    import lightning.pytorch as pl

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
            self.drop = nn.Dropout(0.1)

        def forward(self, x):
            return x + self.drop(self.down(nn.functional.gelu(self.up(self.norm(x)))))

    class TinyLM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 32)
            self.blocks = nn.ModuleList(Block(32) for _ in range(4))
            self.head = nn.Linear(32, VOCAB)

        def forward(self, x):
            h = self.embed(x)
            for block in self.blocks:
                h = block(h)
            return self.head(h)

        def training_step(self, batch, batch_idx):
            (x,) = batch
            loss = nn.functional.cross_entropy(self(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class ShardedTinyLM(TinyLM):
        def configure_model(self):
            from memfit.integrations.lightning import fully_shard

            fully_shard(self, self.device_mesh["data_parallel"])

    return ShardedTinyLM() if sharded else TinyLM()


def lightning_run(callback=None, strategy="auto", devices=1, steps=STEPS):
    """(losses per step, trainer) of a tiny LightningModule (dropout 0.1) trained for `steps`."""
    import lightning.pytorch as pl

    losses = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    pl.seed_everything(0, verbose=False)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(_tokens()), batch_size=BATCH // devices)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Losses()] + ([callback] if callback else []),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(lightning_module(sharded=not isinstance(strategy, str)), data)
    return losses, trainer


# --- accelerate: a plain loop, memfit.apply before accelerator.prepare --------------------------------


def accelerate_run(budget=None, steps=STEPS):
    """(losses per step, model, plan) of the tiny GPT-2 trained in a plain accelerate loop."""
    from accelerate import Accelerator
    from transformers import GPT2Config, GPT2LMHeadModel

    import memfit

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=4, n_head=2, bos_token_id=0, eos_token_id=0)
    )
    tokens = _tokens()
    plan = None
    if budget is not None:
        first = {"input_ids": tokens[:BATCH], "labels": tokens[:BATCH]}
        plan = memfit.plan(model, first, lambda m, b: m(**b).loss, budget, cost="flops")
        memfit.apply(model, plan)
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    losses = []
    for step in range(steps):
        x = tokens[step * BATCH : (step + 1) * BATCH]
        loss = model(input_ids=x, labels=x).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, accelerator.unwrap_model(model), plan


def main(kind, out, budget):
    """One process of a torchrun: without memfit, then with it, in one process group."""
    import torch.distributed as dist

    from memfit.core.wrapping import wrapped_blocks

    if kind == "hf":
        from memfit.integrations.transformers import MemfitCallback

        run = lambda cb: hf_run(cb, out_dir=f"{out}.hf")  # noqa: E731
    else:
        from lightning.pytorch.strategies import ModelParallelStrategy

        from memfit.integrations.lightning import MemfitCallback

        def run(cb):  # a new strategy for each Trainer
            return lightning_run(
                cb, strategy=ModelParallelStrategy(2, 1) if kind == "lightning-fsdp" else "ddp", devices=2
            )

    plain, plain_trainer = run(None)
    callback = MemfitCallback(budget=budget, cost="flops")
    with_memfit, trainer = run(callback)
    model = getattr(trainer, "lightning_module", None) or trainer.model
    plain_model = getattr(plain_trainer, "lightning_module", None) or plain_trainer.model
    result = {
        "plain": plain,
        "memfit": with_memfit,
        "weights": [digest(plain_model), digest(model)],
        "plan": json.loads(callback.plan.to_json()),
        "peaks": callback.peaks,
        "wrapped": sorted((n, str(m)) for n, m in wrapped_blocks(model)),
        "report": callback.report,
    }
    rank = dist.get_rank() if dist.is_initialized() else 0
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(result, f)
    if dist.is_initialized():  # gloo can abort a process whose peer ends the group first
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
