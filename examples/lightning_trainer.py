"""Train a small LightningModule in 60% of its memory."""
import lightning.pytorch as pl
import torch
from torch import nn

from memfit.integrations.lightning import MemfitCallback


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.up, self.down, self.drop = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d), nn.Dropout(0.1)

    def forward(self, x):
        return x + self.drop(self.down(nn.functional.gelu(self.up(self.norm(x)))))


class TinyLM(pl.LightningModule):
    def __init__(self, vocab=512, d=128, layers=6):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, d), nn.Linear(d, vocab)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss = nn.functional.cross_entropy(self(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randint(0, 512, (64, 128))), batch_size=8)
trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                     callbacks=[MemfitCallback(budget="60%")])
trainer.fit(TinyLM(), data)
print({name: f"{value.item():.4f} GB" for name, value in trainer.callback_metrics.items() if name.startswith("memory/")})
