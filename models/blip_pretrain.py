"""BLIP pre-training model: ITC + ITM + LM on image-text pairs.

As BLIP_Retrieval for ITC (momentum encoders, feature queues, momentum distillation) and ITM
(hard negatives), through the same code (models/momentum.py, the loss functions of
models/blip_retrieval.py), plus a captioning
decoder trained with the LM loss. The decoder shares every weight with the text encoder
except the self-attention blocks (the paper's parameter sharing), so the encoder state_dict
keys appear twice (`text_encoder.*` and `text_decoder.bert.*`) for one tensor, as in official
checkpoints.

Initialisation, as the original: the ViT from ImageNet weights (DeiT-B for 'base', timm's
ViT-L/16 in21k for 'large'), the text encoder/decoder from a BERT checkpoint, word embeddings
grown from BERT's 30522 tokens to len(tokenizer) (30524: + [DEC], [ENC]). Unlike the original
nothing is fetched from the model hub unless asked: `bert_checkpoint=None` (the default)
keeps BERT randomly initialised; pass a local directory (or a hub name) to load one.
`vit_checkpoint='default'` downloads the original's ImageNet weights; None skips them.
"""
import torch
import torch.nn.functional as F
from torch import nn

from engine.fileio import download_cached_file, is_url
from models.blip import create_vit, init_tokenizer, load_med_config, read_checkpoint
from models.blip_retrieval import contrastive_loss, matching_loss, sample_negatives, with_first_token
from models.med import BertLMHeadModel, BertModel, load_bert_weights
from models.momentum import MomentumQueues
from models.vit import interpolate_pos_embed

# What the original loads into the ViT before pre-training.
DEFAULT_VIT_CHECKPOINTS = {
    'base': 'https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth',
    # timm 0.4.12's default_cfgs['vit_large_patch16_224_in21k'] (AugReg, a JAX .npz file).
    'large': 'https://storage.googleapis.com/vit_models/augreg/'
             'L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1.npz',
}


class BLIP_Pretrain(MomentumQueues, nn.Module):
    queue_pointer = 'queue_ptr'  # the original's buffer name (BLIP_Retrieval's is ptr_queue)

    def __init__(
        self,
        med_config='configs/bert_config.json',
        image_size=224,
        vit='base',
        vit_grad_ckpt=False,
        vit_ckpt_layer=0,
        embed_dim=256,
        queue_size=57600,
        momentum=0.995,
        vit_checkpoint='default',
        bert_checkpoint=None,
    ):
        """
        Args:
            med_config: path of the BERT JSON config (vocabulary 30522; grown to the tokenizer's).
            image_size: input image size.
            vit: 'base', 'large' or a mapping {width, depth, heads, patch_size}.
            embed_dim: width of the ITC projections.
            queue_size: number of momentum features kept for ITC (a multiple of the global batch).
            momentum: EMA factor of the momentum encoders.
            vit_checkpoint: ViT initialisation: 'default' (the original's ImageNet weights for
                'base'/'large', nothing for a custom mapping), a file path or http(s) URL
                (.pth/.pt holding {'model': state_dict} or a state dict; .npz in timm's JAX
                layout), or None for random initialisation.
            bert_checkpoint: a folder (or hub name) with BERT weights in transformers' layout
                for the text encoder and decoder (med.load_bert_weights); None keeps them random.
        """
        super().__init__()
        self.visual_encoder, vision_width = create_vit(vit, image_size, vit_grad_ckpt, vit_ckpt_layer, 0)
        if vit_checkpoint == 'default':
            vit_checkpoint = DEFAULT_VIT_CHECKPOINTS.get(vit) if isinstance(vit, str) else None
        if vit_checkpoint:
            load_vit_weights(self.visual_encoder, vit_checkpoint)

        self.tokenizer = init_tokenizer()
        encoder_config = load_med_config(med_config, vision_width)
        self.text_encoder = _build(BertModel, bert_checkpoint, encoder_config, add_pooling_layer=False)
        resize_word_embeddings(self.text_encoder, len(self.tokenizer))
        text_width = self.text_encoder.config.hidden_size

        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.itm_head = nn.Linear(text_width, 2)

        # Momentum encoders and queues (models/momentum.py), built after the resize: the text
        # config now says len(tokenizer).
        self.init_momentum(vit, image_size, embed_dim, queue_size, momentum)
        self.temp = nn.Parameter(0.07 * torch.ones([]))

        decoder_config = load_med_config(med_config, vision_width)
        self.text_decoder = _build(BertLMHeadModel, bert_checkpoint, decoder_config)
        resize_lm_vocab(self.text_decoder, len(self.tokenizer))
        tie_encoder_decoder_weights(self.text_encoder, self.text_decoder.bert, skip_key='/attention')
        # The LM head follows the (now shared) word embeddings.
        self.text_decoder.cls.predictions.decoder.weight = self.text_decoder.bert.embeddings.word_embeddings.weight

    def forward(self, image, caption, alpha):
        """Returns (loss_ita, loss_itm, loss_lm) for a batch of images and captions."""
        return self.contrastive_forward(image, caption, alpha)

    def rank_losses(self, own, world, alpha):
        """(loss_ita, loss_itm, loss_lm) of one rank (ITM negatives from its own batch)."""
        # ============== Image-text contrastive learning ==============
        loss_ita, sim_i2t, sim_t2i = contrastive_loss(own.image_feat, own.text_feat, own.image_feat_m,
                                                      own.text_feat_m, self.image_queue, self.text_queue,
                                                      self.temp, alpha)

        # ============== Image-text matching ==============
        text, image_embeds = own.text, own.image_embeds
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        encoder_input_ids = with_first_token(text.input_ids, self.tokenizer.enc_token_id)

        def hard_negatives():
            bs = image_embeds.size(0)
            with torch.no_grad():
                # In-batch similarities (online vs momentum features, as the original); +1e-4
                # keeps every other pair possible, the diagonal (the positive) is excluded.
                weights_t2i = F.softmax(sim_t2i[:, :bs], dim=1) + 1e-4
                weights_t2i.fill_diagonal_(0)
                weights_i2t = F.softmax(sim_i2t[:, :bs], dim=1) + 1e-4
                weights_i2t.fill_diagonal_(0)
            neg_image_idx, neg_text_idx = self.select_negatives(weights_t2i, weights_i2t)
            return image_embeds[neg_image_idx], encoder_input_ids[neg_text_idx], text.attention_mask[neg_text_idx]

        loss_itm = matching_loss(self.text_encoder, self.itm_head, encoder_input_ids, text.attention_mask,
                                 image_embeds, image_atts, hard_negatives)

        # ============== Language modelling ==============
        decoder_input_ids = with_first_token(text.input_ids, self.tokenizer.bos_token_id)
        decoder_targets = decoder_input_ids.masked_fill(decoder_input_ids == self.tokenizer.pad_token_id, -100)
        decoder_output = self.text_decoder(decoder_input_ids,
                                           attention_mask=text.attention_mask,
                                           encoder_hidden_states=image_embeds,
                                           encoder_attention_mask=image_atts,
                                           labels=decoder_targets,
                                           return_dict=True)
        loss_lm = decoder_output.loss
        return loss_ita, loss_itm, loss_lm

    def select_negatives(self, weights_t2i, weights_i2t):
        """Hard negatives: (an image index for each text, a text index for each image); both (B, B)."""
        return sample_negatives(weights_t2i), sample_negatives(weights_i2t)


def blip_pretrain(**kwargs):
    return BLIP_Pretrain(**kwargs)


# ---------------------------------------------------------------------------------------------
# Initialisation helpers


def _build(cls, checkpoint, config, **kwargs):
    """cls(config) with random weights, then the BERT checkpoint's weights when one is given."""
    model = cls(config=config, **kwargs)
    if checkpoint:
        load_bert_weights(model, checkpoint)
    return model


def load_vit_weights(visual_encoder, url_or_filename):
    """Load ImageNet weights into the ViT (non-strict: classifier heads are ignored).

    Skipped on the meta device (nothing to load into). The position embedding is resized to
    the model's grid, so image sizes other than the checkpoint's work.
    """
    if any(p.is_meta for p in visual_encoder.parameters()):
        return None
    name = str(url_or_filename)
    if name.endswith('.npz'):
        return _load_jax_vit_weights(visual_encoder, download_cached_file(name, verify=False) if is_url(name) else name)
    state_dict = read_checkpoint(name)
    if 'pos_embed' in state_dict:
        state_dict['pos_embed'] = interpolate_pos_embed(state_dict['pos_embed'], visual_encoder)
    return visual_encoder.load_state_dict(state_dict, strict=False)


def _load_jax_vit_weights(visual_encoder, path):
    """JAX-format (.npz) ViT weights, e.g. the in21k ViT-L the original loads for vit='large'.

    timm reads these into its own VisionTransformer, whose parameter names are the BLIP ViT's;
    so build that twin at our size (timm resizes the position embedding), load, and copy.
    """
    from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

    width = visual_encoder.pos_embed.shape[-1]
    block = visual_encoder.blocks[0]
    twin = TimmVisionTransformer(
        img_size=visual_encoder.patch_embed.img_size, patch_size=visual_encoder.patch_embed.patch_size,
        embed_dim=width, depth=len(visual_encoder.blocks), num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / width, qkv_bias=True, num_classes=0)
    twin.load_pretrained(path)
    return visual_encoder.load_state_dict(twin.state_dict(), strict=False)


@torch.no_grad()
def resize_word_embeddings(bert, num_tokens):
    """Grow (or cut) a BertModel's vocabulary to `num_tokens` rows.

    As transformers 4.15's resize_token_embeddings, which the original calls: existing rows
    are kept, new rows drawn from N(0, initializer_range), config.vocab_size updated.
    """
    old = bert.embeddings.word_embeddings
    if old.num_embeddings != num_tokens:
        new = nn.Embedding(num_tokens, old.embedding_dim, padding_idx=old.padding_idx,
                           device=old.weight.device, dtype=old.weight.dtype)
        new.weight.normal_(mean=0.0, std=bert.config.initializer_range)
        keep = min(old.num_embeddings, num_tokens)
        new.weight[:keep] = old.weight[:keep]
        bert.embeddings.word_embeddings = new
    bert.config.vocab_size = num_tokens


@torch.no_grad()
def resize_lm_vocab(lm_model, num_tokens):
    """resize_word_embeddings for a BertLMHeadModel: the tied LM head follows, its bias is
    zero-padded (new tokens start with bias 0) and stays shared with the decoder's bias."""
    resize_word_embeddings(lm_model.bert, num_tokens)
    lm_model.config.vocab_size = num_tokens
    head = lm_model.cls.predictions
    head.decoder.weight = lm_model.bert.embeddings.word_embeddings.weight
    head.decoder.out_features = num_tokens
    old_bias = head.bias
    if old_bias.shape[0] != num_tokens:
        bias = torch.zeros(num_tokens, device=old_bias.device, dtype=old_bias.dtype)
        keep = min(old_bias.shape[0], num_tokens)
        bias[:keep] = old_bias[:keep]
        head.bias = nn.Parameter(bias)
    head.decoder.bias = head.bias


def tie_encoder_decoder_weights(encoder, decoder, skip_key='/attention'):
    """Make `decoder` use `encoder`'s weights wherever the two module trees match.

    Walks both trees in step; at each module holding a `weight` whose path (e.g.
    '/encoder/layer/3/crossattention/self/query') does not contain `skip_key`, the decoder's
    weight and bias become the encoder's Parameters. With '/attention' everything but the
    self-attention blocks is shared: embeddings, cross-attention, feed-forward, LayerNorms.
    Returns the tied paths.
    """
    tied = []

    def visit(enc, dec, path):
        if hasattr(dec, 'weight') and skip_key not in path:
            if not hasattr(enc, 'weight'):
                raise ValueError(f'cannot tie {path}: the encoder module has no weight')
            dec.weight = enc.weight
            if hasattr(dec, 'bias'):
                dec.bias = enc.bias
            tied.append(path)
            return
        for name, dec_child in dec.named_children():
            enc_child = getattr(enc, name, None)
            if isinstance(enc_child, nn.Module):
                visit(enc_child, dec_child, f'{path}/{name}')

    visit(encoder, decoder, '')
    return tied
