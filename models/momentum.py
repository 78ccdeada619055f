"""Momentum encoders and ITC feature queues, shared by BLIP_Retrieval and BLIP_Pretrain.

`MomentumQueues` is a mixin for those two nn.Modules: `init_momentum` builds the momentum
encoders (EMA copies of the online ViT, text encoder and projections, never trained by
gradient) and registers the queues of momentum features under the original's buffer names
(`image_queue`, `text_queue`, the optional `idx_queue`, and the pointer named by the class's
`queue_pointer`: 'ptr_queue' for retrieval, 'queue_ptr' for pre-training, as in official
checkpoints). `copy_params` / `momentum_update` work on any list of (online, momentum) pairs.
"""
import torch
import torch.nn.functional as F
from torch import nn

from models.blip import create_vit
from models.med import BertModel
from utils import concat_all_gather


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


class MomentumQueues:
    """Mixin: momentum encoders, their EMA update and the ITC queues (see the module docstring)."""

    queue_pointer = 'queue_ptr'  # the pointer buffer's name in the class's checkpoints

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

    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feat, text_feat, idxs=None):
        """Enqueue the global batch's momentum features (and image ids `idxs`, gathered already).

        Every rank enqueues the whole global batch, so the queues stay identical across ranks.
        """
        image_feats = concat_all_gather(image_feat)
        text_feats = concat_all_gather(text_feat)
        batch_size = image_feats.shape[0]
        pointer = getattr(self, self.queue_pointer)
        ptr = int(pointer)
        assert self.queue_size % batch_size == 0, (
            f'queue_size ({self.queue_size}) must be a multiple of the global batch size ({batch_size})')

        self.image_queue[:, ptr:ptr + batch_size] = image_feats.T
        self.text_queue[:, ptr:ptr + batch_size] = text_feats.T
        if idxs is not None:
            self.idx_queue[:, ptr:ptr + batch_size] = idxs.T
        pointer[0] = (ptr + batch_size) % self.queue_size
