"""Fine-tune a (tiny, random-weight) GPT-2 with the Hugging Face Trainer, in 60% of its memory."""
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from memfit.integrations.transformers import MemfitCallback

model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=128, n_head=4, n_positions=128, vocab_size=512))
tokens = torch.randint(0, 512, (64, 128))
train_dataset = [{"input_ids": t, "labels": t} for t in tokens]

args = TrainingArguments(output_dir="out", per_device_train_batch_size=8, max_steps=4, logging_steps=2,
                         log_level="info", report_to=[], save_strategy="no", use_cpu=True)
trainer = Trainer(model=model, args=args, train_dataset=train_dataset, callbacks=[MemfitCallback(budget="60%")])
trainer.train()
