"""BLIP for image-text retrieval (COCO, Flickr30k, MSRVTT zero-shot).

Two objectives, as in the original release:
- ITC: image/text [CLS] features projected to `embed_dim`, contrasted against the current
  batch plus a queue of momentum-encoder features; the targets mix the one-hot pairing with
  the momentum model's own similarities (momentum distillation, weight `alpha`).
- ITM: the text encoder in multimodal mode classifies (image, text) pairs as matched or
  not; each positive pair comes with one hard negative image per text and one hard negative
  text per image, sampled in proportion to their ITC similarity.

The momentum encoders, the queues and the step in parts come from models/momentum.py; the
two losses (`contrastive_loss`, `matching_loss`) and the negative sampler are module
functions because BLIP_Pretrain uses the same ones.
"""
import torch
import torch.nn.functional as F
from torch import nn

from models.blip import create_vit, init_tokenizer, load_med_config, load_pretrained
from models.med import BertModel
from models.momentum import MomentumQueues


class BLIP_Retrieval(MomentumQueues, nn.Module):
    queue_pointer = 'ptr_queue'  # the original's buffer name (BLIP_Pretrain's is queue_ptr)
    max_text_length = 35

    def __init__(
        self,
        med_config='configs/med_config.json',
        image_size=384,
        vit='base',
        vit_grad_ckpt=False,
        vit_ckpt_layer=0,
        embed_dim=256,
        queue_size=57600,
        momentum=0.995,
        negative_all_rank=False,
    ):
        """
        Args:
            med_config: path of the MED (text model) JSON config.
            image_size: input image size.
            vit: 'base', 'large' or a mapping {width, depth, heads, patch_size}.
            embed_dim: width of the ITC projections.
            queue_size: number of momentum features kept for ITC (a multiple of the global batch).
            momentum: EMA factor of the momentum encoders.
            negative_all_rank: sample ITM hard negatives from every rank's batch, not only this one.
        """
        super().__init__()
        self.visual_encoder, vision_width = create_vit(vit, image_size, vit_grad_ckpt, vit_ckpt_layer)
        self.tokenizer = init_tokenizer()
        med_config = load_med_config(med_config, vision_width)
        self.text_encoder = BertModel(config=med_config, add_pooling_layer=False)
        text_width = self.text_encoder.config.hidden_size

        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.itm_head = nn.Linear(text_width, 2)

        # Momentum encoders and queues (models/momentum.py); idx_queue: the queued features' image ids.
        self.init_momentum(vit, image_size, embed_dim, queue_size, momentum, id_queue=True)
        self.temp = nn.Parameter(0.07 * torch.ones([]))
        self.negative_all_rank = negative_all_rank

    def forward(self, image, caption, alpha, idx):
        """Returns (loss_ita, loss_itm) for a batch of images, captions and image ids `idx`."""
        return self.contrastive_forward(image, caption, alpha, idx)

    @property
    def gathers_image_embeds(self):
        return self.negative_all_rank

    def rank_losses(self, own, world, alpha):
        """(loss_ita, loss_itm) of one rank: own is its RankBatch, world the global batch."""
        # ============== Image-text contrastive learning ==============
        # The original builds id-aware targets (every queue entry with the same image id counts
        # as positive) and then overwrites them with the plain diagonal before use; the
        # diagonal is what it trains with, so contrastive_loss uses it.
        loss_ita, _, _ = contrastive_loss(own.image_feat, own.text_feat, own.image_feat_m, own.text_feat_m,
                                          self.image_queue, self.text_queue, self.temp, alpha)

        # ============== Image-text matching ==============
        text, idx = own.text, own.idx
        encoder_input_ids = with_first_token(text.input_ids, self.tokenizer.enc_token_id)

        def hard_negatives():
            # Candidates: this rank's batch, or every rank's batch.
            if self.negative_all_rank:
                idx_world, image_feat_world, text_feat_world = world.idx, world.image_feat, world.text_feat
                image_embeds_world = world.image_embeds
                input_ids_world = with_first_token(world.input_ids, self.tokenizer.enc_token_id)
                att_mask_world, offset = world.attention_mask, world.offset
            else:
                idx_world, image_feat_world, text_feat_world = idx, own.image_feat, own.text_feat
                image_embeds_world = own.image_embeds
                input_ids_world, att_mask_world, offset = encoder_input_ids, text.attention_mask, 0

            with torch.no_grad():
                # Pairs showing the same image are never negatives of each other.
                same_image = torch.eq(idx, idx_world.t())
                weights_i2t = F.softmax(own.image_feat @ text_feat_world.t() / self.temp, dim=1)
                weights_i2t.masked_fill_(same_image, 0)
                weights_t2i = F.softmax(own.text_feat @ image_feat_world.t() / self.temp, dim=1)
                weights_t2i.masked_fill_(same_image, 0)

            neg_image_idx, neg_text_idx = self.select_negatives(weights_t2i, weights_i2t, offset=offset)
            return (image_embeds_world[neg_image_idx], input_ids_world[neg_text_idx],
                    att_mask_world[neg_text_idx])

        image_atts = torch.ones(own.image_embeds.shape[:-1], dtype=torch.long, device=own.image_embeds.device)
        loss_itm = matching_loss(self.text_encoder, self.itm_head, encoder_input_ids, text.attention_mask,
                                 own.image_embeds, image_atts, hard_negatives)
        return loss_ita, loss_itm

    def select_negatives(self, weights_t2i, weights_i2t, offset=0):
        """Hard negatives: (an image index for each text, a text index for each image).

        weights_t2i is (B, N_images), weights_i2t is (B, N_texts); N is the global batch with
        negative_all_rank, else B. Row b's own pair sits at column offset + b (offset: the
        rank's first row in the global batch, or 0).
        """
        return sample_negatives(weights_t2i, offset), sample_negatives(weights_i2t, offset)


def blip_retrieval(pretrained='', **kwargs):
    return load_pretrained(BLIP_Retrieval(**kwargs), pretrained)


# ---------------------------------------------------------------------------------------------
# Shared with BLIP_Pretrain


def with_first_token(input_ids, token_id):
    """A copy of input_ids (B, T) whose first column is token_id ([ENC] for ITM, [DEC] for LM)."""
    input_ids = input_ids.clone()
    input_ids[:, 0] = token_id
    return input_ids


def contrastive_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha):
    """ITC with momentum distillation: (loss_ita, sim_i2t, sim_t2i).

    The online features (B, D) are contrasted with the momentum features of the batch followed
    by the queues (D, Q): B + Q candidates. The targets mix the one-hot pairing (weight
    1 - alpha) with the softmax of the momentum model's own similarities (weight alpha).
    """
    with torch.no_grad():
        # torch.cat copies the queue, so the in-place enqueue after this cannot alter what
        # backward reads (the original cloned it first as well).
        image_feat_m_all = torch.cat([image_feat_m.t(), image_queue], dim=1)
        text_feat_m_all = torch.cat([text_feat_m.t(), text_queue], dim=1)

        sim_i2t_m = image_feat_m @ text_feat_m_all / temp
        sim_t2i_m = text_feat_m @ image_feat_m_all / temp
        sim_targets = torch.zeros_like(sim_i2t_m)
        sim_targets.fill_diagonal_(1)
        sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
        sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets

    sim_i2t = image_feat @ text_feat_m_all / temp
    sim_t2i = text_feat @ image_feat_m_all / temp
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
    return (loss_i2t + loss_t2i) / 2, sim_i2t, sim_t2i


def matching_loss(text_encoder, itm_head, input_ids, attention_mask, image_embeds, image_atts, hard_negatives):
    """ITM cross-entropy over B positive pairs and 2B negatives.

    input_ids start with [ENC]. hard_negatives() -> (image_embeds_neg, text_ids_neg,
    text_atts_neg): a negative image for each text and a negative text for each image. It is
    called after the positive pairs' forward pass, where the original draws them (sampling and
    dropout share the RNG). Pairs: [positives | (text, negative image) | (negative text, image)].
    """
    bs = image_embeds.size(0)
    output_pos = text_encoder(input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                              encoder_attention_mask=image_atts, return_dict=True)
    image_embeds_neg, text_ids_neg, text_atts_neg = hard_negatives()

    text_ids_all = torch.cat([input_ids, text_ids_neg], dim=0)
    text_atts_all = torch.cat([attention_mask, text_atts_neg], dim=0)
    image_embeds_all = torch.cat([image_embeds_neg, image_embeds], dim=0)
    image_atts_all = torch.cat([image_atts, image_atts], dim=0)
    output_neg = text_encoder(text_ids_all, attention_mask=text_atts_all, encoder_hidden_states=image_embeds_all,
                              encoder_attention_mask=image_atts_all, return_dict=True)

    vl_embeddings = torch.cat([output_pos.last_hidden_state[:, 0, :],
                               output_neg.last_hidden_state[:, 0, :]], dim=0)
    vl_output = itm_head(vl_embeddings)
    itm_labels = torch.cat([torch.ones(bs, dtype=torch.long),
                            torch.zeros(2 * bs, dtype=torch.long)]).to(image_embeds.device)
    return F.cross_entropy(vl_output, itm_labels)


def sample_negatives(weights, offset=0):
    """One column per row of `weights` (B, N), drawn with probability proportional to the row.

    A row with no positive mass (everything masked, or NaN/inf from a diverged model) would
    make torch.multinomial fail; such a row draws uniformly among the columns other than its
    own pair (column offset + row), or takes its own column when there is no other.
    """
    weights = weights.detach().float()
    rows, cols = weights.shape
    bad = ~torch.isfinite(weights).all(dim=1) | (weights < 0).any(dim=1) | (weights.sum(dim=1) <= 0)
    if bad.any():
        fallback = torch.ones_like(weights)
        if cols > 1:
            own = torch.arange(rows, device=weights.device) + offset
            keep = own < cols
            fallback[torch.arange(rows, device=weights.device)[keep], own[keep]] = 0
        weights = torch.where(bad[:, None], fallback, weights)
    return torch.multinomial(weights, 1).squeeze(1)
