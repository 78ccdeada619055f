"""The NLVR2 text encoder: MED with one cross-attention branch per image.

A sentence is judged against two images. Every layer's cross-attention has twin branches
(`crossattention.self0` / `self1`, output projections `dense0` / `dense1`), each attending to one
image; their outputs are averaged, and from layer 6 on they are concatenated and merged by a
learned `merge_layer` instead. Everything else is med.py's; only the attention blocks differ.
Pass `encoder_hidden_states=[image0_embeds, image1_embeds]` (and a list of two masks).

Parameter names and order are the original's (`models/nlvr_encoder.py`), so NLVR2 checkpoints
load unchanged and the checkpoint loader in blip_nlvr.py can map a single cross-attention onto
both branches.
"""
import torch
from torch import nn

from models import med
from models.med import BertConfig  # noqa: F401  (re-exported, as the original module did)

MERGE_FROM_LAYER = 6


class BertSelfOutput(nn.Module):
    """Output projection + residual LayerNorm; with `twin`, one projection per image branch,
    averaged (or merged by `merge_layer` when `merge`)."""

    def __init__(self, config, twin=False, merge=False):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        if twin:
            self.dense0 = nn.Linear(config.hidden_size, config.hidden_size)
            self.dense1 = nn.Linear(config.hidden_size, config.hidden_size)
        else:
            self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.merge = merge
        if merge:
            self.act = med.activation(config.hidden_act)  # built but unused, as in the original
            self.merge_layer = nn.Linear(config.hidden_size * 2, config.hidden_size)

    def forward(self, hidden_states, input_tensor):
        if isinstance(hidden_states, (list, tuple)):
            states0 = self.dense0(hidden_states[0])
            states1 = self.dense1(hidden_states[1])
            if self.merge:
                hidden_states = self.merge_layer(torch.cat([states0, states1], dim=-1))
            else:
                hidden_states = (states0 + states1) / 2
        else:
            hidden_states = self.dense(hidden_states)
        hidden_states = self.dropout(hidden_states)
        return self.LayerNorm(hidden_states + input_tensor)


class BertAttention(nn.Module):
    """Self-attention (one branch) or twin cross-attention (two branches, one per image)."""

    def __init__(self, config, is_cross_attention=False, layer_num=-1):
        super().__init__()
        self.is_cross_attention = is_cross_attention
        if is_cross_attention:
            self.self0 = med.BertSelfAttention(config, is_cross_attention=True)
            self.self1 = med.BertSelfAttention(config, is_cross_attention=True)
        else:
            self.self = med.BertSelfAttention(config, is_cross_attention=False, layer_idx=layer_num)
        self.output = BertSelfOutput(config, twin=is_cross_attention,
                                     merge=is_cross_attention and layer_num >= MERGE_FROM_LAYER)

    def forward(self, hidden_states, attention_mask=None, head_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, kv_cache=None, output_attentions=False, cross_kv=None):
        if not self.is_cross_attention:
            context, probs = self.self(hidden_states, attention_mask, head_mask, kv_cache=kv_cache,
                                       output_attentions=output_attentions)
            return self.output(context, hidden_states), probs

        if not isinstance(encoder_hidden_states, (list, tuple)) or len(encoder_hidden_states) != 2:
            raise ValueError("the NLVR2 encoder cross-attends to two images: pass encoder_hidden_states="
                             "[image0_embeds, image1_embeds]")
        if cross_kv is not None:
            raise ValueError("cross_kv is not supported by the two-image NLVR2 encoder")
        masks = encoder_attention_mask if encoder_attention_mask is not None else [None, None]
        context0, probs0 = self.self0(hidden_states, attention_mask, head_mask, encoder_hidden_states[0], masks[0],
                                      output_attentions=output_attentions)
        context1, _ = self.self1(hidden_states, attention_mask, head_mask, encoder_hidden_states[1], masks[1],
                                 output_attentions=output_attentions)
        return self.output([context0, context1], hidden_states), probs0


class BertLayer(med.BertLayer):
    def build_attention(self, config, layer_num, is_cross_attention):
        return BertAttention(config, is_cross_attention=is_cross_attention, layer_num=layer_num)


class BertEncoder(med.BertEncoder):
    layer_class = BertLayer


class BertModel(med.BertModel):
    """MED text encoder whose multimodal mode reasons over an image pair."""
    encoder_class = BertEncoder
