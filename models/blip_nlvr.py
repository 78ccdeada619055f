"""BLIP for NLVR2: is a sentence true of a pair of images?

Both images go through the ViT; the sentence (first token [ENC]) is encoded by the two-image
text encoder of nlvr_encoder.py and its [CLS] state classified by a two-layer head.
"""
import torch
import torch.nn.functional as F
from torch import nn

from models.blip import create_vit, init_tokenizer, load_med_config, load_pretrained
from models.nlvr_encoder import BertModel


class BLIP_NLVR(nn.Module):
    def __init__(self,
                 med_config='configs/med_config.json',
                 image_size=480,
                 vit='base',
                 vit_grad_ckpt=False,
                 vit_ckpt_layer=0,
                 ):
        """
        Args:
            med_config: path of the MED text model's JSON config (or a dict / BertConfig)
            image_size: input image size
            vit: 'base', 'large' or a mapping {width, depth, heads, patch_size}
        """
        super().__init__()
        self.visual_encoder, vision_width = create_vit(vit, image_size, vit_grad_ckpt, vit_ckpt_layer,
                                                       drop_path_rate=0.1)
        self.tokenizer = init_tokenizer()
        self.text_encoder = BertModel(config=load_med_config(med_config, vision_width), add_pooling_layer=False)
        hidden = self.text_encoder.config.hidden_size
        self.cls_head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, image, text, targets, train=True):
        """`image` stacks the left images then the right images (2B, 3, H, W), as train_nlvr.py
        builds it. Returns the cross-entropy loss (`train=True`) or the (B, 2) logits."""
        image_embeds = self.visual_encoder(image)
        image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long, device=image.device)
        image0_embeds, image1_embeds = torch.split(image_embeds, targets.size(0))
        batch = image0_embeds.size(0)

        text = self.tokenizer(text, padding='longest', return_tensors="pt").to(image.device)
        input_ids = text.input_ids.clone()
        input_ids[:, 0] = self.tokenizer.enc_token_id

        output = self.text_encoder(input_ids, attention_mask=text.attention_mask,
                                   encoder_hidden_states=[image0_embeds, image1_embeds],
                                   encoder_attention_mask=[image_atts[:batch], image_atts[batch:]],
                                   return_dict=True)
        prediction = self.cls_head(output.last_hidden_state[:, 0, :])
        if train:
            return F.cross_entropy(prediction, targets)
        return prediction

    @staticmethod
    def adapt_checkpoint(state_dict):
        """A BLIP checkpoint's keys for BLIP_NLVR, as the original NLVR2 loader maps them (applied
        by models.blip.load_checkpoint): its single cross-attention (`crossattention.self.*`,
        `crossattention.output.dense.*`) is copied to both image branches (`self0`/`self1`,
        `dense0`/`dense1`); the source keys stay and are reported unexpected. `cls_head` and the
        merge layers are not in pretrained checkpoints and keep their initial values. Unlike the
        original this also works for local files (it lacked `import os`) and drops shape
        mismatches like every other model's loader."""
        state_dict = dict(state_dict)
        for key in list(state_dict.keys()):
            if 'crossattention.self.' in key:
                for branch in ('self0', 'self1'):
                    state_dict[key.replace('crossattention.self.', f'crossattention.{branch}.')] = state_dict[key]
            elif 'crossattention.output.dense.' in key:
                for branch in ('dense0', 'dense1'):
                    state_dict[key.replace('crossattention.output.dense.', f'crossattention.output.{branch}.')] = \
                        state_dict[key]
        return state_dict


def blip_nlvr(pretrained='', **kwargs):
    return load_pretrained(BLIP_NLVR(**kwargs), pretrained)
