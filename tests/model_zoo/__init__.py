"""The model zoo: architectures built as their users build them, for tests/test_zoo.py and scripts/coverage.py.

Hugging Face models come from their `XConfig` with the library's defaults (attention implementation, dropout,
activations, drop-path, ...); only size fields are shrunk (layers, widths, heads, vocabulary, image and audio
sizes, and token ids that must fit the smaller vocabulary) so that every model is tiny. torch.nn building blocks
are wrapped in the smallest model that gives them a loss. Every entry is seeded: `ZOO[name].build()` returns the
same weights each time, `ZOO[name].batch()` the same batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import pockengine as pe

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB, SEQ, BATCH = 64, 8, 2
CE, LM = pe.losses.cross_entropy(), pe.losses.causal_lm()


@dataclass(frozen=True)
class Entry:
    family: str  # encoder, decoder, encoder part, vision, audio, torch.nn
    make: Callable[[], nn.Module]
    make_batch: Callable[[torch.Generator], tuple]
    loss: Callable

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        return self.make()

    def batch(self) -> tuple:
        return self.make_batch(torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------ batches
def text_classification(classes: int = 3) -> Callable[[torch.Generator], tuple]:
    """Token ids with an attention mask; the second sequence is padded, so the mask is on the gradient path."""

    def make(g: torch.Generator) -> tuple:
        ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        mask[1, SEQ - 3:] = 0
        return {"input_ids": ids, "attention_mask": mask}, torch.randint(0, classes, (BATCH,), generator=g)

    return make


def tokens(g: torch.Generator) -> tuple:
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
    return {"input_ids": ids}, ids


def images(size: int, classes: int = 3, channels: int = 3, key: str | None = "pixel_values"
           ) -> Callable[[torch.Generator], tuple]:
    def make(g: torch.Generator) -> tuple:
        x = torch.randn(BATCH, channels, size, size, generator=g)
        return ({key: x} if key else (x,)), torch.randint(0, classes, (BATCH,), generator=g)

    return make


def features(key: str, shape: tuple[int, ...], classes: int = 3) -> Callable[[torch.Generator], tuple]:
    """A float input of `shape` (batch first) under keyword `key` (audio features, raw audio)."""
    return lambda g: ({key: torch.randn(BATCH, *shape, generator=g)}, torch.randint(0, classes, (BATCH,), generator=g))


def last_hidden_state_mse(output: Any, target: torch.Tensor) -> torch.Tensor:
    """A regression loss on the mean of the encoder's last hidden state (an encoder used as a feature extractor)."""
    return F.mse_loss(output.last_hidden_state.mean(dim=1), target)


def hidden_targets(dim: int, make: Callable[[torch.Generator], tuple]) -> Callable[[torch.Generator], tuple]:
    def with_target(g: torch.Generator) -> tuple:
        return make(g)[0], torch.randn(BATCH, dim, generator=g)

    return with_target


# ------------------------------------------------------------------------------------------------ Hugging Face
def _hf(config: str, model: str, **sizes: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import transformers

        return getattr(transformers, model)(getattr(transformers, config)(**sizes))

    return make


def _hf_part(config: str, model: str, part: Callable[[nn.Module], nn.Module], **sizes: Any
             ) -> Callable[[], nn.Module]:
    whole = _hf(config, model, **sizes)
    return lambda: part(whole())


# width 16, 2 heads of 8, 2 layers, MLP 32; a vocabulary of 64; positions for 32 tokens
TEXT = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=32)
DECODER = dict(TEXT, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ENCODER = dict(TEXT, num_labels=3, pad_token_id=0)

ZOO: dict[str, Entry] = {}


def _add(family: str, name: str, make: Callable[[], nn.Module], batch: Callable, loss: Callable) -> None:
    ZOO[name] = Entry(family, make, batch, loss)


for name, config, model, extra in [
    ("bert", "BertConfig", "BertForSequenceClassification", {}),
    ("roberta", "RobertaConfig", "RobertaForSequenceClassification", {"pad_token_id": 1}),
    ("deberta-v2", "DebertaV2Config", "DebertaV2ForSequenceClassification", {}),
    ("albert", "AlbertConfig", "AlbertForSequenceClassification", {"embedding_size": 8}),
    ("electra", "ElectraConfig", "ElectraForSequenceClassification", {"embedding_size": 8}),
    ("modernbert", "ModernBertConfig", "ModernBertForSequenceClassification", {"global_attn_every_n_layers": 2}),
    ("xlm-roberta", "XLMRobertaConfig", "XLMRobertaForSequenceClassification", {"pad_token_id": 1}),
    ("mpnet", "MPNetConfig", "MPNetForSequenceClassification", {"pad_token_id": 1}),
    ("distilbert", "DistilBertConfig", "DistilBertForSequenceClassification",
     dict(dim=16, n_layers=2, n_heads=2, hidden_dim=32)),
    ("convbert", "ConvBertConfig", "ConvBertForSequenceClassification", {"embedding_size": 16}),
    # its quantization stubs `assert` on activations in train mode, after dropout: a branch on a random value, refused
    # by name (capture/value_branches.py); eval mode passes
    ("ibert", "IBertConfig", "IBertForSequenceClassification", {}),
    # checks its lengths with `assert lengths.max().item() <= slen`
    ("xlm", "XLMConfig", "XLMForSequenceClassification", dict(emb_dim=16, n_layers=2, n_heads=2)),
    ("fnet", "FNetConfig", "FNetForSequenceClassification", {}),  # mixes tokens with complex Fourier transforms
    ("deberta", "DebertaConfig", "DebertaForSequenceClassification", {}),  # v1: relative attention, its own layer norm
    # attention and feed-forward as grouped 1x1 convolutions over (batch, channels, sequence)
    ("squeezebert", "SqueezeBertConfig", "SqueezeBertForSequenceClassification", {"embedding_size": 16}),
    ("roformer", "RoFormerConfig", "RoFormerForSequenceClassification", {}),  # rotary positions in an encoder
]:
    _add("encoder", name, _hf(config, model, **{**ENCODER, **extra}), text_classification(), CE)

for name, config, model, sizes in [
    ("gpt2", "GPT2Config", "GPT2LMHeadModel",
     dict(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=2)),
    ("gpt-neo", "GPTNeoConfig", "GPTNeoForCausalLM",
     dict(vocab_size=VOCAB, hidden_size=16, num_layers=2, num_heads=2, attention_types=[[["global", "local"], 1]],
          max_position_embeddings=32, window_size=4, bos_token_id=1, eos_token_id=2)),
    ("gpt-neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", DECODER),
    ("bloom", "BloomConfig", "BloomForCausalLM",
     dict(vocab_size=VOCAB, hidden_size=16, n_layer=2, n_head=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    ("opt", "OPTConfig", "OPTForCausalLM", dict(DECODER, ffn_dim=32, word_embed_proj_dim=16)),
    ("llama", "LlamaConfig", "LlamaForCausalLM", dict(DECODER, num_key_value_heads=1)),
    ("mistral", "MistralConfig", "MistralForCausalLM", dict(DECODER, num_key_value_heads=1, sliding_window=4)),
    ("mixtral", "MixtralConfig", "MixtralForCausalLM",
     dict(DECODER, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)),
    ("qwen2-moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
     dict(DECODER, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
          shared_expert_intermediate_size=32)),
    # experts stored transposed, with biases; its YaRN rope wants the default context length (no weights)
    ("gpt-oss", "GptOssConfig", "GptOssForCausalLM",
     dict(DECODER, num_key_value_heads=1, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
          max_position_embeddings=131072)),
    ("qwen2", "Qwen2Config", "Qwen2ForCausalLM", dict(DECODER, num_key_value_heads=1)),
    ("qwen3", "Qwen3Config", "Qwen3ForCausalLM", dict(DECODER, num_key_value_heads=1, head_dim=8)),
    ("gemma", "GemmaConfig", "GemmaForCausalLM", dict(DECODER, num_key_value_heads=1, head_dim=8)),
    ("gemma2", "Gemma2Config", "Gemma2ForCausalLM", dict(DECODER, num_key_value_heads=1, head_dim=8, sliding_window=4)),
    ("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM",
     dict(DECODER, num_key_value_heads=1, head_dim=8, sliding_window=4)),
    ("phi", "PhiConfig", "PhiForCausalLM", DECODER),
    ("phi3", "Phi3Config", "Phi3ForCausalLM", DECODER),
    ("falcon", "FalconConfig", "FalconForCausalLM",
     dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, pad_token_id=0,
          bos_token_id=1, eos_token_id=2)),
    ("olmo", "OlmoConfig", "OlmoForCausalLM", DECODER),
    ("stablelm", "StableLmConfig", "StableLmForCausalLM", dict(DECODER, num_key_value_heads=2)),
    ("starcoder2", "Starcoder2Config", "Starcoder2ForCausalLM", dict(DECODER, num_key_value_heads=1)),
    # state-space and recurrent models, in their PyTorch implementations (no mamba_ssm or CUDA kernels)
    ("mamba2", "Mamba2Config", "Mamba2ForCausalLM",
     dict(vocab_size=VOCAB, hidden_size=16, num_heads=4, head_dim=8, state_size=4, n_groups=1, num_hidden_layers=2,
          chunk_size=4, time_step_rank=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    ("rwkv", "RwkvConfig", "RwkvForCausalLM",
     dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, attention_hidden_size=16, intermediate_size=32,
          context_length=32, bos_token_id=1, eos_token_id=2)),
    ("mamba", "MambaConfig", "MambaForCausalLM",  # the selective scan, step by step
     dict(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2, time_step_rank=4,
          pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # Mamba and attention layers interleaved, mixture-of-experts feed-forwards every other layer
    ("jamba", "JambaConfig", "JambaForCausalLM",
     dict(DECODER, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, attn_layer_period=2,
          attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=4, mamba_dt_rank=4)),
    # the RG-LRU recurrence and a temporal convolution, with local attention in every third block
    ("recurrent-gemma", "RecurrentGemmaConfig", "RecurrentGemmaForCausalLM",
     dict(vocab_size=VOCAB, hidden_size=16, lru_width=16, num_hidden_layers=3, num_attention_heads=2,
          num_key_value_heads=1, head_dim=8, intermediate_size=32, attention_window_size=4, pad_token_id=0,
          bos_token_id=1, eos_token_id=2)),
    ("gptj", "GPTJConfig", "GPTJForCausalLM",  # interleaved rotary on part of each head, attention and MLP in parallel
     dict(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32, rotary_dim=4, bos_token_id=1,
          eos_token_id=2)),
    ("cohere", "CohereConfig", "CohereForCausalLM", dict(DECODER, num_key_value_heads=1)),  # bias-free layer norm
    # squared ReLU, layer norm with weight + 1, rotary on half of each head
    ("nemotron", "NemotronConfig", "NemotronForCausalLM", dict(DECODER, num_key_value_heads=1, head_dim=8)),
    ("olmoe", "OlmoeConfig", "OlmoeForCausalLM", dict(DECODER, num_experts=4, num_experts_per_tok=2)),
    # attention and feed-forward experts over rows sorted by expert and split at counts read out with `.tolist()`
    # (pockengine/capture/masked_rows.py)
    ("jetmoe", "JetMoeConfig", "JetMoeForCausalLM",
     dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8,
          intermediate_size=32, max_position_embeddings=32, num_local_experts=4, num_experts_per_tok=2,
          bos_token_id=1, eos_token_id=2)),
    ("mpt", "MptConfig", "MptForCausalLM",  # ALiBi position biases
     dict(vocab_size=VOCAB, d_model=16, n_heads=2, n_layers=2, expansion_ratio=2, max_seq_len=32, pad_token_id=0,
          bos_token_id=1, eos_token_id=2)),
    ("gpt-bigcode", "GPTBigCodeConfig", "GPTBigCodeForCausalLM",  # multi-query attention from one fused projection
     dict(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=2)),
    # multi-head latent attention (low-rank query and key-value projections), group-limited top-k expert routing
    ("deepseek-v3", "DeepseekV3Config", "DeepseekV3ForCausalLM",
     dict(DECODER, num_key_value_heads=2, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
          n_group=2, topk_group=1, first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4,
          v_head_dim=8, qk_nope_head_dim=4)),
]:
    _add("decoder", name, _hf(config, model, **sizes), tokens, LM)

# pools the sequence between blocks (mean pooling of queries), relative positional attention; sized by its blocks
_add("encoder", "funnel",
     _hf("FunnelConfig", "FunnelForSequenceClassification", vocab_size=VOCAB, block_sizes=[1, 1], d_model=16, n_head=2,
         d_head=8, d_inner=32, max_position_embeddings=32, num_labels=3, pad_token_id=0),
     text_classification(), CE)
_add("encoder part", "t5-encoder",
     _hf("T5Config", "T5EncoderModel", vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
         relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1),
     hidden_targets(16, text_classification()), last_hidden_state_mse)
_add("encoder part", "clip-text",
     _hf("CLIPTextConfig", "CLIPTextModel", **TEXT, eos_token_id=2),
     hidden_targets(16, text_classification()), last_hidden_state_mse)
_add("encoder part", "bart-encoder",
     _hf_part("BartConfig", "BartModel", lambda m: m.get_encoder(), vocab_size=VOCAB, d_model=16,
              encoder_layers=2, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
              encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32, pad_token_id=1, bos_token_id=0,
              eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2),
     hidden_targets(16, text_classification()), last_hidden_state_mse)

VIT = dict(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
           intermediate_size=32, num_labels=3)
for name, config, model, sizes, size in [
    ("vit", "ViTConfig", "ViTForImageClassification", VIT, 16),
    ("deit", "DeiTConfig", "DeiTForImageClassification", VIT, 16),
    ("beit", "BeitConfig", "BeitForImageClassification", VIT, 16),
    ("dinov2", "Dinov2Config", "Dinov2ForImageClassification", dict(VIT, mlp_ratio=2), 16),
    ("swin", "SwinConfig", "SwinForImageClassification",
     dict(image_size=16, patch_size=2, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=3), 16),
    ("convnext", "ConvNextConfig", "ConvNextForImageClassification",
     dict(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3), 32),
    ("mobilevit", "MobileViTConfig", "MobileViTForImageClassification",
     dict(image_size=32, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 8, 8, 8, 16, 32],
          num_attention_heads=2, num_labels=3), 32),
    ("efficientnet", "EfficientNetConfig", "EfficientNetForImageClassification",
     dict(image_size=32, width_coefficient=0.1, depth_coefficient=0.25, hidden_dim=128, num_labels=3), 32),
    ("regnet", "RegNetConfig", "RegNetForImageClassification",
     dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8, num_labels=3), 32),
    ("resnet", "ResNetConfig", "ResNetForImageClassification",
     dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3), 32),
    ("mobilenet-v1", "MobileNetV1Config", "MobileNetV1ForImageClassification",
     dict(image_size=32, depth_multiplier=0.25, num_labels=3), 32),
    ("segformer", "SegformerConfig", "SegformerForImageClassification",
     dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3],
          strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], num_labels=3), 32),
    ("poolformer", "PoolFormerConfig", "PoolFormerForImageClassification",
     dict(num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3], strides=[4, 2],
          padding=[2, 1], mlp_ratio=2.0, num_labels=3), 32),
    ("hiera", "HieraConfig", "HieraForImageClassification",
     dict(embed_dim=8, image_size=[32, 32], depths=[1, 1], num_heads=[1, 2], masked_unit_size=[4, 4],
          num_query_pool=1, num_labels=3), 32),
    # default configs (only the image and the classes shrunk): train-mode batch norm over channels-last activations
    ("mobilenet-v2", "MobileNetV2Config", "MobileNetV2ForImageClassification", dict(image_size=32, num_labels=3), 32),
    ("levit", "LevitConfig", "LevitForImageClassification", dict(image_size=32, num_labels=3), 32),
    ("swiftformer", "SwiftFormerConfig", "SwiftFormerForImageClassification", dict(image_size=32, num_labels=3), 32),
    ("mobilevitv2", "MobileViTV2Config", "MobileViTV2ForImageClassification", dict(image_size=64, num_labels=3), 64),
    ("convnextv2", "ConvNextV2Config", "ConvNextV2ForImageClassification",  # global response normalization
     dict(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3), 32),
    ("swinv2", "Swinv2Config", "Swinv2ForImageClassification",  # cosine attention, continuous position bias (an MLP)
     dict(image_size=16, patch_size=2, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=3), 16),
    # weight-standardized convolutions and group norm (32 groups: the smallest widths are 32); pre-activation blocks
    ("bit", "BitConfig", "BitForImageClassification",
     dict(embedding_size=32, hidden_sizes=[128, 256], depths=[1, 1], num_labels=3), 32),
    # attention whose queries, keys and values are depthwise convolutions with batch norm; a class token in stage 2
    # (two blocks there: transformers indexes the stage's drop-path rates by the stage number)
    ("cvt", "CvtConfig", "CvtForImageClassification",
     dict(embed_dim=[8, 16], num_heads=[1, 2], depth=[1, 2], patch_sizes=[7, 3], patch_stride=[4, 2],
          patch_padding=[2, 1], mlp_ratio=[2.0, 2.0], attention_drop_rate=[0.0, 0.0], drop_rate=[0.0, 0.0],
          drop_path_rate=[0.0, 0.1], qkv_bias=[True, True], cls_token=[False, True],
          qkv_projection_method=["dw_bn", "dw_bn"], padding_q=[1, 1], padding_kv=[1, 1], kernel_qkv=[3, 3],
          stride_kv=[2, 2], stride_q=[1, 1], num_labels=3), 32),
    ("focalnet", "FocalNetConfig", "FocalNetForImageClassification",  # focal modulation instead of attention
     dict(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_labels=3), 32),
]:
    _add("vision", name, _hf(config, model, **sizes), images(size), CE)

SPEECH = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
              conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
              classifier_proj_size=8, num_labels=3, vocab_size=VOCAB)
_add("audio", "whisper-encoder",
     _hf("WhisperConfig", "WhisperForAudioClassification", d_model=16, encoder_layers=2, decoder_layers=1,
         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
         num_mel_bins=8, max_source_positions=8, max_target_positions=16, vocab_size=VOCAB, num_labels=3,
         classifier_proj_size=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1),
     features("input_features", (8, 16)), CE)
_add("audio", "wav2vec2", _hf("Wav2Vec2Config", "Wav2Vec2ForSequenceClassification", **SPEECH),
     features("input_values", (400,)), CE)
_add("audio", "hubert", _hf("HubertConfig", "HubertForSequenceClassification", **SPEECH),
     features("input_values", (400,)), CE)
# gated relative position bias
_add("audio", "wavlm", _hf("WavLMConfig", "WavLMForSequenceClassification", **SPEECH),
     features("input_values", (400,)), CE)
def _audio_and_transcripts(g: torch.Generator) -> tuple:
    """Raw audio with its transcripts as Hugging Face's CTC heads take them: labels padded with -100, in the
    inputs (the model computes its loss); no separate target."""
    labels = torch.randint(1, VOCAB, (BATCH, 5), generator=g)
    labels[1, 3:] = -100
    return {"input_values": torch.randn(BATCH, 400, generator=g), "labels": labels}, None


def own_loss(output: Any, target: Any) -> torch.Tensor:
    """The loss the model computes itself from the labels in its inputs."""
    return output.loss


# CTC heads with labels: the label check (`if labels.max() >= vocab_size: raise`) runs as a check of each batch
# (capture/value_branches.py), the targets picked with masked_select are padded (capture/masked_rows.py)
for name, config, model in [("wav2vec2-ctc", "Wav2Vec2Config", "Wav2Vec2ForCTC"),
                            ("hubert-ctc", "HubertConfig", "HubertForCTC"),
                            ("wavlm-ctc", "WavLMConfig", "WavLMForCTC"),
                            ("data2vec-audio-ctc", "Data2VecAudioConfig", "Data2VecAudioForCTC")]:
    _add("audio", name, _hf(config, model, **SPEECH), _audio_and_transcripts, own_loss)
_add("audio", "ast",
     _hf("ASTConfig", "ASTForAudioClassification", hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
         intermediate_size=32, num_mel_bins=16, max_length=32, patch_size=8, frequency_stride=8, time_stride=8,
         num_labels=3),
     features("input_values", (32, 16)), CE)


# ------------------------------------------------------------------------------------------------ torch.nn
class _Sequence(nn.Module):
    """A sequence layer (returning a tensor or a tuple led by one) over (batch, time, 8) and a classifier on its
    last step."""

    def __init__(self, layer: nn.Module, width: int):
        super().__init__()
        self.layer = layer
        self.classifier = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        y = y[0] if isinstance(y, tuple) else y
        return self.classifier(y[:, -1])


class _SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.classifier = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.attention(x, x, x)
        return self.classifier(y.mean(dim=1))


class _Seq2Seq(nn.Module):
    """nn.Transformer as its documentation uses it: a causal target mask, no `tgt_is_causal` hint."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.Transformer(16, 2, 1, 1, 32, batch_first=True)
        self.classifier = nn.Linear(16, 3)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.classifier(self.transformer(src, tgt, tgt_mask=mask)[:, -1])


def _source_and_target(g: torch.Generator) -> tuple:
    return ((torch.randn(BATCH, SEQ, 16, generator=g), torch.randn(BATCH, SEQ - 2, 16, generator=g)),
            torch.randint(0, 3, (BATCH,), generator=g))


class _Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB, 16, mode="mean")
        self.classifier = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.bag(ids, offsets))


def _sequence(g: torch.Generator) -> tuple:
    return (torch.randn(BATCH, SEQ, 16, generator=g),), torch.randint(0, 3, (BATCH,), generator=g)


def _bags(g: torch.Generator) -> tuple:
    ids = torch.randint(0, VOCAB, (10,), generator=g)
    return (ids, torch.tensor([0, 4])), torch.randint(0, 3, (BATCH,), generator=g)


class _Acoustic(nn.Module):
    """Frames -> GRU -> per-frame class log-probabilities laid out (time, batch, classes), as CTC takes them."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(8, 16, batch_first=True)
        self.head = nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)
        return F.log_softmax(self.head(y), -1).transpose(0, 1)


def _frames_and_transcripts(g: torch.Generator) -> tuple:
    """Two utterances of 16 and 12 frames, transcripts of 4 and 3 labels (padded), lengths as tensors."""
    return ((torch.randn(BATCH, 2 * SEQ, 8, generator=g),),
            (torch.randint(1, 6, (BATCH, 4), generator=g), torch.tensor([2 * SEQ, 12]), torch.tensor([4, 3])))


def _ctc(log_probs: torch.Tensor, target: tuple) -> torch.Tensor:
    return nn.CTCLoss(zero_infinity=True)(log_probs, *target)


def _image_to_image(g: torch.Generator) -> tuple:
    return (torch.randn(BATCH, 3, 8, 8, generator=g),), torch.randn(BATCH, 3, 8, 8, generator=g)


def _conv_classifier(*layers: nn.Module, width: int) -> nn.Module:
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3))


for name, make, batch, loss in [
    ("nn.TransformerEncoderLayer(norm_first)",
     lambda: _Sequence(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, norm_first=True), 16), _sequence, CE),
    ("nn.MultiheadAttention", _SelfAttention, _sequence, CE),
    ("nn.Transformer(tgt_mask)", _Seq2Seq, _source_and_target, CE),
    ("nn.LSTM", lambda: _Sequence(nn.LSTM(16, 16, num_layers=2, batch_first=True, dropout=0.1), 16), _sequence, CE),
    ("nn.GRU", lambda: _Sequence(nn.GRU(16, 16, num_layers=2, batch_first=True, dropout=0.1), 16), _sequence, CE),
    ("nn.ConvTranspose2d",
     lambda: nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                           nn.ConvTranspose2d(8, 3, 4, stride=2, padding=1)), _image_to_image, pe.losses.mse()),
    ("nn.GroupNorm",
     lambda: _conv_classifier(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), width=8),
     images(8, key=None), CE),
    ("nn.EmbeddingBag", _Bag, _bags, CE),
    ("nn.Upsample",
     lambda: _conv_classifier(nn.Conv2d(3, 8, 3, padding=1), nn.Upsample(scale_factor=2, mode="nearest"),
                              nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                              nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(8, 8, 3), width=8),
     images(4, key=None), CE),
    ("nn.CTCLoss", _Acoustic, _frames_and_transcripts, _ctc),
]:
    _add("torch.nn", name, make, batch, loss)

# ------------------------------------------------------------------------------------------------ custom Functions
# Hugging Face models with custom torch.autograd.Functions whose backward is not their forward's derivative: they
# train through the Function's own backward (pockengine/capture/functions.py).
for family, name, config, model, sizes, batch, loss in [
    # the sparse-mixer router: a straight-through-like estimator of the expert choice (PhimoeMultiplier)
    ("decoder", "phimoe", "PhimoeConfig", "PhimoeForCausalLM",
     dict(DECODER, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2), tokens, LM),
    # YOSO's attention as the expectation of its LSH collisions, with an approximate backward (YosoCumulation)
    ("encoder", "yoso", "YosoConfig", "YosoForSequenceClassification", ENCODER, text_classification(), CE),
    # DeBERTa's masked softmax and dropout (XSoftmax, XDropout: its mask is saved in the forward)
    ("audio", "sew-d", "SEWDConfig", "SEWDForSequenceClassification", SPEECH, features("input_values", (400,)), CE),
]:
    _add(family, name, _hf(config, model, **sizes), batch, loss)


def _languages(g: torch.Generator) -> tuple:
    """Text classification with one language per sample: X-MOD picks each sample's rows for its language's adapter."""
    inputs, target = text_classification()(g)
    return {**inputs, "lang_ids": torch.tensor([0, 1])}, target


# its adapters take the rows of each language with a boolean mask (pockengine/capture/masked_rows.py); two
# languages (the default has one), so that each mask picks some rows only
_add("encoder", "xmod", _hf("XmodConfig", "XmodForSequenceClassification", **ENCODER, languages=("en_XX", "de_DE")),
     _languages, CE)


# ------------------------------------------------------------------------------------------------ third screening
def _eos_text_classification(g: torch.Generator) -> tuple:
    """Text classification with each sequence ending in <eos> (id 2) before its padding: encoder-decoder models
    classify a sequence by its last <eos> token."""
    inputs, target = text_classification()(g)
    inputs["input_ids"][torch.arange(BATCH), inputs["attention_mask"].sum(1) - 1] = 2
    return inputs, target


# BART's head takes each sample's last <eos> token, `h[eos].view(B, -1, H)[:, -1]`, after checking every sample has
# as many with `unique_consecutive` (pockengine/capture/masked_rows.py); its defaults: pad 1, bos 0, eos 2
_add("encoder-decoder", "bart",
     _hf("BartConfig", "BartForSequenceClassification", vocab_size=VOCAB, d_model=16, encoder_layers=2,
         decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
         max_position_embeddings=32, num_labels=3),
     _eos_text_classification, CE)
for name, config, model, sizes in [
    # bottlenecked blocks with stacked feed-forwards and NoNorm (an element-wise affine in place of layer norm)
    ("mobilebert", "MobileBertConfig", "MobileBertForSequenceClassification",
     dict(ENCODER, embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16)),
    # characters hashed into buckets, downsampled by a strided convolution, upsampled back by repetition
    ("canine", "CanineConfig", "CanineForSequenceClassification",
     dict(ENCODER, num_hash_buckets=64, local_transformer_stride=4)),
]:
    _add("encoder", name, _hf(config, model, **sizes), text_classification(), CE)
for name, config, model, sizes in [
    # a gated short convolution (depthwise, causal) in the blocks that have no attention
    ("lfm2", "Lfm2Config", "Lfm2ForCausalLM",
     dict(DECODER, num_key_value_heads=1, layer_types=["conv", "full_attention"])),
    # attention within chunks of 4 tokens with rotary positions and L2-normalized queries and keys, then a layer
    # with neither (NoPE) over the whole sequence; routed experts with a shared one, the router's sigmoid on the inputs
    ("llama4-text", "Llama4TextConfig", "Llama4ForCausalLM",
     dict(DECODER, num_key_value_heads=1, head_dim=8, intermediate_size_mlp=32, num_local_experts=4,
          num_experts_per_tok=2, attention_chunk_size=4, no_rope_layers=[1, 0],
          layer_types=["chunked_attention", "full_attention"])),
]:
    _add("decoder", name, _hf(config, model, **sizes), tokens, LM)


# ------------------------------------------------------------------------------------------------ checks in the program
def _patches(g: torch.Generator) -> tuple:
    """Siglip2's patchified images of their own sizes: a 4x4 grid and a 2x4 one padded to the same 16 patches (2x2
    pixels, 3 channels), the mask marking the padding, and a regression target on the mean hidden state."""
    pixels = torch.randn(BATCH, 16, 12, generator=g)
    mask = torch.ones(BATCH, 16, dtype=torch.long)
    mask[1, 8:] = 0
    inputs = {"pixel_values": pixels, "pixel_attention_mask": mask, "spatial_shapes": torch.tensor([[4, 4], [2, 4]])}
    return inputs, torch.randn(BATCH, 16, generator=g)


# its position embeddings resized to each image's grid after `torch._check_tensor_all` of the grid sizes, a check
# that runs with the program (pockengine/capture/tensor_checks.py); 16 position embeddings (a 4x4 grid)
_add("vision", "siglip2-vision",
     _hf("Siglip2VisionConfig", "Siglip2VisionModel", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
         num_attention_heads=2, num_patches=16, patch_size=2),
     _patches, last_hidden_state_mse)


# ------------------------------------------------------------------------------------------------ fourth screening
MLA = dict(q_lora_rank=8, qk_rope_head_dim=4, head_dim=4)  # DeepSeek's latent attention: the rotary part is head_dim
for name, config, model, sizes in [
    # sliding-window and full attention layers; per-layer inputs: a second embedding of the tokens, a slice of it
    # gated into each layer
    ("gemma4", "Gemma4TextConfig", "Gemma4ForCausalLM",
     dict(DECODER, num_key_value_heads=1, head_dim=8, sliding_window=4, vocab_size_per_layer_input=VOCAB,
          hidden_size_per_layer_input=8)),
    # gated delta-rule linear attention and full attention layers
    ("olmo-hybrid", "OlmoHybridConfig", "OlmoHybridForCausalLM", dict(DECODER, num_key_value_heads=2)),
    # DeepSeek sparse attention: a lightning indexer scores the keys, each query attends to its top ones
    ("glm-moe-dsa", "GlmMoeDsaConfig", "GlmMoeDsaForCausalLM",
     dict(DECODER, **MLA, num_key_value_heads=2, kv_lora_rank=8, qk_nope_head_dim=4, v_head_dim=8,
          moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
          first_k_dense_replace=1)),
    ("deepseek-v4", "DeepseekV4Config", "DeepseekV4ForCausalLM",
     dict(DECODER, **MLA, num_key_value_heads=1, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
          sliding_window=4)),
    # the decoder of ProphetNet: a main stream and an n-gram stream predicting the tokens after next
    ("prophetnet", "ProphetNetConfig", "ProphetNetForCausalLM",
     dict(vocab_size=VOCAB, hidden_size=16, num_encoder_layers=2, num_decoder_layers=2, num_encoder_attention_heads=2,
          num_decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
          num_buckets=8, relative_max_distance=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # gated short convolutions, sliding-window and full attention layers
    ("lfm3", "Lfm3Config", "Lfm3ForCausalLM",
     dict(DECODER, num_key_value_heads=1, head_dim=8, sliding_window=4, num_hidden_layers=3,
          layer_types=["conv", "sliding_attention", "full_attention"])),
    # experts with identity ("zero-computation") experts among them, each run on the rows routed to it, found with
    # `nonzero()` and iterated over in Python: torch.export cannot (see docs/coverage.md)
    ("longcat-flash", "LongcatFlashConfig", "LongcatFlashForCausalLM",
     dict(DECODER, **MLA, num_layers=1, num_key_value_heads=2, kv_lora_rank=8, qk_nope_head_dim=4, v_head_dim=8,
          expert_ffn_hidden_size=16, n_routed_experts=4, zero_expert_num=2, moe_topk=2)),
]:
    _add("decoder", name, _hf(config, model, **sizes), tokens, LM)

for name, config, model, sizes in [
    # local attention within a radius of 2 tokens
    ("longt5-encoder", "LongT5Config", "LongT5EncoderModel",
     dict(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
          relative_attention_max_distance=16, local_radius=2, pad_token_id=0, eos_token_id=1)),
    # attention within blocks of 4 tokens plus 2 global tokens
    ("pegasus-x-encoder", "PegasusXConfig", "PegasusXModel",
     dict(vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
          decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
          block_size=4, num_global_tokens=2, pad_token_id=0, eos_token_id=2)),
    # routed experts (top-1) whose rows are found with `nonzero()` and iterated over in Python: torch.export cannot;
    # its router casts its classifier to its dtype at every call (pockengine/capture/module_casts.py). One of the
    # two layers sparse (by default 3 of them: none of 2 layers would be)
    ("switch-transformers-encoder", "SwitchTransformersConfig", "SwitchTransformersEncoderModel",
     dict(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=1, num_heads=2,
          num_experts=4, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, relative_attention_num_buckets=8,
          relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1)),
    # routed experts (top-2, a capacity per expert) run in the same loop over `nonzero()`, with dropout on each
    # expert's tokens in train mode (`moe_token_dropout`); the second of the two encoder layers sparse
    ("nllb-moe-encoder", "NllbMoeConfig", "NllbMoeModel",
     dict(vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
          decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
          num_experts=4, expert_capacity=8, encoder_sparse_step=2, decoder_sparse_step=1, pad_token_id=1,
          bos_token_id=0, eos_token_id=2)),
    # Longformer's attention (a sliding window of 4): it branches on whether any token attends globally
    ("led-encoder", "LEDConfig", "LEDModel",
     dict(vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
          decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_encoder_position_embeddings=32,
          max_decoder_position_embeddings=32, attention_window=4, pad_token_id=1, bos_token_id=0, eos_token_id=2)),
]:
    make = _hf(config, model, **sizes)
    if name.endswith("-encoder") and "Encoder" not in model:
        make = _hf_part(config, model, lambda m: m.get_encoder(), **sizes)
    _add("encoder part", name, make, hidden_targets(16, text_classification()), last_hidden_state_mse)


# a bidirectional encoder with sliding-window attention whose experts (top-2 of 4, clamped SwiGLU, biases) run in a
# loop over `nonzero()` of the experts hit, computed under no_grad
_add("encoder", "openai-privacy-filter",
     _hf("OpenAIPrivacyFilterConfig", "OpenAIPrivacyFilterModel",
         **dict(TEXT, num_key_value_heads=1, head_dim=8, intermediate_size=16, num_local_experts=4,
                num_experts_per_tok=2, sliding_window=4, pad_token_id=0, eos_token_id=2)),
     hidden_targets(16, text_classification()), last_hidden_state_mse)


def _latent_text_classification(g: torch.Generator) -> tuple:
    """Perceiver takes its token ids as `inputs`."""
    inputs, target = text_classification()(g)
    return {"inputs": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}, target


# cross-attention from 4 latents to the tokens, self-attention among the latents
_add("encoder", "perceiver",
     _hf("PerceiverConfig", "PerceiverForSequenceClassification", vocab_size=VOCAB, max_position_embeddings=32,
         num_latents=4, d_latents=16, d_model=16, num_blocks=1, num_self_attends_per_block=1,
         num_self_attention_heads=2, num_cross_attention_heads=2, num_labels=3),
     _latent_text_classification, CE)
_add("vision", "dinov3-vit",  # register tokens, rotary positions over the patch grid, layer scale
     _hf("DINOv3ViTConfig", "DINOv3ViTModel", image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2,
         num_attention_heads=2, intermediate_size=32, num_register_tokens=2),
     hidden_targets(16, images(16)), last_hidden_state_mse)
# grouping stages: learned group tokens assign the patches to groups with a hard Gumbel softmax (train mode draws its
# noise from torch.distributions.Gumbel, pockengine/capture/distributions.py)
_add("vision", "groupvit-vision",
     _hf("GroupViTVisionConfig", "GroupViTVisionModel", image_size=16, patch_size=8, hidden_size=16,
         intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, depths=[1, 1], num_group_tokens=[4, 0],
         num_output_groups=[4, 4]),
     hidden_targets(16, images(16)), last_hidden_state_mse)
_add("vision", "clip-image-classification",
     _hf("CLIPConfig", "CLIPForImageClassification", num_labels=3,
         text_config=dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=32),
         vision_config=dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2)),
     images(16), CE)


def _video(g: torch.Generator) -> tuple:
    """4 frames of 16x16 pixels per sample."""
    return {"pixel_values": torch.randn(BATCH, 4, 3, 16, 16, generator=g)}, torch.randint(0, 3, (BATCH,), generator=g)


# tubelets of 2 frames x 8x8 pixels embedded by a 3-D convolution
_add("video", "vivit",
     _hf("VivitConfig", "VivitForVideoClassification", image_size=16, num_frames=4, tubelet_size=[2, 8, 8],
         hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=3),
     _video, CE)
# batch norm over the channels of (batch, time, channels), transposed there and back: ATen's CPU kernel returns
# another layout than its meta function says (pockengine/capture/kernel_layouts.py)
_add("time series", "patchtst",
     _hf("PatchTSTConfig", "PatchTSTModel", num_input_channels=2, context_length=16, patch_length=4, patch_stride=4,
         d_model=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32),
     hidden_targets(16, features("past_values", (16, 2))),
     lambda output, target: F.mse_loss(output.last_hidden_state.mean(dim=(1, 2)), target))


def _series(g: torch.Generator) -> tuple:
    """A univariate series: 8 steps of context plus 2 for the lags, 4 to predict, one time feature; the model computes
    its own loss, so the target is unused."""
    inputs = {"past_values": torch.randn(BATCH, 10, generator=g),
              "past_time_features": torch.randn(BATCH, 10, 1, generator=g),
              "past_observed_mask": torch.ones(BATCH, 10), "future_values": torch.randn(BATCH, 4, generator=g),
              "future_time_features": torch.randn(BATCH, 4, 1, generator=g)}
    return inputs, torch.zeros(BATCH)


# an encoder-decoder whose head is a Student's t distribution; its loss is the negative log-likelihood of the future
# values under it (`torch.distributions`' argument checks, pockengine/capture/distributions.py)
_add("time series", "time-series-transformer",
     _hf("TimeSeriesTransformerConfig", "TimeSeriesTransformerForPrediction", prediction_length=4, context_length=8,
         lags_sequence=[1, 2], num_time_features=1, d_model=16, encoder_layers=1, decoder_layers=1,
         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16),
     _series, lambda output, target: output.loss)
# block-sparse attention by default; at sequences this short it switches to full attention in its forward pass,
# building new attention layers there (nn.init writing into fresh tensors under no_grad,
# pockengine/capture/stop_gradient.py)
_add("encoder", "big-bird", _hf("BigBirdConfig", "BigBirdForSequenceClassification", **ENCODER),
     text_classification(), CE)


# ------------------------------------------------------------------------------------------------ heads with labels
# Hugging Face heads given their labels in the inputs, as transformers' Trainer gives them, trained on the loss the
# model computes (`output.loss`): regression and multi-label problem types, -100 padding, derived decoder inputs
# (`shift_tokens_right`), segmentation's upsampled loss with ignore_index 255.
def _labelled(labels: Callable[[torch.Generator, torch.Tensor, torch.Tensor], dict], choices: int = 0
              ) -> Callable[[torch.Generator], tuple]:
    """Token ids with an attention mask (the second sequence padded; `choices` > 0: that many per sample) and the
    labels `labels(g, ids, mask)` in the inputs; no separate target."""

    def make(g: torch.Generator) -> tuple:
        shape = (BATCH, choices, SEQ) if choices else (BATCH, SEQ)
        ids = torch.randint(3, VOCAB, shape, generator=g)
        mask = torch.ones(shape, dtype=torch.long)
        mask[1, ..., SEQ - 3:] = 0
        return {"input_ids": ids, "attention_mask": mask, **labels(g, ids, mask)}, None

    return make


def _classes(g: torch.Generator, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    return {"labels": torch.randint(0, 3, (BATCH,), generator=g)}


def _tags(g: torch.Generator, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    return {"labels": torch.randint(0, 3, ids.shape, generator=g).masked_fill(mask == 0, -100)}


def _masked_tokens(g: torch.Generator, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """Half the tokens to predict (the first always), -100 elsewhere and on the padding."""
    picked = torch.rand(ids.shape, generator=g) < 0.5
    picked[:, 0] = True
    return {"labels": ids.masked_fill(~picked | (mask == 0), -100)}


def _next_tokens(g: torch.Generator, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    return {"labels": ids.masked_fill(mask == 0, -100)}  # the model shifts them


def _targets(g: torch.Generator, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """5 target tokens, the second sequence's last 2 padded with -100 (the model derives its decoder inputs)."""
    labels = torch.randint(3, VOCAB, (BATCH, 5), generator=g)
    labels[1, 3:] = -100
    return {"labels": labels}


LABELLED_TEXT = {
    "regression": lambda g, ids, mask: {"labels": torch.randn(BATCH, generator=g)},
    "multi-label": lambda g, ids, mask: {"labels": torch.randint(0, 2, (BATCH, 3), generator=g).float()},
    "spans": lambda g, ids, mask: {"start_positions": torch.randint(0, SEQ, (BATCH,), generator=g),
                                   "end_positions": torch.randint(0, SEQ, (BATCH,), generator=g)},
}
SEQ2SEQ = dict(vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)
for family, name, config, model, sizes, batch in [
    ("encoder", "bert-regression", "BertConfig", "BertForSequenceClassification", dict(ENCODER, num_labels=1),
     _labelled(LABELLED_TEXT["regression"])),
    ("encoder", "bert-multi-label", "BertConfig", "BertForSequenceClassification",
     dict(ENCODER, problem_type="multi_label_classification"), _labelled(LABELLED_TEXT["multi-label"])),
    ("encoder", "roberta-token-classification", "RobertaConfig", "RobertaForTokenClassification",
     dict(ENCODER, pad_token_id=1), _labelled(_tags)),
    ("encoder", "bert-question-answering", "BertConfig", "BertForQuestionAnswering", dict(ENCODER, num_labels=2),
     _labelled(LABELLED_TEXT["spans"])),
    ("encoder", "roberta-masked-lm", "RobertaConfig", "RobertaForMaskedLM", dict(ENCODER, pad_token_id=1),
     _labelled(_masked_tokens)),
    ("encoder", "bert-multiple-choice", "BertConfig", "BertForMultipleChoice", ENCODER, _labelled(_classes, 3)),
    # Longformer's attention: `is_global_attn = mask.any().item()` then `if is_global_attn:` (a bool read decided
    # as on the example batch, capture/value_branches.py); overlapping chunks taken with as_strided of a transposed
    # view (capture/strided_windows.py)
    ("encoder", "longformer-masked-lm", "LongformerConfig", "LongformerForMaskedLM",
     dict(ENCODER, attention_window=4, pad_token_id=1), _labelled(_masked_tokens)),
    # the logits and labels of the tokens the attention mask keeps, each picked with the mask, into a binary
    # cross-entropy: summed under the mask over every row (capture/masked_rows.py)
    ("encoder", "electra-pretraining", "ElectraConfig", "ElectraForPreTraining", dict(ENCODER, embedding_size=8),
     _labelled(lambda g, ids, mask: {"labels": torch.randint(0, 2, ids.shape, generator=g)})),
    ("decoder", "llama-labels", "LlamaConfig", "LlamaForCausalLM", dict(DECODER, num_key_value_heads=1),
     _labelled(_next_tokens)),
    ("decoder", "gpt2-labels", "GPT2Config", "GPT2LMHeadModel",
     dict(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=2),
     _labelled(_next_tokens)),
    ("encoder-decoder", "t5-labels", "T5Config", "T5ForConditionalGeneration",
     dict(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
          relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
     _labelled(_targets)),
    ("encoder-decoder", "bart-labels", "BartConfig", "BartForConditionalGeneration", SEQ2SEQ, _labelled(_targets)),
    # its decoder starts with each target's last token that is not padding (gathered at a count of the mask)
    ("encoder-decoder", "mbart-labels", "MBartConfig", "MBartForConditionalGeneration", SEQ2SEQ, _labelled(_targets)),
    ("encoder-decoder", "marian-labels", "MarianConfig", "MarianMTModel",
     dict(SEQ2SEQ, pad_token_id=3, decoder_start_token_id=3, eos_token_id=2, forced_eos_token_id=2),
     _labelled(_targets)),
    # routed experts; each decoder layer's drop condition asked again after the layer (`if skip_the_layer:
    # continue`, capture/layer_drop.py)
    ("encoder-decoder", "nllb-moe-labels", "NllbMoeConfig", "NllbMoeForConditionalGeneration",
     dict(SEQ2SEQ, num_experts=4, expert_capacity=8, encoder_sparse_step=2, decoder_sparse_step=2, pad_token_id=1,
          bos_token_id=0, eos_token_id=2, decoder_start_token_id=2), _labelled(_targets)),
    ("encoder-decoder", "led-labels", "LEDConfig", "LEDForConditionalGeneration",
     dict(SEQ2SEQ, max_encoder_position_embeddings=32, max_decoder_position_embeddings=32, attention_window=4,
          pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2), _labelled(_targets)),
]:
    _add(family, name, _hf(config, model, **sizes), batch, own_loss)


def _images_and_classes(g: torch.Generator) -> tuple:
    inputs, classes = images(16)(g)
    return {**inputs, "labels": classes}, None


def _images_and_segments(g: torch.Generator) -> tuple:
    """32x32 images with a class per pixel, the top rows of the second ignored (255, SegFormer's ignore index)."""
    segments = torch.randint(0, 3, (BATCH, 32, 32), generator=g)
    segments[1, :4] = 255
    return {"pixel_values": torch.randn(BATCH, 3, 32, 32, generator=g), "labels": segments}, None


def _audio_features_and_transcripts(g: torch.Generator) -> tuple:
    labels = torch.randint(3, VOCAB, (BATCH, 5), generator=g)
    labels[1, 3:] = -100
    return {"input_features": torch.randn(BATCH, 8, 16, generator=g), "labels": labels}, None


for family, name, config, model, sizes, batch in [
    ("vision", "vit-labels", "ViTConfig", "ViTForImageClassification", VIT, _images_and_classes),
    # logits upsampled to the labels' size, cross-entropy with ignore_index 255
    ("vision", "segformer-segmentation", "SegformerConfig", "SegformerForSemanticSegmentation",
     dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3],
          strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], num_labels=3, decoder_hidden_size=16),
     _images_and_segments),
    ("audio", "sew-ctc", "SEWConfig", "SEWForCTC", SPEECH, _audio_and_transcripts),
    ("audio", "unispeech-sat-ctc", "UniSpeechSatConfig", "UniSpeechSatForCTC", SPEECH, _audio_and_transcripts),
    ("audio", "wav2vec2-conformer-ctc", "Wav2Vec2ConformerConfig", "Wav2Vec2ConformerForCTC", SPEECH,
     _audio_and_transcripts),
    ("audio", "whisper-labels", "WhisperConfig", "WhisperForConditionalGeneration",
     dict(d_model=16, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
          encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8, max_source_positions=8, max_target_positions=16,
          vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1),
     _audio_features_and_transcripts),
]:
    _add(family, name, _hf(config, model, **sizes), batch, own_loss)
