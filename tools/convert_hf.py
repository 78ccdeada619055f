"""Move BLIP weights between this project (the original release's layout) and transformers.

    python tools/convert_hf.py to-hf CHECKPOINT OUT_DIR --task caption|vqa|retrieval [--config YAML]
    python tools/convert_hf.py from-hf HF_DIR OUT.pth --task caption|vqa|retrieval

to-hf writes a folder that transformers' BlipForConditionalGeneration (caption),
BlipForQuestionAnswering (vqa) or BlipForImageTextRetrieval (retrieval) `.from_pretrained`
loads with no missing weights: config.json, model.safetensors, the tokenizer ([DEC] = bos
30522, [ENC] = 30523) and the image processor (size, BLIP's mean/std, bicubic). Only the ViT
keys are renamed; the text keys are the same in both. Momentum encoders, ITC queues and `temp`
have no place in transformers and are left out (listed on stderr).

from-hf writes a checkpoint every factory here loads ({'model': state_dict}, or a bare
.safetensors file when OUT ends in .safetensors). For retrieval the momentum encoders start as
copies of the online ones, the ITC queues are fresh and `temp` is the original's initial 0.07,
ready for fine-tuning.

Sizes come from the checkpoint's tensors; the attention head counts (which tensors do not show)
from --config (a task config's `vit` and `med_config`) or the official ones (ViT-B 12, ViT-L 16,
BERT-base 12). transformers' BLIP differs from the original in places (docs/transformers.md: "What differs in
transformers' BLIP"): pass [ENC] / [DEC], the prompt and the generation settings yourself.
"""
import argparse
import json
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from engine.cli import HelpFormatter  # noqa: E402
from engine.config import ConfigError, load_config  # noqa: E402
from engine.fileio import CheckpointError, save_checkpoint, save_safetensors  # noqa: E402
from models.blip import init_tokenizer, read_checkpoint  # noqa: E402

TASKS = {'caption': 'BlipForConditionalGeneration', 'vqa': 'BlipForQuestionAnswering',
         'retrieval': 'BlipForImageTextRetrieval'}
# ViT keys, ours -> transformers ({} is a block number); every other carried key is the same
VISION_RENAMES = [
    ('visual_encoder.cls_token', 'vision_model.embeddings.class_embedding'),
    ('visual_encoder.pos_embed', 'vision_model.embeddings.position_embedding'),
    ('visual_encoder.patch_embed.proj.', 'vision_model.embeddings.patch_embedding.'),
    ('visual_encoder.blocks.{}.norm1.', 'vision_model.encoder.layers.{}.layer_norm1.'),
    ('visual_encoder.blocks.{}.norm2.', 'vision_model.encoder.layers.{}.layer_norm2.'),
    ('visual_encoder.blocks.{}.attn.qkv.', 'vision_model.encoder.layers.{}.self_attn.qkv.'),
    ('visual_encoder.blocks.{}.attn.proj.', 'vision_model.encoder.layers.{}.self_attn.projection.'),
    ('visual_encoder.blocks.{}.mlp.', 'vision_model.encoder.layers.{}.mlp.'),
    ('visual_encoder.norm.', 'vision_model.post_layernorm.'),
]
OFFICIAL_VIT_HEADS = {768: 12, 1024: 16}
OFFICIAL_MED_CONFIG = REPO / 'configs' / 'med_config.json'
IMAGE_MEAN, IMAGE_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
QUEUE_SIZE = 57600  # the official retrieval configs' queue_size


class ConversionError(ValueError):
    """A checkpoint or folder this conversion cannot express; the message says why."""


def _compile(pattern):
    return re.compile('^' + re.escape(pattern).replace(r'\{\}', r'(\d+)'))


def rename_key(key, to_hf=True):
    """A state-dict key in the other layout (text keys are unchanged)."""
    pairs = VISION_RENAMES if to_hf else [(b, a) for a, b in VISION_RENAMES]
    for source, target in pairs:
        match = _compile(source).match(key)
        if match:
            for group in match.groups():
                target = target.replace('{}', group, 1)
            return target + key[match.end():]
    return key


# --------------------------------------------------------------------------- sizes and configs

def _read_task_config(path):
    if path is None:
        return {}
    config = load_config(str(path))
    return {key: config[key] for key in ('vit', 'image_size', 'med_config', 'embed_dim') if key in config}


def _vision_config(state_dict, task_config):
    vit = task_config.get('vit')
    width = state_dict['visual_encoder.cls_token'].shape[-1]
    depth = len({key.split('.')[2] for key in state_dict if key.startswith('visual_encoder.blocks.')})
    patch = state_dict['visual_encoder.patch_embed.proj.weight'].shape[-1]
    grid = int(round((state_dict['visual_encoder.pos_embed'].shape[1] - 1) ** 0.5))
    if isinstance(vit, dict):
        heads = int(vit['heads'])
    elif vit in ('base', 'large') or width in OFFICIAL_VIT_HEADS:
        heads = {'base': 12, 'large': 16}.get(vit, OFFICIAL_VIT_HEADS.get(width))
    else:
        raise ConversionError(f'a ViT of width {width} is not an official size: give --config with its vit '
                              f'mapping (width, depth, heads, patch_size)')
    return {'hidden_size': width, 'num_hidden_layers': depth, 'num_attention_heads': heads,
            'intermediate_size': state_dict['visual_encoder.blocks.0.mlp.fc1.weight'].shape[0],
            'patch_size': patch, 'image_size': grid * patch,
            'layer_norm_eps': 1e-6,  # the original's (transformers' default is 1e-5)
            'hidden_act': 'gelu'}


def _text_config(state_dict, prefix, task_config, vision_width):
    med_path = task_config.get('med_config') or OFFICIAL_MED_CONFIG
    med_path = Path(med_path) if Path(med_path).is_file() else REPO / med_path
    med = json.loads(Path(med_path).read_text())
    words = state_dict[f'{prefix}embeddings.word_embeddings.weight']
    layers = len({key[len(prefix):].split('.')[2] for key in state_dict
                  if key.startswith(f'{prefix}encoder.layer.')})
    if words.shape[1] != med['hidden_size']:
        raise ConversionError(f"text width {words.shape[1]} differs from med_config {med_path} "
                              f"(hidden_size {med['hidden_size']}): give --config with the model's med_config")
    return {'vocab_size': words.shape[0], 'hidden_size': words.shape[1], 'num_hidden_layers': layers,
            'num_attention_heads': med['num_attention_heads'],
            'intermediate_size': state_dict[f'{prefix}encoder.layer.0.intermediate.dense.weight'].shape[0],
            'max_position_embeddings': state_dict[f'{prefix}embeddings.position_embeddings.weight'].shape[0],
            'layer_norm_eps': med.get('layer_norm_eps', 1e-12), 'hidden_act': med.get('hidden_act', 'gelu'),
            'encoder_hidden_size': vision_width, 'bos_token_id': 30522, 'pad_token_id': 0, 'sep_token_id': 102}


# --------------------------------------------------------------------------- ours -> transformers

def to_hf(checkpoint, out_dir, task, config=None):
    """Write a transformers folder for `task` from one of our (or the original's) checkpoints."""
    import transformers
    if task not in TASKS:
        raise ConversionError(f"task must be one of {', '.join(TASKS)}; got {task!r} (NLVR2 has no transformers "
                              f"class: its two-image encoder cannot be expressed there)")
    state_dict = read_checkpoint(str(checkpoint))
    if 'visual_encoder.cls_token' not in state_dict:
        raise ConversionError(f'{checkpoint} holds no BLIP ViT (visual_encoder.*): not a BLIP checkpoint')
    if any(key.startswith('text_encoder.encoder.layer.0.crossattention.') and '_1.' in key for key in state_dict):
        raise ConversionError(f'{checkpoint} is an NLVR2 model (two cross-attentions per layer): transformers has '
                              f'no BLIP class for it')
    task_config = _read_task_config(config)
    vision = _vision_config(state_dict, task_config)
    text_prefix = 'text_decoder.bert.' if task == 'caption' else 'text_encoder.'
    if f'{text_prefix}embeddings.word_embeddings.weight' not in state_dict:
        raise ConversionError(f'{checkpoint} has no {text_prefix.rstrip(".")}: not a {task} checkpoint')
    text = _text_config(state_dict, text_prefix, task_config, vision['hidden_size'])
    if task == 'vqa' and vision['hidden_size'] != text['hidden_size']:
        raise ConversionError(f"transformers' BlipForQuestionAnswering cannot take a ViT wider than its text "
                              f"model (ViT {vision['hidden_size']} vs text {text['hidden_size']}): its answer "
                              f"decoder reads the question encoder with the ViT's width")
    embed_dim = state_dict['vision_proj.weight'].shape[0] if 'vision_proj.weight' in state_dict else 256
    hf_config = transformers.BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=embed_dim,
                                        label_smoothing=0.1)  # the original's captioning loss
    hf_model = getattr(transformers, TASKS[task])(hf_config)
    expected = hf_model.state_dict()

    carried, left_out = {}, []
    for key, value in state_dict.items():
        new_key = rename_key(key, to_hf=True)
        if new_key in expected:
            carried[new_key] = value
        else:
            left_out.append(key)
    missing = sorted(set(expected) - set(carried))
    if missing:
        raise ConversionError(f'{checkpoint} lacks weights of {TASKS[task]} ({len(missing)}), e.g. '
                              f'{", ".join(missing[:5])}: is it a {task} checkpoint?')
    hf_model.load_state_dict(carried, strict=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out_dir)
    _save_processor(out_dir, vision['image_size'])
    _report_left_out(left_out, f'{checkpoint} -> {out_dir} ({TASKS[task]})')
    return out_dir


def _save_processor(out_dir, image_size):
    from transformers import BlipImageProcessor, BlipProcessor
    image_processor = BlipImageProcessor(size={'height': image_size, 'width': image_size},
                                         image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD))
    BlipProcessor(image_processor=image_processor, tokenizer=init_tokenizer()).save_pretrained(out_dir)


def _report_left_out(keys, what):
    groups = {}
    for key in keys:
        group = 'position_ids buffers' if key.endswith('.position_ids') else key.split('.')[0]
        groups[group] = groups.get(group, 0) + 1
    print(f'converted {what}', file=sys.stderr)
    if groups:
        print('not carried (no place in the target): ' + ', '.join(f'{g} ({n} tensors)' for g, n in groups.items()),
              file=sys.stderr)


# --------------------------------------------------------------------------- transformers -> ours

def from_hf(hf_dir, out_path, task):
    """Write one of our checkpoints (the original's layout) from a transformers BLIP folder."""
    import transformers
    if task not in TASKS:
        raise ConversionError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    try:
        hf_model = getattr(transformers, TASKS[task]).from_pretrained(str(hf_dir))
    except (OSError, ValueError) as error:
        raise ConversionError(f'cannot load {hf_dir} as {TASKS[task]}: {error}') from error
    state_dict = {}
    for key, value in hf_model.state_dict().items():
        state_dict[rename_key(key, to_hf=False)] = value.detach().clone().contiguous()
    for prefix in ('text_encoder.', 'text_decoder.bert.'):
        positions = state_dict.get(f'{prefix}embeddings.position_embeddings.weight')
        if positions is not None:  # a buffer the original's checkpoints carry
            state_dict[f'{prefix}embeddings.position_ids'] = torch.arange(positions.shape[0]).unsqueeze(0)
    if task == 'retrieval':
        for name in ('visual_encoder', 'vision_proj', 'text_encoder', 'text_proj'):
            for key in [k for k in state_dict if k.startswith(name + '.')]:
                state_dict[name + '_m' + key[len(name):]] = state_dict[key].clone()
        embed_dim = state_dict['vision_proj.weight'].shape[0]
        state_dict['image_queue'] = F.normalize(torch.randn(embed_dim, QUEUE_SIZE), dim=0)
        state_dict['text_queue'] = F.normalize(torch.randn(embed_dim, QUEUE_SIZE), dim=0)
        state_dict['idx_queue'] = torch.full((1, QUEUE_SIZE), -100)
        state_dict['ptr_queue'] = torch.zeros(1, dtype=torch.long)
        state_dict['temp'] = torch.tensor(0.07)
    out_path = Path(out_path)
    if out_path.suffix == '.safetensors':
        save_safetensors(state_dict, out_path)
    else:
        save_checkpoint({'model': state_dict}, out_path)
    vision, text = hf_model.config.vision_config, hf_model.config.text_config
    print(f'converted {hf_dir} ({TASKS[task]}) -> {out_path}; model keys for a config: '
          f"vit {{width: {vision.hidden_size}, depth: {vision.num_hidden_layers}, heads: {vision.num_attention_heads}, "
          f"patch_size: {vision.patch_size}}}, image_size {vision.image_size}, med_config with hidden_size "
          f'{text.hidden_size}, {text.num_hidden_layers} layers, {text.num_attention_heads} heads', file=sys.stderr)
    return out_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter,
                                     epilog='\n'.join(__doc__.splitlines()[1:5]))
    commands = parser.add_subparsers(dest='command', required=True)
    to = commands.add_parser('to-hf', help='our / the original .pth -> a transformers folder')
    to.add_argument('checkpoint', help='.pth or .safetensors file, or an http(s) URL')
    to.add_argument('out_dir')
    to.add_argument('--task', choices=sorted(TASKS), required=True)
    to.add_argument('--config', help='task config with the model keys (vit, image_size, med_config, embed_dim) '
                                     'of a checkpoint that is not an official size')
    back = commands.add_parser('from-hf', help='a transformers folder -> our .pth (or .safetensors)')
    back.add_argument('hf_dir', help='a local transformers folder (or a hub name, when the hub is reachable)')
    back.add_argument('out')
    back.add_argument('--task', choices=sorted(TASKS), required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == 'to-hf':
            to_hf(args.checkpoint, args.out_dir, args.task, args.config)
        else:
            from_hf(args.hf_dir, args.out, args.task)
    except (ConversionError, CheckpointError, ConfigError, FileNotFoundError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
