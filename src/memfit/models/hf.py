"""Hugging Face transformers models from small configs with random weights
(no downloads): `--model hf:gpt2`, `hf:llama`, `hf:bert`; or any causal LM
from its `config.json` (`hf:PATH/config.json`), built on the meta device:
no weights, nothing downloaded, nothing allocated, for planning a model
too big for this machine. Needs the `hf` extra (`pip install memfit[hf]`).

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


def _transformers():
    try:
        import transformers as tf
    except ImportError:
        raise MemfitError(
            'hf: models need transformers; install memfit with `pip install torch==2.13.0 -e ".[hf]"`.'
        ) from None
    tf.logging.set_verbosity_error()
    return tf


def from_config(path: str, batch_size: int = 1, seq_len: int | None = None, seed: int = 0):
    """A causal LM from a transformers `config.json` (or a directory holding one), on the meta device (NOTE
    [one rank simulated] in memfit.planning.sharding), with a real batch of `batch_size` random sequences of
    `seq_len` tokens (default: the config's context, at most 2048)."""
    import os

    tf = _transformers()
    if not os.path.exists(path):
        raise MemfitError(f"no file {path!r}; give hf:PATH/config.json, a transformers config file.")
    try:
        cfg = tf.AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise MemfitError(f"cannot read {path} as a transformers config ({e}); give a model's config.json.") from None
    seq = seq_len or min(getattr(cfg, "max_position_embeddings", 2048), 2048)
    with torch.device("meta"):  # fp32 whatever the config's torch_dtype: the dtype is the caller's choice
        model = tf.AutoModelForCausalLM.from_config(cfg).float()
    g = torch.Generator().manual_seed(seed + 1)
    return model, torch.randint(cfg.vocab_size, (batch_size, seq), generator=g), loss_fn


def tensor_parallel(model, mesh):
    """Tensor parallelism over the 1-D `mesh` for Llama-style decoders (Llama, Mistral, Qwen2), as torchtitan
    writes it for Llama: in each layer, the query, key, value, gate and up projections split by columns, the
    output and down projections by rows; embeddings, norms and the head replicated."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {
        **{f"self_attn.{p}_proj": ColwiseParallel() for p in "qkv"},
        "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }
    for layer in model.model.layers:
        parallelize_module(layer, mesh, plan)
    return model
