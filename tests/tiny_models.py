"""The table of tiny random transformers models the tests run over, listed once.

Each case builds a small model of a real architecture (fp32, dropout off) and a batch of inputs
for it, so tests can be parametrized over `TINY_CASES` by id.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForPreTraining,
    BertForSequenceClassification,
    BertModel,
    ConvNextV2Config,
    ConvNextV2Model,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForMaskedLM,
    ElectraModel,
    GPT2Config,
    GPT2DoubleHeadsModel,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    SwiftFormerConfig,
    SwiftFormerModel,
    T5Config,
    T5ForConditionalGeneration,
    T5ForQuestionAnswering,
    Wav2Vec2Config,
    Wav2Vec2Model,
)

VOCAB = 101


def _seeded(build: Callable[[], PreTrainedModel], seed: int) -> PreTrainedModel:
    """`build()` under `torch.manual_seed(seed)`, in eval mode: the same weights on every call.

    Biases and norm gains, which transformers initializes to 0 and 1, are drawn at random (b ~ N(0, 0.05²),
    γ ~ 1 + N(0, 0.1²)), as a pretrained model's are: a conversion that scaled a bias or a gain wrongly would
    leave a zero a zero and would hardly move ones.
    """
    torch.manual_seed(seed)
    model = build()
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.nn.Parameter):
                bias.normal_(0.0, 0.05)
            gain = getattr(module, "weight", None)
            if "Norm" in type(module).__name__ and isinstance(gain, torch.nn.Parameter):
                gain.add_(torch.randn_like(gain), alpha=0.1)
    return model.eval()


@dataclass(frozen=True)
class TinyCase:
    id: str
    build: Callable[[], PreTrainedModel]
    tied: bool

    def model(self, seed: int = 0) -> PreTrainedModel:
        return _seeded(self.build, seed)

    def batch(self, batch_size: int = 2, seq_len: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, -3:] = 0  # some padding
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def _tiny_llama(tie_word_embeddings: bool) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


_COMMON = dict(vocab_size=VOCAB, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

TINY_CASES = [
    TinyCase(
        "bert",
        lambda: BertForSequenceClassification(
            BertConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=37,
                num_labels=2,
                **_COMMON,
            )
        ),
        tied=False,
    ),
    TinyCase(
        "roberta",
        lambda: RobertaForMaskedLM(
            RobertaConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=37,
                max_position_embeddings=64,
                pad_token_id=1,
                **_COMMON,
            )
        ),
        tied=True,
    ),
    TinyCase(
        "distilbert",
        lambda: DistilBertForSequenceClassification(
            DistilBertConfig(
                vocab_size=VOCAB,
                dim=32,
                n_layers=2,
                n_heads=4,
                hidden_dim=37,
                dropout=0.0,
                attention_dropout=0.0,
                seq_classif_dropout=0.0,
                num_labels=2,
            )
        ),
        tied=False,
    ),
    TinyCase(
        "gpt2",
        lambda: GPT2LMHeadModel(
            GPT2Config(
                vocab_size=VOCAB,
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_positions=64,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                bos_token_id=0,
                eos_token_id=0,
            )
        ),
        tied=True,
    ),
    TinyCase("llama-tied", lambda: _tiny_llama(tie_word_embeddings=True), tied=True),
    TinyCase("llama-untied", lambda: _tiny_llama(tie_word_embeddings=False), tied=False),
]

CASES_BY_ID = {case.id: case for case in TINY_CASES}

# encoder-decoder LMs for Seq2SeqTrainer (labels are the decoder's targets; token ids 3.. are free for data)
SEQ2SEQ_CASES = {
    "t5": TinyCase(
        "t5",
        lambda: T5ForConditionalGeneration(
            T5Config(
                vocab_size=VOCAB,
                d_model=32,
                d_kv=8,
                d_ff=37,
                num_layers=2,
                num_heads=4,
                dropout_rate=0.0,
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            )
        ),
        tied=True,
    ),
    "bart": TinyCase(
        "bart",
        lambda: BartForConditionalGeneration(
            BartConfig(
                vocab_size=VOCAB,
                d_model=32,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=37,
                decoder_ffn_dim=37,
                max_position_embeddings=64,
                dropout=0.0,
                attention_dropout=0.0,
                activation_dropout=0.0,
                init_std=0.1,  # not 0.02: what it generates after 30 steps then depends on the input
                bos_token_id=0,
                pad_token_id=1,
                eos_token_id=2,
                decoder_start_token_id=2,
            )
        ),
        tied=True,
    ),
}


@dataclass(frozen=True)
class HeadsCase:
    """A tiny model with head layers outside its base model: `output_heads` are the matmul layers that end a head
    (the LM head and any beside it), `inner` the head layers that feed another one, and `tied` the output heads
    whose weight is the input embedding."""

    id: str
    build: Callable[[], PreTrainedModel]
    output_heads: frozenset[str]
    inner: frozenset[str]
    tied: frozenset[str] = frozenset()

    def model(self, seed: int = 0) -> PreTrainedModel:
        return _seeded(self.build, seed)


_BERT_SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, **_COMMON)

HEADS_CASES = [
    HeadsCase(  # MLM head (tied decoder after a dense transform) and next-sentence head
        "bert-pretraining",
        lambda: BertForPreTraining(BertConfig(**_BERT_SMALL)),
        output_heads=frozenset({"cls.predictions.decoder", "cls.seq_relationship"}),
        inner=frozenset({"cls.predictions.transform.dense"}),
        tied=frozenset({"cls.predictions.decoder"}),
    ),
    HeadsCase(  # tied LM head and a multiple-choice head (Conv1D body, nn.Linear heads)
        "gpt2-double-heads",
        lambda: GPT2DoubleHeadsModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=64)),
        output_heads=frozenset({"lm_head", "multiple_choice_head.summary"}),
        inner=frozenset(),
        tied=frozenset({"lm_head"}),
    ),
    HeadsCase(  # classification head: dense h → h, then out_proj h → labels
        "roberta-classifier",
        lambda: RobertaForSequenceClassification(
            RobertaConfig(**_BERT_SMALL, max_position_embeddings=64, pad_token_id=1)
        ),
        output_heads=frozenset({"classifier.out_proj"}),
        inner=frozenset({"classifier.dense"}),
    ),
    HeadsCase(  # its own base model: the body is the encoder and decoder stacks, the head `qa_outputs` (h → 2)
        "t5-question-answering",
        lambda: T5ForQuestionAnswering(
            T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4, dropout_rate=0.0)
        ),
        output_heads=frozenset({"qa_outputs"}),
        inner=frozenset(),
    ),
    HeadsCase(  # a bare base model with an input projection (embedding_size → h, an input layer) before its
        # layers: no head
        "electra-base-model",
        lambda: ElectraModel(ElectraConfig(embedding_size=16, **_BERT_SMALL)),
        output_heads=frozenset(),
        inner=frozenset(),
    ),
    HeadsCase(  # a bare base model: its h → h pooler is no output head
        "bert-base-model",
        lambda: BertModel(BertConfig(**_BERT_SMALL)),
        output_heads=frozenset(),
        inner=frozenset({"pooler.dense"}),
    ),
    HeadsCase(  # generator head: dense h → embedding_size, then the tied LM head
        "electra-mlm",
        lambda: ElectraForMaskedLM(ElectraConfig(embedding_size=16, **_BERT_SMALL)),
        output_heads=frozenset({"generator_lm_head"}),
        inner=frozenset({"generator_predictions.dense"}),
        tied=frozenset({"generator_lm_head"}),
    ),
]


# Models whose gains are stored in the shape they broadcast in (one dimension larger than 1): SwiftFormer's layer
# scales (c, 1, 1), ConvNeXt V2's GRN γ and β (1, 1, 1, c), wav2vec2's weight_norm g (1, 1, k) of its positional conv.
# Gains drawn at random: their initial values (1e-5, zeros, norms) would hide a scale applied twice or not at all.
GAIN_NAMES = {
    "swiftformer": (
        "encoder.network.0.blocks.0.layer_scale_1",
        "encoder.network.4.blocks.0.local_representation.layer_scale",
    ),
    "convnextv2": ("encoder.stages.1.layers.0.grn.weight",),
    "wav2vec2": ("encoder.pos_conv_embed.conv.parametrizations.weight.original0",),
}


def _with_random_gains(model: PreTrainedModel) -> PreTrainedModel:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in ("layer_scale", "grn.", "original0")):
                param.copy_(0.1 + torch.rand_like(param))
    return model


def tiny_gain_model(model_id: str, seed: int = 0) -> tuple[PreTrainedModel, dict[str, torch.Tensor]]:
    """(model, inputs) of a tiny `swiftformer`, `convnextv2` or `wav2vec2` (fp32, eval mode), gains drawn at random."""
    build, inputs = {
        "swiftformer": (
            lambda: SwiftFormerModel(SwiftFormerConfig(depths=[1, 1, 1, 1], embed_dims=[8, 8, 16, 16])),
            {"pixel_values": (2, 3, 32, 32)},
        ),
        "convnextv2": (
            lambda: ConvNextV2Model(ConvNextV2Config(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)),
            {"pixel_values": (2, 3, 32, 32)},
        ),
        "wav2vec2": (
            lambda: Wav2Vec2Model(
                Wav2Vec2Config(
                    hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
                    conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                    num_conv_pos_embedding_groups=4,
                )
            ),
            {"input_values": (2, 400)},
        ),
    }[model_id]  # fmt: skip
    model = _with_random_gains(_seeded(build, seed))
    generator = torch.Generator().manual_seed(seed + 1)
    return model, {key: torch.randn(shape, generator=generator) for key, shape in inputs.items()}
