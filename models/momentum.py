"""Momentum encoders and ITC feature queues, shared by BLIP_Retrieval and BLIP_Pretrain.

`MomentumQueues` is a mixin for those two nn.Modules: `init_momentum` builds the momentum
encoders (EMA copies of the online ViT, text encoder and projections, never trained by
gradient) and registers the queues of momentum features under the original's buffer names
(`image_queue`, `text_queue`, the optional `idx_queue`, and the pointer named by the class's
`queue_pointer`: 'ptr_queue' for retrieval, 'queue_ptr' for pre-training, as in official
checkpoints). `copy_params` / `momentum_update` work on any list of (online, momentum) pairs.

The mixin also runs a training step in parts, so that one process can play several ranks
(engine/emulate.py): `start_step` (temperature clamp, momentum update: once per step on every
rank), `encode` (the online encoders: what is re-run with grad), `momentum_encode`, the
class's `rank_losses(own, world, alpha)` (one rank's losses from its RankBatch and the global
batch's WorldBatch) and `enqueue(world)`. `contrastive_forward` chains them for a real process,
gathering the world from the other processes.
"""
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.blip import create_vit
from models.med import BertModel
from utils import all_gather_with_grad, concat_all_gather, get_rank


def _param_lists(model_pairs):
    online, momentum = [], []
    for model, model_m in model_pairs:
        online += list(model.parameters())
        momentum += list(model_m.parameters())
    if len(online) != len(momentum):
        raise ValueError(f'momentum encoders have {len(momentum)} parameters, online ones {len(online)}')
    return online, momentum


@torch.no_grad()
def copy_params(model_pairs):
    """Initialise each momentum encoder as a frozen copy of its online encoder."""
    for param, param_m in zip(*_param_lists(model_pairs)):
        param_m.data.copy_(param.data)
        param_m.requires_grad = False


@torch.no_grad()
def momentum_update(model_pairs, momentum):
    """param_m = momentum * param_m + (1 - momentum) * param, in two fused multi-tensor ops."""
    # The lists are rebuilt on each call (cheap) so they follow parameters that were
    # replaced, e.g. by to_empty() after meta-device construction.
    online, momentum_params = _param_lists(model_pairs)
    momentum_params = [p.data for p in momentum_params]
    torch._foreach_mul_(momentum_params, momentum)
    torch._foreach_add_(momentum_params, [p.data for p in online], alpha=1.0 - momentum)


@dataclass
class RankBatch:
    """One rank's batch through the encoders of a contrastive step."""
    image_embeds: torch.Tensor       # (B, 1 + patches, W) online ViT output
    image_feat: torch.Tensor         # (B, D) its normalised ITC feature
    text: Any                        # the tokenizer's output (input_ids, attention_mask)
    text_feat: torch.Tensor          # (B, D) normalised ITC feature of the online text encoder
    idx: Optional[torch.Tensor] = None           # (B, 1) image ids (retrieval), else None
    image_feat_m: Optional[torch.Tensor] = None  # (B, D) momentum features (momentum_encode)
    text_feat_m: Optional[torch.Tensor] = None


@dataclass
class WorldBatch:
    """The global batch in rank order (what concat_all_gather gives every rank) and where this
    rank's rows start. image_embeds carries the gradient back to every rank's encoder (as
    all_gather_with_grad); it is None when the model does not use other ranks' embeddings."""
    image_feat: torch.Tensor
    text_feat: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    image_feat_m: torch.Tensor
    text_feat_m: torch.Tensor
    idx: Optional[torch.Tensor]
    offset: int
    image_embeds: Optional[torch.Tensor] = None

    @classmethod
    def gather(cls, own, with_image_embeds):
        """From every process (this process is one rank)."""
        image_embeds = all_gather_with_grad(own.image_embeds) if with_image_embeds else None
        return cls.concat([own]).gathered().for_rank(get_rank() * own.image_embeds.size(0), image_embeds)

    @classmethod
    def concat(cls, batches):
        """From the RankBatches of every rank, played in this process (offset 0: see for_rank)."""
        def cat(get):
            return torch.cat([get(b) for b in batches])
        return cls(cat(lambda b: b.image_feat), cat(lambda b: b.text_feat), cat(lambda b: b.text.input_ids),
                   cat(lambda b: b.text.attention_mask), cat(lambda b: b.image_feat_m),
                   cat(lambda b: b.text_feat_m), None if batches[0].idx is None else cat(lambda b: b.idx), 0)

    def for_rank(self, offset, image_embeds=None):
        return replace(self, offset=offset, image_embeds=image_embeds)

    def gathered(self):
        """This process's part concatenated with every other process's, in process order (a
        process playing several consecutive ranks)."""
        def gather(tensor):
            return None if tensor is None else concat_all_gather(tensor)
        return replace(self, **{name: gather(getattr(self, name)) for name in (
            'image_feat', 'text_feat', 'input_ids', 'attention_mask', 'image_feat_m', 'text_feat_m', 'idx')})


class MomentumQueues:
    """Mixin: momentum encoders, their EMA update and the ITC queues (see the module docstring)."""

    queue_pointer = 'queue_ptr'  # the pointer buffer's name in the class's checkpoints
    max_text_length = 30         # captions are padded / cut to this many tokens
    gathers_image_embeds = False  # whether rank_losses uses other ranks' image embeddings

    def init_momentum(self, vit, image_size, embed_dim, queue_size, momentum, id_queue=False):
        """Build the momentum encoders after the online ones (visual_encoder, vision_proj,
        text_encoder, text_proj) and register the queues: unit columns, image ids -100 (empty).
        The momentum text encoder shares the online one's config (the original's med_config)."""
        # Like the original, the momentum ViT gets create_vit's defaults (no checkpointing).
        self.visual_encoder_m, vision_width = create_vit(vit, image_size)
        self.vision_proj_m = nn.Linear(vision_width, embed_dim)
        self.text_encoder_m = BertModel(config=self.text_encoder.config, add_pooling_layer=False)
        self.text_proj_m = nn.Linear(self.text_encoder.config.hidden_size, embed_dim)
        self.model_pairs = [
            [self.visual_encoder, self.visual_encoder_m],
            [self.vision_proj, self.vision_proj_m],
            [self.text_encoder, self.text_encoder_m],
            [self.text_proj, self.text_proj_m],
        ]
        self.copy_params()

        self.register_buffer('image_queue', F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer('text_queue', F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        if id_queue:
            self.register_buffer('idx_queue', torch.full((1, queue_size), -100))
        self.register_buffer(self.queue_pointer, torch.zeros(1, dtype=torch.long))
        self.queue_size = queue_size
        self.momentum = momentum

    @torch.no_grad()
    def copy_params(self):
        copy_params(self.model_pairs)

    @torch.no_grad()
    def _momentum_update(self):
        momentum_update(self.model_pairs, self.momentum)

    # ------------------------------------------------------------- a training step in parts

    def contrastive_forward(self, image, caption, alpha, idx=None):
        """One rank's step as the original's forward: the losses (rank_losses' tuple).

        The RNG is consumed in the original's order: the online text encoder's dropout, the
        momentum encoders', then what rank_losses draws (ITM dropout and negatives, LM)."""
        self.start_step()
        own = self.encode(image, caption, idx)
        with torch.no_grad():
            self.momentum_encode(own, image)
        world = WorldBatch.gather(own, self.gathers_image_embeds)
        losses = self.rank_losses(own, world, alpha)
        self.enqueue(world)
        return losses

    @torch.no_grad()
    def start_step(self):
        """What every rank does once per step before its encoders: clamp the temperature, move
        the momentum encoders toward the online ones."""
        self.temp.clamp_(0.001, 0.5)
        self._momentum_update()

    def image_feature(self, image_embeds):
        """The normalised ITC feature of the [CLS] token (B, D)."""
        return F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)

    def encode(self, image, caption, idx=None):
        """The online encoders: a RankBatch without momentum features."""
        image_embeds = self.visual_encoder(image)
        text = self.tokenizer(caption, padding='max_length', truncation=True, max_length=self.max_text_length,
                              return_tensors='pt').to(image.device)
        text_output = self.text_encoder(text.input_ids, attention_mask=text.attention_mask,
                                        return_dict=True, mode='text')
        text_feat = F.normalize(self.text_proj(text_output.last_hidden_state[:, 0, :]), dim=-1)
        return RankBatch(image_embeds, self.image_feature(image_embeds), text, text_feat,
                         None if idx is None else idx.view(-1, 1))

    @torch.no_grad()
    def momentum_encode(self, own, image):
        """Fill own's momentum features (the momentum encoders run in train mode: dropout)."""
        image_embeds_m = self.visual_encoder_m(image)
        own.image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0, :]), dim=-1)
        text_output_m = self.text_encoder_m(own.text.input_ids, attention_mask=own.text.attention_mask,
                                            return_dict=True, mode='text')
        own.text_feat_m = F.normalize(self.text_proj_m(text_output_m.last_hidden_state[:, 0, :]), dim=-1)
        return own

    def rank_losses(self, own, world, alpha):
        raise NotImplementedError

    # for a process that plays several ranks (engine/emulate.py)

    def world_of(self, batches):
        """The WorldBatch of every played rank's RankBatch."""
        return WorldBatch.concat(batches)

    def with_leaves(self, cached, image_embeds, text_feat):
        """`cached` (a RankBatch) with its encoder outputs replaced by leaves that collect the
        gradient of the losses."""
        return replace(cached, image_embeds=image_embeds, image_feat=self.image_feature(image_embeds),
                       text_feat=text_feat)

    @torch.no_grad()
    def enqueue(self, world):
        """Enqueue the global batch's momentum features (and image ids), once per step.

        Every rank enqueues the whole global batch, so the queues stay identical across ranks.
        """
        batch_size = world.image_feat_m.shape[0]
        pointer = getattr(self, self.queue_pointer)
        ptr = int(pointer)
        if self.queue_size % batch_size:
            raise ValueError(f'queue_size ({self.queue_size}) must be a multiple of the global batch size '
                             f'({batch_size}: the batch size times the number of ranks)')
        self.image_queue[:, ptr:ptr + batch_size] = world.image_feat_m.T
        self.text_queue[:, ptr:ptr + batch_size] = world.text_feat_m.T
        if world.idx is not None and hasattr(self, 'idx_queue'):
            self.idx_queue[:, ptr:ptr + batch_size] = world.idx.T
        pointer[0] = (ptr + batch_size) % self.queue_size
