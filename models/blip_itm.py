"""BLIP image-text matching: the ITM head (match / no match logits) and the ITC similarity.

As in the original, the ITM text keeps [CLS] as its first token here (the retrieval and
pretraining models replace it by [ENC]).
"""
import torch
import torch.nn.functional as F
from torch import nn

from models.blip import create_vit, init_tokenizer, load_med_config, load_pretrained
from models.med import BertModel


class BLIP_ITM(nn.Module):
    def __init__(self,
                 med_config='configs/med_config.json',
                 image_size=384,
                 vit='base',
                 vit_grad_ckpt=False,
                 vit_ckpt_layer=0,
                 embed_dim=256,
                 ):
        """
        Args:
            med_config: path of the MED text model's JSON config (or a dict / BertConfig)
            image_size: input image size
            vit: 'base', 'large' or a mapping {width, depth, heads, patch_size}
            embed_dim: width of the ITC projections
        """
        super().__init__()
        self.visual_encoder, vision_width = create_vit(vit, image_size, vit_grad_ckpt, vit_ckpt_layer)
        self.tokenizer = init_tokenizer()
        self.text_encoder = BertModel(config=load_med_config(med_config, vision_width), add_pooling_layer=False)
        text_width = self.text_encoder.config.hidden_size
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.itm_head = nn.Linear(text_width, 2)

    def forward(self, image, caption, match_head='itm', image_embeds=None):
        """'itm': (B, 2) match logits of image i with caption i; 'itc': (B, B) cosine
        similarities of every image with every caption. image_embeds: the visual encoder's
        output for `image`, when the caller has it already (image is then not read)."""
        if image_embeds is None:
            image_embeds = self.visual_encoder(image)
        device = image_embeds.device
        image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long, device=device)
        text = self.tokenizer(caption, padding='max_length', truncation=True, max_length=35,
                              return_tensors="pt").to(device)

        if match_head == 'itm':
            output = self.text_encoder(text.input_ids, attention_mask=text.attention_mask,
                                       encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                                       return_dict=True)
            return self.itm_head(output.last_hidden_state[:, 0, :])
        if match_head == 'itc':
            text_output = self.text_encoder(text.input_ids, attention_mask=text.attention_mask, return_dict=True,
                                            mode='text')
            image_feat = F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)
            text_feat = F.normalize(self.text_proj(text_output.last_hidden_state[:, 0, :]), dim=-1)
            return image_feat @ text_feat.t()
        raise ValueError(f"match_head must be 'itm' or 'itc', got {match_head!r}")


def blip_itm(pretrained='', **kwargs):
    return load_pretrained(BLIP_ITM(**kwargs), pretrained)
