"""BLIP base models, the shared builders (tokenizer, ViT) and checkpoint loading.

- `BLIP_Base`: feature extractor (image, text or image-grounded text features).
- `BLIP_Decoder`: image captioning (LM loss and `generate`).
- `init_tokenizer`, `create_vit`, `load_checkpoint`: used by every BLIP model.
- Missing weights, one rule: every factory loads `pretrained` non-strictly (`load_pretrained`,
  printing what it lacked); callers that need every weight call `require_weights`.

Same classes, arguments and state-dict keys as the original `models/blip.py`; checkpoint
loading is stricter about what it unpickles and says what it skipped.
"""
import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from transformers import BertTokenizer

from engine.fileio import CheckpointError, download_cached_file, is_url, load_checkpoint_file
from models.med import BertConfig, BertLMHeadModel, BertModel
from models.vit import VisionTransformer, interpolate_pos_embed

REPO_ROOT = Path(__file__).resolve().parent.parent
BERT_VOCAB = Path(__file__).resolve().parent / 'bert-base-uncased' / 'vocab.txt'
BERT_VOCAB_SIZE = 30522  # bert-base-uncased; [DEC] = 30522 and [ENC] = 30523 come on top


class BLIP_Base(nn.Module):
    def __init__(self,
                 med_config='configs/med_config.json',
                 image_size=224,
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
        self.visual_encoder, vision_width = create_vit(vit, image_size, vit_grad_ckpt, vit_ckpt_layer)
        self.tokenizer = init_tokenizer()
        self.text_encoder = BertModel(config=load_med_config(med_config, vision_width), add_pooling_layer=False)

    def forward(self, image, caption, mode):
        """mode 'image': ViT tokens (B, 1+P, D); 'text': text-encoder tokens ([CLS] first);
        'multimodal': image-grounded text tokens (first token replaced by [ENC])."""
        if mode not in ('image', 'text', 'multimodal'):
            raise ValueError(f"mode must be 'image', 'text' or 'multimodal', got {mode!r}")
        text = self.tokenizer(caption, padding='longest', return_tensors="pt").to(image.device)

        if mode == 'image':
            return self.visual_encoder(image)

        if mode == 'text':
            return self.text_encoder(text.input_ids, attention_mask=text.attention_mask, return_dict=True,
                                     mode='text').last_hidden_state

        image_embeds = self.visual_encoder(image)
        image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long, device=image.device)
        input_ids = text.input_ids.clone()
        input_ids[:, 0] = self.tokenizer.enc_token_id
        return self.text_encoder(input_ids, attention_mask=text.attention_mask, encoder_hidden_states=image_embeds,
                                 encoder_attention_mask=image_atts, return_dict=True).last_hidden_state


class BLIP_Decoder(nn.Module):
    def __init__(self,
                 med_config='configs/med_config.json',
                 image_size=384,
                 vit='base',
                 vit_grad_ckpt=False,
                 vit_ckpt_layer=0,
                 prompt='a picture of ',
                 ):
        """
        Args:
            med_config: path of the MED text model's JSON config (or a dict / BertConfig)
            image_size: input image size
            vit: 'base', 'large' or a mapping {width, depth, heads, patch_size}
            prompt: text every caption starts with; its tokens are not trained on
        """
        super().__init__()
        self.visual_encoder, vision_width = create_vit(vit, image_size, vit_grad_ckpt, vit_ckpt_layer)
        self.tokenizer = init_tokenizer()
        self.text_decoder = BertLMHeadModel(config=load_med_config(med_config, vision_width))
        self.prompt = prompt
        self.prompt_length = len(self.tokenizer(self.prompt).input_ids) - 1  # [CLS] + prompt, without [SEP]

    def forward(self, image, caption):
        """Captioning LM loss (mean over caption tokens; prompt and padding ignored)."""
        image_embeds = self.visual_encoder(image)
        image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long, device=image.device)

        text = self.tokenizer(caption, padding='longest', truncation=True, max_length=40,
                              return_tensors="pt").to(image.device)
        input_ids = text.input_ids.clone()
        input_ids[:, 0] = self.tokenizer.bos_token_id

        decoder_targets = input_ids.masked_fill(input_ids == self.tokenizer.pad_token_id, -100)
        decoder_targets[:, :self.prompt_length] = -100

        decoder_output = self.text_decoder(input_ids, attention_mask=text.attention_mask,
                                           encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                                           labels=decoder_targets, return_dict=True)
        return decoder_output.loss

    @torch.no_grad()
    def generate(self, image, sample=False, num_beams=3, max_length=30, min_length=10, top_p=0.9,
                 repetition_penalty=1.0, num_captions=1):
        """Captions for a batch of images: beam search (`sample=False`; `num_beams=1` is greedy)
        or nucleus sampling. Lengths count tokens including [DEC] and the prompt.
        `num_captions` per image (samples, or the best beams), image by image.

        As in the original, sampling always uses repetition penalty 1.1 (and top-k 50, the
        transformers 4.15 default it ran with); `repetition_penalty` applies to beam search.
        """
        image_embeds = self.visual_encoder(image)
        # one row per image: its beams (or samples) share the image's keys/values
        image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long, device=image.device)
        model_kwargs = {"encoder_hidden_states": image_embeds, "encoder_attention_mask": image_atts}

        prompt = [self.prompt] * image.size(0)
        input_ids = self.tokenizer(prompt, return_tensors="pt").input_ids.to(image.device)
        input_ids[:, 0] = self.tokenizer.bos_token_id
        input_ids = input_ids[:, :-1]  # drop [SEP]

        common = dict(max_length=max_length, min_length=min_length, eos_token_id=self.tokenizer.sep_token_id,
                      pad_token_id=self.tokenizer.pad_token_id, **model_kwargs)
        if sample:
            outputs = self.text_decoder.generate(input_ids=input_ids, do_sample=True, top_p=top_p, top_k=50,
                                                 num_return_sequences=num_captions, repetition_penalty=1.1,
                                                 **common)
        else:
            outputs = self.text_decoder.generate(input_ids=input_ids, num_beams=num_beams, do_sample=False,
                                                 num_return_sequences=num_captions,
                                                 repetition_penalty=repetition_penalty, **common)

        captions = []
        for output in outputs:
            caption = self.tokenizer.decode(output, skip_special_tokens=True)
            captions.append(caption[len(self.prompt):])
        return captions


def blip_decoder(pretrained='', **kwargs):
    return load_pretrained(BLIP_Decoder(**kwargs), pretrained)


def blip_feature_extractor(pretrained='', **kwargs):
    return load_pretrained(BLIP_Base(**kwargs), pretrained)


# ----------------------------------------------------------------------------- missing weights
# One rule for every factory (blip_decoder, blip_feature_extractor, blip_itm, blip_retrieval,
# blip_nlvr, blip_vqa): load `pretrained` non-strictly, print what it lacked, return the model.
# Whether a checkpoint must hold every weight is the caller's decision: evaluation and inference
# call require_weights (fine-tuning starts from checkpoints without the task's heads).

def load_pretrained(model, pretrained):
    """What every factory does with `pretrained` (a path or URL; '' for none): load_checkpoint,
    whose printed report lists the missing, unexpected and dropped keys. Returns the model."""
    if pretrained:
        model, _ = load_checkpoint(model, pretrained)
    return model


def missing_weights(model, pretrained, msg=None):
    """Names of the parameters of `model` that checkpoint `pretrained` leaves at their initial
    values when loaded as load_checkpoint loads it (absent, or dropped for their shape); buffers
    such as the retrieval queues do not count. From `msg` (that load's CheckpointLoadResult) when
    the caller has it; otherwise the checkpoint is read again (the model is not changed)."""
    if msg is None:
        state_dict, _ = _prepare_state_dict(model, read_checkpoint(pretrained))
        missing = [key for key in model.state_dict() if key not in state_dict]
    else:
        missing = msg.missing_keys
    names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return [key for key in missing if key in names]


def require_weights(model, pretrained, what='', msg=None):
    """CheckpointError unless checkpoint `pretrained` holds every parameter of `model`
    (missing_weights): a model used with random weights would give meaningless outputs. The
    message names the checkpoint, the model class and the missing modules with counts, then
    `what` (why it matters there)."""
    missing = missing_weights(model, pretrained, msg)
    if missing:
        modules = {}
        for key in missing:
            modules[key.split('.')[0]] = modules.get(key.split('.')[0], 0) + 1
        parts = ', '.join(f'{name} ({count})' for name, count in modules.items())
        raise CheckpointError(f"checkpoint {pretrained} lacks {len(missing)} weights of {type(model).__name__}: "
                              f"{parts}" + (f"; {what}" if what else ''))


# ----------------------------------------------------------------------------- builders

def init_tokenizer():
    """bert-base-uncased WordPiece tokenizer plus bos [DEC] (30522) and [ENC] (30523,
    `tokenizer.enc_token_id`). Never touches the network: a hub copy is used only when it is
    already cached and complete, otherwise the vocabulary shipped in models/bert-base-uncased."""
    tokenizer = _cached_hub_tokenizer()
    if tokenizer is None:
        tokenizer = BertTokenizer(vocab=str(BERT_VOCAB), do_lower_case=True, model_max_length=512)
    if len(tokenizer) != BERT_VOCAB_SIZE:
        raise RuntimeError(f"bert-base-uncased tokenizer from {BERT_VOCAB} has {len(tokenizer)} tokens, "
                           f"expected {BERT_VOCAB_SIZE}")
    tokenizer.add_special_tokens({'bos_token': '[DEC]'})
    tokenizer.add_special_tokens({'additional_special_tokens': ['[ENC]']})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids('[ENC]')
    # transformers 4.15 (which BLIP ran with) cleaned up " ." / " ' s" when decoding
    tokenizer.clean_up_tokenization_spaces = True
    return tokenizer


def _cached_hub_tokenizer():
    # transformers 5 returns a 5-token placeholder instead of failing when the files are not
    # found, so accept the hub copy only with its full vocabulary.
    try:
        tokenizer = BertTokenizer.from_pretrained('bert-base-uncased', local_files_only=True)
    except Exception:  # not cached, partial cache, no hub library support: use the shipped vocab
        return None
    return tokenizer if len(tokenizer) == BERT_VOCAB_SIZE else None


def create_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
    """Build the ViT: 'base' (ViT-B/16, width 768), 'large' (ViT-L/16, width 1024) or a mapping
    {width, depth, heads, patch_size[, mlp_ratio]} for small models. Returns (vit, width)."""
    if vit == 'base':
        vision_width, depth, heads, patch_size, mlp_ratio = 768, 12, 12, 16, 4.
    elif vit == 'large':
        vision_width, depth, heads, patch_size, mlp_ratio = 1024, 24, 16, 16, 4.
        # the original passes `0.1 or drop_path_rate`, i.e. always 0.1 for ViT-L
        drop_path_rate = 0.1
    elif isinstance(vit, dict) or hasattr(vit, 'keys'):
        missing = {'width', 'depth', 'heads'} - set(vit.keys())
        if missing:
            raise ValueError(f"vit mapping lacks {sorted(missing)}: expected keys width, depth, heads, patch_size")
        vision_width, depth, heads = int(vit['width']), int(vit['depth']), int(vit['heads'])
        patch_size, mlp_ratio = int(vit.get('patch_size', 16)), float(vit.get('mlp_ratio', 4.))
    else:
        raise ValueError(f"vit must be 'base', 'large' or a mapping {{width, depth, heads, patch_size}}, got {vit!r}")
    visual_encoder = VisionTransformer(img_size=image_size, patch_size=patch_size, embed_dim=vision_width,
                                       depth=depth, num_heads=heads, mlp_ratio=mlp_ratio,
                                       use_grad_checkpointing=use_grad_checkpointing, ckpt_layer=ckpt_layer,
                                       drop_path_rate=drop_path_rate)
    return visual_encoder, vision_width


def load_med_config(med_config, vision_width):
    """BertConfig from a JSON path (relative paths also tried from the repository root), a dict
    or a BertConfig; `encoder_width` is set to the ViT width."""
    if isinstance(med_config, BertConfig):
        config = BertConfig.from_dict(med_config.to_dict())
    elif isinstance(med_config, dict):
        config = BertConfig.from_dict(dict(med_config))
    else:
        path = Path(med_config)
        if not path.is_file() and not path.is_absolute() and (REPO_ROOT / path).is_file():
            path = REPO_ROOT / path
        if not path.is_file():
            raise FileNotFoundError(f"med_config {med_config}: no such file")
        config = BertConfig.from_json_file(str(path))
    config.encoder_width = vision_width
    return config


# ----------------------------------------------------------------------------- checkpoints

class CheckpointLoadResult(NamedTuple):
    """What `load_checkpoint` did: model keys not in the checkpoint (left at their initial
    values), checkpoint keys the model does not have, and checkpoint keys dropped because their
    shape differs from the model's (the model keeps its value; they are also in missing_keys)."""
    missing_keys: list
    unexpected_keys: list
    dropped_keys: list

    def __str__(self):
        return (f"missing_keys ({len(self.missing_keys)}): {self.missing_keys}\n"
                f"unexpected_keys ({len(self.unexpected_keys)}): {self.unexpected_keys}\n"
                f"dropped_keys, shape mismatch ({len(self.dropped_keys)}): {self.dropped_keys}")


def read_checkpoint(url_or_filename, allow_unsafe=None):
    """Load a checkpoint file or URL and return its state dict (`checkpoint['model']`, or the
    file itself when it is a bare state dict).

    Files are read with `torch.load(weights_only=True)`; one that needs arbitrary unpickling is
    refused unless `allow_unsafe=True` or the environment has BLIP_UNSAFE_LOAD=1. A file that
    is not a checkpoint, or is truncated, gets a CheckpointError naming it.
    """
    if is_url(url_or_filename):
        path = download_cached_file(url_or_filename)
    elif os.path.isfile(url_or_filename):
        path = url_or_filename
    else:
        raise RuntimeError(f'checkpoint url or path is invalid: {url_or_filename}')

    # mapped: only the tensors the model takes are read (load_state_dict copies them)
    checkpoint = load_checkpoint_file(path, allow_unsafe=allow_unsafe, mmap=True)
    state_dict = checkpoint['model'] if isinstance(checkpoint, dict) and 'model' in checkpoint else checkpoint
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"checkpoint {path} is neither {{'model': state_dict}} nor a state dict of tensors")
    return dict(state_dict)


def _prepare_state_dict(model, state_dict):
    """The original loader's rules, on a copy of `state_dict`: the model class's own key mapping
    (its `adapt_checkpoint`, e.g. BLIP_NLVR's two cross-attention branches), the ViT position
    embeddings (online and momentum encoder) resized to the model's image size, and the tensors
    whose shape differs from the model's dropped. Returns (state dict, dropped keys)."""
    state_dict = dict(state_dict)
    adapt = getattr(type(model), 'adapt_checkpoint', None)
    if adapt is not None:
        state_dict = adapt(state_dict)
    for key, encoder_name in (('visual_encoder.pos_embed', 'visual_encoder'),
                              ('visual_encoder_m.pos_embed', 'visual_encoder_m')):
        if key in state_dict and isinstance(getattr(model, encoder_name, None), VisionTransformer):
            state_dict[key] = interpolate_pos_embed(state_dict[key], getattr(model, encoder_name))

    model_state = model.state_dict()
    dropped = [key for key, value in model_state.items()
               if key in state_dict and state_dict[key].shape != value.shape]
    for key in dropped:
        del state_dict[key]
    return state_dict, dropped


def load_state_dict_into(model, state_dict, source='state dict'):
    """Load `state_dict` non-strictly with the original loader's rules (_prepare_state_dict) and
    print what was missing, unexpected or dropped. Returns (model, CheckpointLoadResult)."""
    state_dict, dropped = _prepare_state_dict(model, state_dict)
    incompatible = model.load_state_dict(state_dict, strict=False)
    msg = CheckpointLoadResult(list(incompatible.missing_keys), list(incompatible.unexpected_keys), dropped)
    print(f'load checkpoint from {source}')
    if msg.missing_keys or msg.unexpected_keys or msg.dropped_keys:
        print(msg)
    return model, msg


def load_checkpoint(model, url_or_filename, allow_unsafe=None):
    """Load an official (or our) checkpoint, local path or http(s) URL, into `model`.
    Returns (model, msg) with msg.missing_keys, msg.unexpected_keys, msg.dropped_keys."""
    state_dict = read_checkpoint(url_or_filename, allow_unsafe=allow_unsafe)
    return load_state_dict_into(model, state_dict, source=url_or_filename)


def build_for_inference(cls, kwargs, checkpoint):
    """(cls(**kwargs) with the weights of `checkpoint`, the load report) for inference, light
    on memory: built on the meta device, its parameters and buffers become the checkpoint's own
    (mapped) tensors instead of copies of them, so peak memory is about one model, not two.
    A checkpoint that is not the model's exactly (a tensor missing, or of another dtype or
    shape) is loaded as load_checkpoint loads it."""
    with torch.device('meta'):
        model = cls(**kwargs)
    shared = {}  # tied parameters (one tensor under several names) are tied again afterwards
    for name, param in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(param), []).append(name)
    state_dict, dropped = _prepare_state_dict(model, read_checkpoint(checkpoint))
    expected = model.state_dict()
    if dropped or any(key not in state_dict or state_dict[key].dtype != value.dtype for key, value in expected.items()):
        return load_checkpoint(cls(**kwargs), checkpoint)
    model.load_state_dict({key: state_dict[key] for key in expected}, assign=True)
    for names in shared.values():
        source = model.get_parameter(names[0])
        for name in names[1:]:
            owner, _, attribute = name.rpartition('.')
            setattr(model.get_submodule(owner), attribute, source)
    print(f'load checkpoint from {checkpoint}')
    return model, CheckpointLoadResult([], sorted(set(state_dict) - set(expected)), [])
