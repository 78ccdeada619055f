"""MED: BLIP's multimodal mixture of encoder-decoder, a BERT with cross-attention to image tokens.

One set of layers serves three roles, chosen per call:
- `mode='text'`: a BERT text encoder (self-attention only, bidirectional);
- `mode='multimodal'`: every layer also cross-attends to the image tokens (`encoder_hidden_states`);
- `is_decoder=True` (BertLMHeadModel): causal self-attention plus cross-attention, for captioning
  and answer generation.

Module and parameter names are the original's (BLIP `models/med.py`, after transformers 4.15's
BERT), so official checkpoints load unchanged. The numbers are the original's too: additive
`(1 - mask) * -10000` self-attention masks, the 4.15 `invert_attention_mask` constants for the
image mask, a label-smoothed (0.1) shifted LM loss, an LM head tied to the word embeddings.

What is new:
- attention runs through `F.scaled_dot_product_attention` with the additive float mask; the
  explicit softmax path is kept for `output_attentions`, `head_mask` and the cross-attention
  map capture (`save_attention`, used for Grad-CAM);
- plain `nn.Module`s: transformers provides only `BertConfig` (and the tokenizer, in blip.py);
  weight initialisation, BERT checkpoint loading (`load_bert_weights`) and generation
  (models/generation.py: greedy, 4.15's beam search, nucleus sampling, our own key/value cache)
  are this project's code, so a transformers release cannot change BLIP's numbers;
- `BertModel.compute_cross_kv(image_embeds)` / `cross_kv=` let a caller that scores many texts
  against the same image (retrieval re-ranking, VQA answer ranking) project the image keys and
  values once per image instead of once per text;
- optional activation checkpointing of the text layers (`encoder.gradient_checkpointing = True`
  or `gradient_checkpointing_enable()`).
"""
import dataclasses
import math
import os
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig

from models import generation
from models.generation import KVCache

__all__ = ['BertConfig', 'BertModel', 'BertLMHeadModel', 'BertEncoder', 'BertLayer', 'BertAttention',
           'BertSelfAttention', 'BertSelfOutput', 'BertEmbeddings', 'BertPreTrainedModel', 'KVCache',
           'load_bert_weights']

# Additive mask values of the original: self-attention masks use -10000 (BLIP's
# get_extended_attention_mask); the image mask goes through transformers 4.15's
# invert_attention_mask, which used -1e9 in float32 and -1e4 in float16.
SELF_MASK_VALUE = -10000.0


def _cross_mask_value(dtype):
    return -1e4 if dtype == torch.float16 else -1e9


# BERT config `hidden_act` names; 'gelu' is the exact (erf) GELU, as in BERT and the original.
ACTIVATIONS = {
    'gelu': F.gelu,
    'gelu_new': lambda x: F.gelu(x, approximate='tanh'),
    'gelu_pytorch_tanh': lambda x: F.gelu(x, approximate='tanh'),
    'relu': F.relu,
    'silu': F.silu,
    'swish': F.silu,
    'tanh': torch.tanh,
}


def activation(name):
    """The activation function a BERT config names (or the callable it holds)."""
    if callable(name):
        return name
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


@dataclasses.dataclass
class TextModelOutput:
    """What BertModel returns (the fields the original's BaseModelOutputWithPoolingAndCrossAttentions
    had, less the cache, which the caller owns)."""
    last_hidden_state: torch.Tensor
    pooler_output: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None
    cross_attentions: Optional[tuple] = None

    def to_tuple(self):
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None)


@dataclasses.dataclass
class LMOutput:
    """What BertLMHeadModel returns: the loss (with `labels`) and the logits of every position."""
    loss: Optional[torch.Tensor]
    logits: torch.Tensor
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None
    cross_attentions: Optional[tuple] = None

    to_tuple = TextModelOutput.to_tuple


class BertEmbeddings(nn.Module):
    """Word and absolute position embeddings (BLIP drops BERT's token-type embeddings)."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # persistent, as in the original: official checkpoints carry `embeddings.position_ids`
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)))
        self.position_embedding_type = getattr(config, "position_embedding_type", "absolute")
        if self.position_embedding_type != "absolute":
            raise NotImplementedError(
                f"position_embedding_type={self.position_embedding_type!r}: BLIP uses 'absolute' only")
        self.config = config

    def forward(self, input_ids=None, position_ids=None, inputs_embeds=None, past_key_values_length=0):
        seq_length = input_ids.size(1) if input_ids is not None else inputs_embeds.size(1)
        if position_ids is None:
            position_ids = self.position_ids[:, past_key_values_length:seq_length + past_key_values_length]
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        embeddings = inputs_embeds + self.position_embeddings(position_ids)
        embeddings = self.LayerNorm(embeddings)
        return self.dropout(embeddings)


class BertSelfAttention(nn.Module):
    """Multi-head attention; keys/values from the text itself or, for cross-attention, from the
    image tokens (width `config.encoder_width`)."""

    def __init__(self, config, is_cross_attention, layer_idx=None):
        super().__init__()
        if config.hidden_size % config.num_attention_heads != 0:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of "
                             f"num_attention_heads {config.num_attention_heads}")
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        kv_width = config.encoder_width if is_cross_attention else config.hidden_size

        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(kv_width, self.all_head_size)
        self.value = nn.Linear(kv_width, self.all_head_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

        self.is_cross_attention = is_cross_attention
        self.layer_idx = layer_idx
        self.save_attention = False  # the original's switch for cross-attention map capture
        self.attention_map = None
        self.attn_gradients = None

    def save_attn_gradients(self, attn_gradients):
        self.attn_gradients = attn_gradients

    def get_attn_gradients(self):
        return self.attn_gradients

    def save_attention_map(self, attention_map):
        self.attention_map = attention_map

    def get_attention_map(self):
        return self.attention_map

    def transpose_for_scores(self, x):
        """(B, L, all_head_size) -> (B, heads, L, head_size)"""
        return x.view(*x.shape[:-1], self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def project_kv(self, states):
        """Keys and values of `states`, each (B, heads, L, head_size)."""
        return self.transpose_for_scores(self.key(states)), self.transpose_for_scores(self.value(states))

    def forward(self, hidden_states, attention_mask=None, head_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, kv_cache=None, output_attentions=False, cross_kv=None):
        """`kv_cache` (self-attention only): a KVCache holding the keys/values of earlier tokens,
        extended with this call's. `cross_kv`: this layer's precomputed image keys/values."""
        query = self.transpose_for_scores(self.query(hidden_states))

        if self.is_cross_attention:
            mask = encoder_attention_mask
            if cross_kv is not None:
                key, value = cross_kv
            elif encoder_hidden_states is not None:
                key, value = self.project_kv(encoder_hidden_states)
            else:
                raise ValueError("cross-attention needs encoder_hidden_states or cross_kv")
        else:
            mask = attention_mask
            key, value = self.project_kv(hidden_states)
            if kv_cache is not None:
                key, value = kv_cache.update(self.layer_idx, key, value)

        # Shared keys (cross_kv of G images for B = G*r texts, grouped by image): fold the r texts
        # of each image into the query length, so each image's keys are used without copies.
        batch, groups = query.shape[0], key.shape[0]
        if groups != batch:
            if batch % groups:
                raise ValueError(f"cross_kv batch {groups} does not divide the text batch {batch}")
            r, heads, length = batch // groups, query.shape[1], query.shape[2]
            query = query.view(groups, r, heads, length, -1).transpose(1, 2).reshape(groups, heads, r * length, -1)

        context, probs = self._attend(query, key, value, mask, head_mask, output_attentions)

        if groups != batch:
            context = context.view(groups, heads, r, length, -1).transpose(1, 2).reshape(batch, heads, length, -1)
            if probs is not None:
                probs = probs.view(groups, heads, r, length, -1).transpose(1, 2).reshape(batch, heads, length, -1)
        context = context.transpose(1, 2).reshape(batch, -1, self.all_head_size)
        return context, probs

    def _attend(self, query, key, value, mask, head_mask, output_attentions):
        capture = self.is_cross_attention and self.save_attention
        if not (output_attentions or capture or head_mask is not None):
            if mask is not None and mask.dtype != query.dtype:
                # autocast: the float32 mask goes to the compute dtype; clamp so -1e9 stays finite
                mask = mask.clamp(min=torch.finfo(query.dtype).min).to(query.dtype)
            context = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, dropout_p=self.dropout.p if self.training else 0.0)
            return context, None

        scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        if mask is not None:
            scores = scores + mask
        probs = scores.softmax(dim=-1)
        if capture:
            self.save_attention_map(probs)
            if probs.requires_grad:
                probs.register_hook(self.save_attn_gradients)
        dropped = self.dropout(probs)
        if head_mask is not None:
            dropped = dropped * head_mask
        return torch.matmul(dropped, value), (probs if output_attentions else None)


class BertSelfOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        hidden_states = self.dropout(self.dense(hidden_states))
        return self.LayerNorm(hidden_states + input_tensor)


class BertAttention(nn.Module):
    """Attention followed by projection, dropout and the post-norm residual."""

    def __init__(self, config, is_cross_attention=False, layer_idx=None):
        super().__init__()
        self.self = BertSelfAttention(config, is_cross_attention, layer_idx=layer_idx)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states, attention_mask=None, head_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, kv_cache=None, output_attentions=False, cross_kv=None):
        context, probs = self.self(hidden_states, attention_mask, head_mask, encoder_hidden_states,
                                   encoder_attention_mask, kv_cache, output_attentions, cross_kv)
        return self.output(context, hidden_states), probs


class BertIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = activation(config.hidden_act)

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class BertOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        hidden_states = self.dropout(self.dense(hidden_states))
        return self.LayerNorm(hidden_states + input_tensor)


class BertLayer(nn.Module):
    """Self-attention, cross-attention to the image (only when `mode == 'multimodal'`), FFN."""

    def __init__(self, config, layer_num):
        super().__init__()
        self.config = config
        self.layer_num = layer_num
        self.attention = self.build_attention(config, layer_num, is_cross_attention=False)
        if config.add_cross_attention:
            self.crossattention = self.build_attention(config, layer_num, is_cross_attention=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def build_attention(self, config, layer_num, is_cross_attention):
        # a hook for variants (nlvr_encoder.py builds two-image cross-attention here)
        return BertAttention(config, is_cross_attention=is_cross_attention, layer_idx=layer_num)

    def forward(self, hidden_states, attention_mask=None, head_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, kv_cache=None, output_attentions=False, mode=None,
                cross_kv=None):
        attention_output, self_probs = self.attention(
            hidden_states, attention_mask, head_mask, kv_cache=kv_cache,
            output_attentions=output_attentions)

        cross_probs = None
        if mode == 'multimodal':
            if encoder_hidden_states is None and cross_kv is None:
                raise ValueError("mode='multimodal' needs encoder_hidden_states (or cross_kv) for cross-attention")
            if not hasattr(self, 'crossattention'):
                raise ValueError("this text model was built without cross-attention (add_cross_attention=False)")
            attention_output, cross_probs = self.crossattention(
                attention_output, attention_mask, head_mask, encoder_hidden_states, encoder_attention_mask,
                output_attentions=output_attentions, cross_kv=cross_kv)

        layer_output = self.feed_forward_chunk(attention_output)
        return layer_output, self_probs, cross_probs

    def feed_forward_chunk(self, attention_output):
        return self.output(self.intermediate(attention_output), attention_output)


class BertEncoder(nn.Module):
    layer_class = BertLayer

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([self.layer_class(config, i) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def forward(self, hidden_states, attention_mask=None, head_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, kv_cache=None, output_attentions=False, output_hidden_states=False,
                mode='multimodal', cross_kv=None):
        all_hidden_states = () if output_hidden_states else None
        all_self_attentions = () if output_attentions else None
        all_cross_attentions = () if output_attentions and mode == 'multimodal' else None

        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing and kv_cache is not None:
            warnings.warn("a key/value cache is incompatible with activation checkpointing; it is not filled")
            kv_cache = None

        for i, layer_module in enumerate(self.layer):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            layer_head_mask = head_mask[i] if head_mask is not None else None
            layer_cross_kv = cross_kv[i] if cross_kv is not None else None
            args = (hidden_states, attention_mask, layer_head_mask, encoder_hidden_states, encoder_attention_mask,
                    kv_cache, output_attentions, mode, layer_cross_kv)
            if checkpointing:
                hidden_states, self_probs, cross_probs = checkpoint(layer_module, *args, use_reentrant=False)
            else:
                hidden_states, self_probs, cross_probs = layer_module(*args)
            if output_attentions:
                all_self_attentions += (self_probs,)
                if all_cross_attentions is not None:
                    all_cross_attentions += (cross_probs,)

        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return TextModelOutput(last_hidden_state=hidden_states, hidden_states=all_hidden_states,
                               attentions=all_self_attentions, cross_attentions=all_cross_attentions)


class BertPooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states):
        return self.activation(self.dense(hidden_states[:, 0]))


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states):
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        # The output weights are tied to the input embeddings; the bias is output-only. As in the
        # original, `decoder.bias` *is* `bias` (one Parameter under both state-dict keys).
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, hidden_states):
        return self.decoder(self.transform(hidden_states))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, sequence_output):
        return self.predictions(sequence_output)


class BertPreTrainedModel(nn.Module):
    """Base of the MED text models: holds the BertConfig, BERT's weight initialisation and the
    activation-checkpointing switch."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    @property
    def dtype(self):
        """The dtype of the floating-point weights (what additive masks are built in)."""
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

    @torch.no_grad()
    def init_weights(self, module=None):
        """BERT's initialisation of `module` (default: the whole model), children before parents:
        N(0, initializer_range) for Linear and Embedding weights, zero biases, LayerNorm 1/0."""
        std = self.config.initializer_range
        for sub in _post_order(self if module is None else module):
            if isinstance(sub, (nn.Linear, nn.Embedding)):
                nn.init.normal_(sub.weight, mean=0.0, std=std)
            elif isinstance(sub, nn.LayerNorm):
                nn.init.zeros_(sub.bias)
                nn.init.ones_(sub.weight)
            if isinstance(sub, nn.Linear) and sub.bias is not None:
                nn.init.zeros_(sub.bias)
            if isinstance(sub, BertLMPredictionHead):
                nn.init.zeros_(sub.bias)

    def set_grad_checkpointing(self, enable=True):
        """Recompute each text layer in the backward pass instead of keeping its activations."""
        for module in self.modules():
            if isinstance(module, BertEncoder):
                module.gradient_checkpointing = enable


def _post_order(module, seen=None):
    """Every module under `module` once, children before parents (the order, and so the random
    stream, of BERT's initialisation as transformers applied it)."""
    seen = set() if seen is None else seen
    for child in module.children():
        yield from _post_order(child, seen)
    if id(module) not in seen:
        seen.add(id(module))
        yield module


def _expand_head_mask(head_mask, num_layers, dtype):
    """[heads] or [layers, heads] (1 = keep) -> per-layer masks broadcastable to (B, heads, Lq, Lk)."""
    if head_mask is None:
        return None
    if head_mask.dim() == 1:
        head_mask = head_mask[None, None, :, None, None].expand(num_layers, -1, -1, -1, -1)
    elif head_mask.dim() == 2:
        head_mask = head_mask[:, None, :, None, None]
    return head_mask.to(dtype)


class BertModel(BertPreTrainedModel):
    """The MED text model: a text encoder, an image-grounded text encoder or (with
    `is_decoder=True`) the body of the image-grounded text decoder."""

    encoder_class = BertEncoder

    def __init__(self, config, add_pooling_layer=True):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = self.encoder_class(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.init_weights()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def get_extended_attention_mask(self, attention_mask, input_shape, device=None, is_decoder=False):
        """(B, L) or (B, Lq, Lk) 0/1 mask -> additive (B, 1, Lq|1, Lk) mask: 0 to attend, -10000 not.

        For a decoder the causal mask is added; with cached keys (`attention_mask` longer than the
        input) the cached prefix is fully visible.
        """
        if attention_mask.dim() == 3:
            extended = attention_mask[:, None, :, :]
        elif attention_mask.dim() == 2:
            if is_decoder:
                seq_length = input_shape[1]
                prefix = attention_mask.shape[1] - seq_length
                causal = torch.ones(seq_length, attention_mask.shape[1], device=attention_mask.device,
                                    dtype=attention_mask.dtype).tril(diagonal=prefix)
                extended = causal[None, None, :, :] * attention_mask[:, None, None, :]
            else:
                extended = attention_mask[:, None, None, :]
        else:
            raise ValueError(f"attention_mask must be 2D or 3D, got shape {tuple(attention_mask.shape)} "
                             f"for input shape {tuple(input_shape)}")
        extended = extended.to(dtype=self.dtype)
        return (1.0 - extended) * SELF_MASK_VALUE

    def invert_attention_mask(self, encoder_attention_mask):
        """0/1 image mask -> additive mask, with transformers 4.15's constants."""
        if encoder_attention_mask.dim() == 3:
            extended = encoder_attention_mask[:, None, :, :]
        else:
            extended = encoder_attention_mask[:, None, None, :]
        extended = extended.to(dtype=self.dtype)
        return (1.0 - extended) * _cross_mask_value(self.dtype)

    def compute_cross_kv(self, encoder_hidden_states):
        """Project image tokens to every layer's cross-attention keys and values, once.

        Returns a list with one `(key, value)` pair per layer, each (G, heads, L_img, head_size).
        Pass it as `cross_kv=` to `forward` (of this model or of BertLMHeadModel) with a text batch
        of B = G * r rows grouped by image (texts of image g at rows g*r .. g*r + r - 1, i.e. the
        order of `image_embeds.repeat_interleave(r, 0)`; G = 1 shares one image with all texts).
        The result equals passing `encoder_hidden_states=image_embeds.repeat_interleave(r, 0)`.
        """
        return [layer.crossattention.self.project_kv(encoder_hidden_states) for layer in self.encoder.layer]

    def _encoder_mask(self, encoder_hidden_states, encoder_attention_mask, cross_kv, batch_size):
        if cross_kv is not None:
            if encoder_attention_mask is None:
                return None  # all image tokens visible: adding zeros changes nothing
            groups = cross_kv[0][0].shape[0]
            if encoder_attention_mask.shape[0] != groups:
                encoder_attention_mask = encoder_attention_mask[::batch_size // groups]
            return self.invert_attention_mask(encoder_attention_mask)
        if encoder_hidden_states is None:
            return None
        if isinstance(encoder_hidden_states, (list, tuple)):  # NLVR2: one image per branch
            masks = encoder_attention_mask if encoder_attention_mask is not None else [None] * len(encoder_hidden_states)
            return [self.invert_attention_mask(m) if m is not None else None for m in masks]
        if encoder_attention_mask is None:
            return None
        return self.invert_attention_mask(encoder_attention_mask)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, head_mask=None, inputs_embeds=None,
                encoder_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None, kv_cache=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, is_decoder=False,
                mode='multimodal', cross_kv=None):
        """`mode='text'` skips cross-attention; `'multimodal'` cross-attends to
        `encoder_hidden_states` (or to precomputed `cross_kv`, see `compute_cross_kv`).
        `is_decoder=True` makes self-attention causal. `kv_cache` (a KVCache, for decoding): the
        keys/values of earlier tokens; `input_ids` then holds only the new tokens."""
        config = self.config
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else config.return_dict

        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("pass either input_ids or inputs_embeds, not both")
        if input_ids is not None:
            input_shape, device = input_ids.shape, input_ids.device
        elif inputs_embeds is not None:
            input_shape, device = inputs_embeds.shape[:-1], inputs_embeds.device
        elif encoder_embeds is not None:
            input_shape, device = encoder_embeds.shape[:-1], encoder_embeds.device
        else:
            raise ValueError("pass input_ids, inputs_embeds or encoder_embeds")
        batch_size, seq_length = input_shape

        if kv_cache is not None and not isinstance(kv_cache, KVCache):
            raise TypeError(f"kv_cache must be a models.generation.KVCache, got {type(kv_cache).__name__}")
        past_length = kv_cache.get_seq_length() if kv_cache is not None else 0

        if attention_mask is None:
            attention_mask = torch.ones(batch_size, seq_length + past_length, device=device)
        extended_attention_mask = self.get_extended_attention_mask(attention_mask, input_shape, device, is_decoder)
        encoder_extended_attention_mask = (
            self._encoder_mask(encoder_hidden_states, encoder_attention_mask, cross_kv, batch_size)
            if mode == 'multimodal' else None)
        head_mask = _expand_head_mask(head_mask, config.num_hidden_layers, self.dtype)

        if encoder_embeds is None:
            embedding_output = self.embeddings(input_ids=input_ids, position_ids=position_ids,
                                               inputs_embeds=inputs_embeds, past_key_values_length=past_length)
        else:
            embedding_output = encoder_embeds

        outputs = self.encoder(
            embedding_output, attention_mask=extended_attention_mask, head_mask=head_mask,
            encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_extended_attention_mask,
            kv_cache=kv_cache, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            mode=mode, cross_kv=cross_kv)
        if self.pooler is not None:
            outputs.pooler_output = self.pooler(outputs.last_hidden_state)
        return outputs if return_dict else outputs.to_tuple()


def smoothed_sequence_loss(logits, targets, label_smoothing=0.1):
    """Per-sequence label-smoothed next-token loss, exactly as the original computed it.

    The original calls CrossEntropyLoss(reduction='none', label_smoothing=0.1) under torch
    1.10, which adds the smoothing term -(0.1/V) * sum_v log p_v at every position, ignored
    (-100) ones included; later torch versions zero it there. VQA training losses and answer
    ranking depend on this (a padded, shorter candidate pays the term for its padding), so
    it is reproduced here: BertLMHeadModel's reduction='none' and BLIP_VQA use it. logits: (N, L, V) for input positions; targets: (N, L) input ids
    with -100 where no loss is due. Position t predicts token t + 1. Returns (N,).

    Written with logsumexp rather than log_softmax so no second (N, L, V) tensor is made.
    """
    logits = logits[:, :-1, :].float()
    targets = targets[:, 1:]
    log_norm = logits.logsumexp(dim=-1)
    valid = targets != -100
    target_logits = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    nll = torch.where(valid, log_norm - target_logits, torch.zeros_like(log_norm))
    smooth = log_norm - logits.mean(dim=-1)
    return ((1.0 - label_smoothing) * nll + label_smoothing * smooth).sum(dim=1)



class BertLMHeadModel(BertPreTrainedModel):
    """The image-grounded text decoder: BertModel (causal) + LM head tied to the word embeddings."""

    def __init__(self, config):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)  # initialised by its own constructor
        self.cls = BertOnlyMLMHead(config)
        self.init_weights(self.cls)
        # one tensor under both state-dict keys, as in the original
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, head_mask=None, inputs_embeds=None,
                encoder_hidden_states=None, encoder_attention_mask=None, labels=None, kv_cache=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, return_logits=False,
                is_decoder=True, reduction='mean', mode='multimodal', cross_kv=None):
        """With `labels`: next-token loss with label smoothing 0.1 (-100 positions ignored),
        `reduction='mean'` over tokens or `'none'`: one summed loss per sequence.
        `return_logits=True` returns only the shifted logits (B, L-1, vocab)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.bert(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, head_mask=head_mask,
            inputs_embeds=inputs_embeds, encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask, kv_cache=kv_cache, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=True, is_decoder=is_decoder, mode=mode,
            cross_kv=cross_kv)
        prediction_scores = self.cls(outputs.last_hidden_state)

        if return_logits:
            return prediction_scores[:, :-1, :].contiguous()

        lm_loss = None
        if labels is not None:
            # next-token prediction: position t predicts token t + 1
            if reduction == 'none':  # one loss per sequence, as the original (torch 1.10) computed it
                lm_loss = smoothed_sequence_loss(prediction_scores, labels)
            else:
                shifted_scores = prediction_scores[:, :-1, :]
                lm_loss = F.cross_entropy(shifted_scores.reshape(-1, shifted_scores.shape[-1]),
                                          labels[:, 1:].reshape(-1), reduction=reduction, label_smoothing=0.1)

        output = LMOutput(loss=lm_loss, logits=prediction_scores, hidden_states=outputs.hidden_states,
                          attentions=outputs.attentions, cross_attentions=outputs.cross_attentions)
        return output if return_dict else output.to_tuple()

    @torch.no_grad()
    def generate(self, input_ids, encoder_hidden_states, encoder_attention_mask=None, max_length=20, min_length=0,
                 num_beams=1, do_sample=False, top_k=50, top_p=1.0, repetition_penalty=1.0, eos_token_id=None,
                 pad_token_id=0, num_return_sequences=1, length_penalty=1.0, early_stopping=False, use_cache=True,
                 return_dict_in_generate=False):
        """Greedy search, beam search (transformers 4.15's rules) or nucleus sampling from the
        prompts `input_ids`, cross-attending to `encoder_hidden_states`; see models/generation.py.
        Keywords and defaults are transformers 4.15's generate(). The image goes in with one row
        per prompt; callers written for transformers 4.x that repeat it per beam themselves
        (`repeat_interleave(num_beams, 0)`) get the same result.

        Returns the token ids (rows, length), or with `return_dict_in_generate` a GenerateOutput
        (`sequences`, and `sequences_scores` for beam search)."""
        expand, batch = max(num_beams, num_return_sequences), input_ids.shape[0]
        if expand > 1 and encoder_hidden_states.shape[0] == batch * expand:
            encoder_hidden_states = encoder_hidden_states[::expand]
            if encoder_attention_mask is not None and encoder_attention_mask.shape[0] == batch * expand:
                encoder_attention_mask = encoder_attention_mask[::expand]
        output = generation.generate(
            self, input_ids, encoder_hidden_states, encoder_attention_mask, max_length=max_length,
            min_length=min_length, num_beams=num_beams, do_sample=do_sample, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
            num_return_sequences=num_return_sequences, length_penalty=length_penalty,
            early_stopping=early_stopping, use_cache=use_cache)
        return output if return_dict_in_generate else output.sequences


# ----------------------------------------------------------------------------- BERT weights

BERT_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')


def load_bert_weights(model, checkpoint):
    """Load a BERT checkpoint in transformers' layout into a BertModel or BertLMHeadModel, as
    the original's `from_pretrained('bert-base-uncased')` did: the checkpoint's weights where
    names and shapes match (`bert.` prefixes and the old LayerNorm gamma/beta names handled),
    everything else (cross-attention, new tokens) keeps its fresh initialisation.

    `checkpoint`: a folder holding model.safetensors or pytorch_model.bin, one such file, or a
    hub name (e.g. 'bert-base-uncased'; fetched once through huggingface_hub's cache).
    Returns the torch load result (missing_keys, unexpected_keys)."""
    path = _bert_weight_file(str(checkpoint))
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, map_location='cpu', weights_only=True)
    own = model.state_dict()
    has_prefix = all(key.startswith('bert.') or key.startswith('cls.') for key in own)
    renamed = {}
    for key, value in state.items():
        key = key.replace('LayerNorm.gamma', 'LayerNorm.weight').replace('LayerNorm.beta', 'LayerNorm.bias')
        if has_prefix and not (key.startswith('bert.') or key.startswith('cls.')):
            key = 'bert.' + key  # a bare BertModel checkpoint into the LM model
        elif not has_prefix and key.startswith('bert.'):
            key = key[len('bert.'):]
        if key in own and own[key].shape != value.shape:
            raise ValueError(f"BERT checkpoint {path}: {key} has shape {tuple(value.shape)}, the model "
                             f"{tuple(own[key].shape)} (is the med/bert config the checkpoint's?)")
        renamed[key] = value
    result = model.load_state_dict(renamed, strict=False)
    loaded = len(set(renamed) & set(own))
    if not loaded:
        raise ValueError(f"BERT checkpoint {path} holds no weight of {type(model).__name__}")
    print(f"loaded {loaded} BERT weights from {path}; newly initialised: {len(result.missing_keys)}, "
          f"unused: {len(result.unexpected_keys)}")
    return result


def _bert_weight_file(checkpoint):
    if os.path.isfile(checkpoint):
        return checkpoint
    if os.path.isdir(checkpoint):
        for name in BERT_WEIGHT_FILES:
            if os.path.isfile(os.path.join(checkpoint, name)):
                return os.path.join(checkpoint, name)
        raise FileNotFoundError(f"BERT checkpoint folder {checkpoint} holds none of {list(BERT_WEIGHT_FILES)}")
    if Path(checkpoint).is_absolute() or checkpoint.startswith('.') or checkpoint.count('/') > 1:
        raise FileNotFoundError(f"BERT checkpoint {checkpoint}: no such file or folder")
    return _hub_bert_weight_file(checkpoint)


def _hub_bert_weight_file(name):
    """A hub BERT's weight file: from huggingface_hub's cache when there, else downloaded once."""
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import hf_hub_download

    for filename in BERT_WEIGHT_FILES:
        try:
            return hf_hub_download(name, filename, local_files_only=True)
        except Exception:  # not cached (or an incomplete cache): try the hub below
            pass
    not_in_repository = getattr(hub_errors, 'RemoteEntryNotFoundError', hub_errors.EntryNotFoundError)
    problems = []
    for filename in BERT_WEIGHT_FILES:
        try:
            return hf_hub_download(name, filename)
        except not_in_repository as error:  # the repository has the other file format
            problems.append(f"{filename}: {type(error).__name__}")
        except Exception as error:  # offline or no such repository: no point trying another file
            problems.append(f"{filename}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            break
    raise FileNotFoundError(
        f"BERT checkpoint {name!r} is not a local file or folder and could not be fetched from the model hub "
        f"({'; '.join(problems)}). Download it once where the hub is reachable, pass its local folder, or "
        f"set bert_checkpoint to null for a random text initialisation.")
