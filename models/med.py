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
- generation goes through transformers' `generate()` with its Cache classes: the self-attention
  cache grows per step, cross-attention keys/values are computed once and reused at every step;
  beam search reproduces transformers 4.15's beam scorer, so captions match the original token
  for token (see `BertLMHeadModel._beam_search`);
- `BertModel.compute_cross_kv(image_embeds)` / `cross_kv=` let a caller that scores many texts
  against the same image (retrieval re-ranking, VQA answer ranking) project the image keys and
  values once per image instead of once per text;
- optional activation checkpointing of the text layers (`encoder.gradient_checkpointing = True`
  or `gradient_checkpointing_enable()`).
"""
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.generation import GenerateBeamDecoderOnlyOutput, StoppingCriteriaList
from transformers.modeling_outputs import (
    BaseModelOutputWithPastAndCrossAttentions,
    BaseModelOutputWithPoolingAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
)
from transformers.models.bert.configuration_bert import BertConfig

__all__ = ['BertConfig', 'BertModel', 'BertLMHeadModel', 'BertEncoder', 'BertLayer', 'BertAttention',
           'BertSelfAttention', 'BertSelfOutput', 'BertEmbeddings', 'BertPreTrainedModel']

# Additive mask values of the original: self-attention masks use -10000 (BLIP's
# get_extended_attention_mask); the image mask goes through transformers 4.15's
# invert_attention_mask, which used -1e9 in float32 and -1e4 in float16.
SELF_MASK_VALUE = -10000.0


def _cross_mask_value(dtype):
    return -1e4 if dtype == torch.float16 else -1e9


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

    def _cached_cross_kv(self, encoder_hidden_states, cache):
        # In generation the image does not change: project it at the first step, reuse afterwards.
        if isinstance(cache, EncoderDecoderCache) and self.layer_idx is not None:
            if cache.is_updated.get(self.layer_idx):
                layer = cache.cross_attention_cache.layers[self.layer_idx]
                return layer.keys, layer.values
            key, value = self.project_kv(encoder_hidden_states)
            key, value = cache.cross_attention_cache.update(key, value, self.layer_idx)
            cache.is_updated[self.layer_idx] = True
            return key, value
        return self.project_kv(encoder_hidden_states)

    def forward(self, hidden_states, attention_mask=None, head_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, past_key_values=None, output_attentions=False, cross_kv=None):
        query = self.transpose_for_scores(self.query(hidden_states))

        if self.is_cross_attention:
            mask = encoder_attention_mask
            if cross_kv is not None:
                key, value = cross_kv
            else:
                if encoder_hidden_states is None:
                    raise ValueError("cross-attention needs encoder_hidden_states or cross_kv")
                key, value = self._cached_cross_kv(encoder_hidden_states, past_key_values)
        else:
            mask = attention_mask
            key, value = self.project_kv(hidden_states)
            if past_key_values is not None:
                cache = past_key_values
                if isinstance(cache, EncoderDecoderCache):
                    cache = cache.self_attention_cache
                key, value = cache.update(key, value, self.layer_idx)

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
                encoder_attention_mask=None, past_key_values=None, output_attentions=False, cross_kv=None):
        context, probs = self.self(hidden_states, attention_mask, head_mask, encoder_hidden_states,
                                   encoder_attention_mask, past_key_values, output_attentions, cross_kv)
        return self.output(context, hidden_states), probs


class BertIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        act = config.hidden_act
        self.intermediate_act_fn = ACT2FN[act] if isinstance(act, str) else act

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
                encoder_attention_mask=None, past_key_values=None, output_attentions=False, mode=None,
                cross_kv=None):
        attention_output, self_probs = self.attention(
            hidden_states, attention_mask, head_mask, past_key_values=past_key_values,
            output_attentions=output_attentions)

        cross_probs = None
        if mode == 'multimodal':
            if encoder_hidden_states is None and cross_kv is None:
                raise ValueError("mode='multimodal' needs encoder_hidden_states (or cross_kv) for cross-attention")
            if not hasattr(self, 'crossattention'):
                raise ValueError("this text model was built without cross-attention (add_cross_attention=False)")
            attention_output, cross_probs = self.crossattention(
                attention_output, attention_mask, head_mask, encoder_hidden_states, encoder_attention_mask,
                past_key_values=past_key_values, output_attentions=output_attentions, cross_kv=cross_kv)

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
                encoder_attention_mask=None, past_key_values=None, use_cache=None, output_attentions=False,
                output_hidden_states=False, return_dict=True, mode='multimodal', cross_kv=None):
        all_hidden_states = () if output_hidden_states else None
        all_self_attentions = () if output_attentions else None
        all_cross_attentions = () if output_attentions and mode == 'multimodal' else None

        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing and past_key_values is not None:
            warnings.warn("use_cache is incompatible with activation checkpointing; the cache is not filled")
            past_key_values = None

        for i, layer_module in enumerate(self.layer):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            layer_head_mask = head_mask[i] if head_mask is not None else None
            layer_cross_kv = cross_kv[i] if cross_kv is not None else None
            args = (hidden_states, attention_mask, layer_head_mask, encoder_hidden_states, encoder_attention_mask,
                    past_key_values, output_attentions, mode, layer_cross_kv)
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
        next_cache = past_key_values if use_cache else None
        if not return_dict:
            return tuple(v for v in [hidden_states, next_cache, all_hidden_states, all_self_attentions,
                                     all_cross_attentions] if v is not None)
        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden_states, past_key_values=next_cache, hidden_states=all_hidden_states,
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
        act = config.hidden_act
        self.transform_act_fn = ACT2FN[act] if isinstance(act, str) else act
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


class BertPreTrainedModel(PreTrainedModel):
    config_class = BertConfig
    base_model_prefix = "bert"
    supports_gradient_checkpointing = True
    _keys_to_ignore_on_load_missing = [r"position_ids"]

    @torch.no_grad()
    def _init_weights(self, module):
        """The original BERT initialisation: N(0, initializer_range) weights, zero biases."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.zeros_(module.bias)
            init.ones_(module.weight)
        if isinstance(module, nn.Linear) and module.bias is not None:
            init.zeros_(module.bias)
        if isinstance(module, BertLMPredictionHead):
            init.zeros_(module.bias)
        if isinstance(module, BertEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))


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
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = self.encoder_class(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.post_init()

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
                encoder_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None, past_key_values=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                is_decoder=False, mode='multimodal', cross_kv=None):
        """`mode='text'` skips cross-attention; `'multimodal'` cross-attends to
        `encoder_hidden_states` (or to precomputed `cross_kv`, see `compute_cross_kv`).
        `is_decoder=True` makes self-attention causal and enables the key/value cache."""
        config = self.config
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else config.return_dict
        use_cache = (use_cache if use_cache is not None else config.use_cache) if is_decoder else False

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

        if past_key_values is not None and not isinstance(past_key_values, Cache):
            raise TypeError("past_key_values must be a transformers Cache (DynamicCache / EncoderDecoderCache), "
                            f"got {type(past_key_values).__name__}")
        if use_cache and past_key_values is None:
            past_key_values = (EncoderDecoderCache(DynamicCache(), DynamicCache())
                               if mode == 'multimodal' and encoder_hidden_states is not None else DynamicCache())
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0

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

        encoder_outputs = self.encoder(
            embedding_output, attention_mask=extended_attention_mask, head_mask=head_mask,
            encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_extended_attention_mask,
            past_key_values=past_key_values, use_cache=use_cache, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=True, mode=mode, cross_kv=cross_kv)
        sequence_output = encoder_outputs.last_hidden_state
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None

        if not return_dict:
            rest = tuple(v for v in [encoder_outputs.past_key_values, encoder_outputs.hidden_states,
                                     encoder_outputs.attentions, encoder_outputs.cross_attentions] if v is not None)
            return (sequence_output, pooled_output) + rest
        return BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=sequence_output, pooler_output=pooled_output,
            past_key_values=encoder_outputs.past_key_values, hidden_states=encoder_outputs.hidden_states,
            attentions=encoder_outputs.attentions, cross_attentions=encoder_outputs.cross_attentions)


class _BeamHypotheses:
    """Finished hypotheses of one batch item, kept exactly as transformers 4.15's BeamHypotheses
    (score = sum of log-probs / length ** length_penalty, length counting the prompt and not the
    final [SEP]; ties resolved in insertion order)."""

    def __init__(self, num_beams, length_penalty, early_stopping):
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.beams = []
        self.worst_score = 1e9

    def __len__(self):
        return len(self.beams)

    def add(self, hyp, sum_logprobs):
        score = sum_logprobs / (hyp.shape[-1] ** self.length_penalty)
        if len(self) < self.num_beams or score > self.worst_score:
            self.beams.append((score, hyp))
            if len(self) > self.num_beams:
                ranked = sorted((s, idx) for idx, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs, cur_len):
        if len(self) < self.num_beams:
            return False
        if self.early_stopping:
            return True
        return self.worst_score >= best_sum_logprobs / cur_len ** self.length_penalty


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



class BertLMHeadModel(BertPreTrainedModel, GenerationMixin):
    """The image-grounded text decoder: BertModel (causal) + LM head tied to the word embeddings."""

    _keys_to_ignore_on_load_unexpected = [r"pooler"]
    _keys_to_ignore_on_load_missing = [r"position_ids", r"predictions.decoder.bias"]
    _tied_weights_keys = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()
        # tie explicitly as well: the state dict must hold one tensor under both keys, whatever
        # the transformers tying rules decide for this config
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def get_input_embeddings(self):
        return self.bert.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.bert.embeddings.word_embeddings = value

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings
        if new_embeddings.bias is not None:
            self.cls.predictions.bias = new_embeddings.bias

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, head_mask=None, inputs_embeds=None,
                encoder_hidden_states=None, encoder_attention_mask=None, labels=None, past_key_values=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                return_logits=False, is_decoder=True, reduction='mean', mode='multimodal', cross_kv=None):
        """With `labels`: next-token loss with label smoothing 0.1 (-100 positions ignored),
        `reduction='mean'` over tokens or `'none'`: one summed loss per sequence.
        `return_logits=True` returns only the shifted logits (B, L-1, vocab)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if labels is not None:
            use_cache = False

        outputs = self.bert(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, head_mask=head_mask,
            inputs_embeds=inputs_embeds, encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask, past_key_values=past_key_values, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
            is_decoder=is_decoder, mode=mode, cross_kv=cross_kv)
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

        if not return_dict:
            rest = tuple(v for v in [outputs.past_key_values, outputs.hidden_states, outputs.attentions,
                                     outputs.cross_attentions] if v is not None)
            output = (prediction_scores,) + rest
            return ((lm_loss,) + output) if lm_loss is not None else output
        return CausalLMOutputWithCrossAttentions(
            loss=lm_loss, logits=prediction_scores, past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            cross_attentions=outputs.cross_attentions)

    # ---------------------------------------------------------------- generation

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, **model_kwargs):
        if attention_mask is None:  # generate() drops all-ones masks
            attention_mask = input_ids.new_ones(input_ids.shape)
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past_length:
            input_ids = input_ids[:, past_length:]  # only the tokens the cache has not seen
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
            "encoder_hidden_states": model_kwargs.get("encoder_hidden_states"),
            "encoder_attention_mask": model_kwargs.get("encoder_attention_mask"),
            "use_cache": model_kwargs.get("use_cache"),
            "is_decoder": True,
        }
        if "mode" in model_kwargs:
            inputs["mode"] = model_kwargs["mode"]
        return inputs

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # generate() makes a DynamicCache for decoder-only models; with image cross-attention we
        # want an EncoderDecoderCache so the image keys/values are projected once per sequence.
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        if (isinstance(cache, DynamicCache) and not getattr(cache, "_is_user_defined", False)
                and model_kwargs.get("encoder_hidden_states") is not None):
            model_kwargs["past_key_values"] = EncoderDecoderCache(cache, DynamicCache())

    def generate(self, input_ids=None, **kwargs):
        """transformers' generate(). The image goes in as `encoder_hidden_states` with one row per
        prompt: generate() repeats it for every beam itself. Callers written for transformers 4.x
        that repeat it per beam already (`repeat_interleave(num_beams, 0)`) are accepted too."""
        states = kwargs.get("encoder_hidden_states")
        if input_ids is not None and isinstance(states, torch.Tensor):
            config = kwargs.get("generation_config") or self.generation_config
            expand = max(kwargs.get("num_beams") or config.num_beams or 1,
                         kwargs.get("num_return_sequences") or config.num_return_sequences or 1)
            batch = input_ids.shape[0]
            if expand > 1 and states.shape[0] == batch * expand:
                kwargs["encoder_hidden_states"] = states[::expand]
                mask = kwargs.get("encoder_attention_mask")
                if isinstance(mask, torch.Tensor) and mask.shape[0] == batch * expand:
                    kwargs["encoder_attention_mask"] = mask[::expand]
            elif states.shape[0] != batch:
                raise ValueError(f"encoder_hidden_states has {states.shape[0]} rows for {batch} prompts")
        return super().generate(input_ids=input_ids, **kwargs)

    def _beam_search(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                     **model_kwargs):
        """Beam search as transformers 4.15 ran it (the release BLIP was trained and evaluated with).

        transformers 5 normalises finished beams by the generated length (prompt excluded, final
        [SEP] included) and finalises beams at max_length differently, which changes captions.
        Here hypotheses are scored by their full length without the [SEP], running beams are
        added at the end unless the item is done, and an item is done when its worst kept
        hypothesis beats the best candidate score / current length. Sampling beam search keeps
        transformers' implementation.
        """
        if generation_config.do_sample:
            return super()._beam_search(input_ids, logits_processor, stopping_criteria, generation_config,
                                        synced_gpus=synced_gpus, **model_kwargs)
        num_beams = generation_config.num_beams
        batch_beams, cur_len = input_ids.shape
        batch_size = batch_beams // num_beams
        length_penalty = generation_config.length_penalty if generation_config.length_penalty is not None else 1.0
        early_stopping = generation_config.early_stopping is True
        num_keep = generation_config.num_return_sequences or 1
        if num_keep > num_beams:
            raise ValueError(f"num_return_sequences {num_keep} > num_beams {num_beams}")
        max_length = generation_config.max_length
        eos_tensor = generation_config._eos_token_tensor
        eos_ids = set(eos_tensor.view(-1).tolist()) if eos_tensor is not None else set()
        pad_tensor = generation_config._pad_token_tensor
        pad_id = int(pad_tensor) if pad_tensor is not None else (min(eos_ids) if eos_ids else 0)
        final_eos = int(eos_tensor.view(-1)[0]) if eos_tensor is not None else pad_id
        # [SEP] ends a beam by moving it to the hypotheses, not through a stopping criterion
        stop_criteria = StoppingCriteriaList([c for c in stopping_criteria if not hasattr(c, "eos_token_id")])
        device = input_ids.device

        hyps = [_BeamHypotheses(num_beams, length_penalty, early_stopping) for _ in range(batch_size)]
        done = [False] * batch_size
        beam_scores = torch.zeros(batch_size, num_beams, dtype=torch.float, device=device)
        beam_scores[:, 1:] = -1e9  # all beams start equal: only expand the first one
        beam_scores = beam_scores.view(-1)

        outputs = self._prefill(input_ids, generation_config, model_kwargs)
        while True:
            model_kwargs = self._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)
            logits = outputs.logits[:, -1, :].float()
            del outputs
            scores = logits_processor(input_ids, F.log_softmax(logits, dim=-1))
            vocab_size = scores.shape[-1]
            scores = (scores + beam_scores[:, None]).view(batch_size, num_beams * vocab_size)
            top_scores, top_ids = torch.topk(scores, 2 * num_beams, dim=1, largest=True, sorted=True)
            top_beams = (top_ids // vocab_size).tolist()
            top_tokens = (top_ids % vocab_size).tolist()
            top_scores_list = top_scores.tolist()

            # 4.15's BeamSearchScorer.process: walk the candidates best first; an [SEP] among the
            # top num_beams becomes a finished hypothesis, the others fill the running beams
            was_done = list(done)
            chosen_rank = [[0] * num_beams for _ in range(batch_size)]
            next_tokens = [[pad_id] * num_beams for _ in range(batch_size)]
            next_rows = [[b * num_beams] * num_beams for b in range(batch_size)]
            for b in range(batch_size):
                if was_done[b]:
                    continue  # finished item: keep padding
                kept = 0
                for rank, (beam, token) in enumerate(zip(top_beams[b], top_tokens[b])):
                    row = b * num_beams + beam
                    if token in eos_ids:
                        if rank >= num_beams:
                            continue
                        hyps[b].add(input_ids[row].clone(), top_scores_list[b][rank])
                    else:
                        chosen_rank[b][kept] = rank
                        next_tokens[b][kept] = token
                        next_rows[b][kept] = row
                        kept += 1
                    if kept == num_beams:
                        break
                done[b] = done[b] or hyps[b].is_done(max(top_scores_list[b]), cur_len)

            next_scores = top_scores.gather(1, torch.tensor(chosen_rank, device=device))
            finished = torch.tensor(was_done, device=device)
            next_scores = next_scores.masked_fill(finished[:, None], 0.0)
            beam_scores = next_scores.view(-1)
            beam_idx = torch.tensor(next_rows, device=device).view(-1)
            tokens = torch.tensor(next_tokens, device=device, dtype=input_ids.dtype).view(-1, 1)
            input_ids = torch.cat([input_ids[beam_idx], tokens], dim=-1)
            cache = model_kwargs.get("past_key_values")
            if cache is not None:
                cache.reorder_cache(beam_idx)
            cur_len += 1
            if all(done) or cur_len >= max_length or bool(stop_criteria(input_ids, None).all()):
                break
            model_inputs = self.prepare_inputs_for_generation(input_ids, **model_kwargs)
            outputs = self(**model_inputs, return_dict=True)

        # finalise: unfinished items compete with their running beams
        for b in range(batch_size):
            if done[b]:
                continue
            for j in range(num_beams):
                row = b * num_beams + j
                hyps[b].add(input_ids[row], beam_scores[row].item())

        best, best_scores = [], []
        for hyp in hyps:
            ranked = sorted(hyp.beams, key=lambda x: x[0])
            for _ in range(num_keep):
                score, seq = ranked.pop()
                best.append(seq)
                best_scores.append(score)
        lengths = [len(seq) for seq in best]
        out_len = min(max(lengths) + 1, max_length)
        sequences = torch.full((len(best), out_len), pad_id, dtype=input_ids.dtype, device=device)
        for i, seq in enumerate(best):
            sequences[i, :lengths[i]] = seq
            if lengths[i] < max_length:
                sequences[i, lengths[i]] = final_eos

        if generation_config.return_dict_in_generate:
            return GenerateBeamDecoderOnlyOutput(
                sequences=sequences, sequences_scores=torch.tensor(best_scores, device=device),
                past_key_values=model_kwargs.get("past_key_values"))
        return sequences
