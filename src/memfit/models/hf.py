"""Hugging Face transformers models from small configs with random weights
(no downloads): `--model hf:gpt2`, `hf:llama`, `hf:bert`. Needs the `hf`
extra (`pip install memfit[hf]`).

Batches are random token ids; the loss is the model's own (causal LM for
gpt2 and llama, masked LM for bert, with every token as its own label).
"""

from __future__ import annotations

import torch

from memfit.errors import MemfitError

KINDS = ("gpt2", "llama", "bert")
# layers, width, heads, sequence length, vocabulary
SIZES = {"tiny": (4, 64, 4, 32, 128), "small": (6, 256, 4, 128, 1024), "base": (12, 768, 12, 512, 32000)}


def create(kind: str, size: str = "tiny"):
    try:
        import transformers as tf
    except ImportError:
        raise MemfitError(
            'hf: models need transformers; install memfit with `pip install torch==2.13.0 -e ".[hf]"`.'
        ) from None
    tf.logging.set_verbosity_error()  # small random configs trip warnings about real checkpoints' token ids
    layers, width, heads, seq, vocab = SIZES[size]
    if kind == "gpt2":
        cfg = tf.GPT2Config(
            n_layer=layers,
            n_embd=width,
            n_head=heads,
            n_positions=seq,
            vocab_size=vocab,
            bos_token_id=0,
            eos_token_id=0,
        )
        return tf.GPT2LMHeadModel(cfg), seq, vocab
    if kind == "llama":
        cfg = tf.LlamaConfig(
            num_hidden_layers=layers,
            hidden_size=width,
            intermediate_size=width * 2,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=seq,
            vocab_size=vocab,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        return tf.LlamaForCausalLM(cfg), seq, vocab
    if kind == "bert":
        cfg = tf.BertConfig(
            num_hidden_layers=layers,
            hidden_size=width,
            intermediate_size=width * 4,
            num_attention_heads=heads,
            max_position_embeddings=seq,
            vocab_size=vocab,
        )
        return tf.BertForMaskedLM(cfg), seq, vocab
    raise MemfitError(f"unknown Hugging Face model hf:{kind}; use hf:gpt2, hf:llama or hf:bert.")


def loss_fn(model, batch):
    return model(input_ids=batch, labels=batch).loss


def build(kind: str, size: str = "tiny", batch_size: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    model, seq, vocab = create(kind, size)
    g = torch.Generator().manual_seed(seed + 1)
    return model, torch.randint(vocab, (batch_size, seq), generator=g), loss_fn
