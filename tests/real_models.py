"""Tiny random-weight models of real architectures, built the way their users
build them (transformers, diffusers, peft, plain torch), nothing downloaded.
Each builder returns (model, batch, loss_fn). Dropout is on everywhere."""

import torch
from torch import nn

V, T, B = 96, 16, 2  # a benchmark may raise B (even) before building, for activations that outweigh weights


def _ids(seed=1):
    return torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _causal_lm(model, mask):
    def loss_fn(m, batch):
        kwargs = {"attention_mask": torch.ones_like(batch)} if mask else {}
        return m(input_ids=batch, labels=batch, **kwargs).loss

    return model, _ids(), loss_fn


def _decoder_config(cls, **kw):
    return cls(
        **{
            **dict(
                vocab_size=V,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
                pad_token_id=0,
                bos_token_id=0,
                eos_token_id=0,
                attention_dropout=0.1,
            ),
            **kw,
        }
    )


def llama(mask=True):
    import transformers as tf

    return _causal_lm(tf.LlamaForCausalLM(_decoder_config(tf.LlamaConfig)), mask)


def gpt_neox():
    """A decoder LM called without attention_mask (transformers then takes
    another mask path on fake tensors)."""
    import transformers as tf

    cfg = tf.GPTNeoXConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
        hidden_dropout=0.1,
        attention_dropout=0.1,
    )
    return _causal_lm(tf.GPTNeoXForCausalLM(cfg), mask=False)


def lora_llama():
    import peft
    import transformers as tf

    model = tf.LlamaForCausalLM(_decoder_config(tf.LlamaConfig))
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1))
    return _causal_lm(model, mask=False)


def t5():
    import transformers as tf

    cfg = tf.T5Config(
        vocab_size=V,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=3,
        num_decoder_layers=3,
        num_heads=4,
        dropout_rate=0.1,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return tf.T5ForConditionalGeneration(cfg), _ids(), lambda m, b: m(input_ids=b, labels=b).loss


def mixtral():
    """MoE with the eager expert loop (`nonzero`: a data-dependent shape)."""
    import transformers as tf

    model = tf.MixtralForCausalLM(_decoder_config(tf.MixtralConfig, num_local_experts=4, num_experts_per_tok=2))
    model.set_experts_implementation("eager")
    return _causal_lm(model, mask=True)


def wav2vec2():
    """A speech model with LayerDrop and every dropout on."""
    import transformers as tf

    cfg = tf.Wav2Vec2Config(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        conv_dim=(16, 16),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=4,
        layerdrop=0.2,
        hidden_dropout=0.1,
        activation_dropout=0.1,
        attention_dropout=0.1,
        feat_proj_dropout=0.1,
        mask_time_prob=0.0,
        pad_token_id=0,
        ctc_loss_reduction="mean",
    )
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(B, 1600, generator=g), torch.randint(1, V, (B, 5), generator=g))
    return tf.Wav2Vec2ForCTC(cfg), batch, lambda m, b: m(input_values=b[0], labels=b[1]).loss


def unet():
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        cross_attention_dim=32,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=16,
    )
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(B, 4, 16, 16, generator=g), torch.randn(B, 8, 32, generator=g))

    def loss_fn(m, b):
        return m(b[0], torch.tensor([10, 500]).repeat(len(b[0]) // 2), encoder_hidden_states=b[1]).sample.pow(2).mean()

    return model, batch, loss_fn


class LayerDropEncoder(nn.Module):
    """A plain-torch encoder with LayerDrop written the usual way."""

    def __init__(self, n_layers=6, width=32, p=0.2):
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.1, batch_first=True) for _ in range(n_layers)]
        )
        self.head = nn.Linear(width, 10)
        self.p = p

    def forward(self, x):  # x: (batch, time, width)
        for layer in self.layers:
            if self.training and torch.rand([]) < self.p:
                continue
            x = layer(x)
        return self.head(x.mean(1))


def layerdrop_encoder():
    x = torch.randn(4, 12, 32, generator=torch.Generator().manual_seed(1))
    return LayerDropEncoder(), x, lambda m, b: m(b).pow(2).mean()


def albert():
    """One layer group applied num_hidden_layers times: each call is a block (NOTE [blocks called several
    times]); transformers refuses gradient_checkpointing_enable() on it."""
    import transformers as tf

    cfg = tf.AlbertConfig(
        vocab_size=V,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    return tf.AlbertForMaskedLM(cfg), _ids(), lambda m, b: m(input_ids=b, labels=b).loss


BUILDERS = {
    "llama (attention_mask)": llama,
    "gpt-neox (no attention_mask)": gpt_neox,
    "peft LoRA llama": lora_llama,
    "t5 (encoder-decoder)": t5,
    "mixtral (MoE, eager experts)": mixtral,
    "wav2vec2 (LayerDrop)": wav2vec2,
    "diffusers UNet2DConditionModel": unet,
    "plain-torch LayerDrop": layerdrop_encoder,
    "albert (one layer group called 4 times)": albert,
}


def dit():
    """A diffusion transformer (class-conditional DiT)."""
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        num_layers=3,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=8,
        dropout=0.1,
    )
    g = torch.Generator().manual_seed(1)
    batch = torch.randn(B, 4, 8, 8, generator=g)

    def loss_fn(m, b):
        return m(b, timestep=torch.tensor([10, 500]), class_labels=torch.tensor([1, 3])).sample.pow(2).mean()

    return model, batch, loss_fn


def sd3():
    """SD3's MMDiT, whose blocks take their inputs by keyword (no segments)."""
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
        pos_embed_max_size=16,
    )
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 6, 16, generator=g), torch.randn(B, 8, generator=g))

    def loss_fn(m, b):
        return (
            m(b[0], encoder_hidden_states=b[1], pooled_projections=b[2], timestep=torch.tensor([10, 500]))
            .sample.pow(2)
            .mean()
        )

    return model, batch, loss_fn


MORE = {"diffusers DiT": dit, "diffusers SD3 transformer (keyword blocks)": sd3}  # the benchmark runs these too


def clip():
    """Two towers: a text and a vision transformer, trained with the contrastive loss."""
    import transformers as tf

    tower = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        dropout=0.1,
        attention_dropout=0.1,
    )
    cfg = tf.CLIPConfig(
        text_config=dict(vocab_size=V, max_position_embeddings=T, bos_token_id=1, eos_token_id=2, **tower),
        vision_config=dict(image_size=16, patch_size=4, **tower),
        projection_dim=16,
    )
    g = torch.Generator().manual_seed(1)
    batch = (torch.randint(3, V, (B, T), generator=g), torch.randn(B, 3, 16, 16, generator=g))
    return tf.CLIPModel(cfg), batch, lambda m, b: m(input_ids=b[0], pixel_values=b[1], return_loss=True).loss


def whisper():
    """Speech encoder-decoder: mel features in, tokens out."""
    import transformers as tf

    cfg = tf.WhisperConfig(
        vocab_size=V,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=16,
        max_source_positions=16,
        max_target_positions=T,
        pad_token_id=0,
        decoder_start_token_id=1,
        dropout=0.1,
        attention_dropout=0.1,
    )
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(B, 16, 32, generator=g), torch.randint(3, V, (B, 8), generator=g))
    return tf.WhisperForConditionalGeneration(cfg), batch, lambda m, b: m(input_features=b[0], labels=b[1]).loss


def swin():
    """A hierarchical vision transformer: stages of windowed-attention blocks."""
    import transformers as tf

    cfg = tf.SwinConfig(
        image_size=32,
        patch_size=4,
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 2],
        window_size=4,
        num_labels=4,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        drop_path_rate=0.1,
    )
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(B, 3, 32, 32, generator=g), torch.tensor([1, 3]).repeat(B // 2))
    return tf.SwinForImageClassification(cfg), batch, lambda m, b: m(pixel_values=b[0], labels=b[1]).loss


def convnext():
    """A hierarchical convnet: four stages of ConvNeXt blocks with stochastic depth."""
    import transformers as tf

    cfg = tf.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[2, 2, 2, 2], num_labels=4, drop_path_rate=0.1)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(B, 3, 32, 32, generator=g), torch.tensor([1, 3]).repeat(B // 2))
    return tf.ConvNextForImageClassification(cfg), batch, lambda m, b: m(pixel_values=b[0], labels=b[1]).loss


class UNet(nn.Module):
    """A U-Net written the way people write one: a down path whose outputs
    are kept for the up path, and skip concatenations."""

    def __init__(self, c=8, depth=3):
        super().__init__()

        def conv(i, o):
            return nn.Sequential(
                nn.Conv2d(i, o, 3, padding=1),
                nn.BatchNorm2d(o),
                nn.ReLU(),
                nn.Conv2d(o, o, 3, padding=1),
                nn.BatchNorm2d(o),
                nn.ReLU(),
            )

        widths = [c * 2**k for k in range(depth + 1)]
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.down = nn.ModuleList([conv(widths[k], widths[k + 1]) for k in range(depth)])
        self.up = nn.ModuleList([conv(widths[k + 1] + widths[k + 1], widths[k]) for k in reversed(range(depth))])
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Conv2d(c, 1, 1)

    def forward(self, x):
        x, skips = self.stem(x), []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        for block in self.up:
            x = nn.functional.interpolate(x, scale_factor=2)
            x = block(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)


def plain_unet():
    g = torch.Generator().manual_seed(1)
    return UNet(), torch.randn(B, 3, 32, 32, generator=g), lambda m, b: m(b).pow(2).mean()


STACKS = {
    "diffusers UNet2DConditionModel": unet,
    "CLIP (two towers)": clip,
    "t5 (encoder-decoder)": t5,
    "Whisper (encoder-decoder)": whisper,
    "Swin (stages)": swin,
    "ConvNeXt (stages)": convnext,
    "plain-torch U-Net (skip concatenations)": plain_unet,
}


def needs(name: str) -> tuple:
    """The extras a builder imports: the tests skip that model alone when one is missing, never the plain-torch
    ones."""
    if name.startswith("plain-torch"):
        return ()
    if name.startswith("diffusers"):
        return ("diffusers",)
    return ("transformers", "peft") if "peft" in name else ("transformers",)
