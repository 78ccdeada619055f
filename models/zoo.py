"""The official BLIP checkpoints by short name, and one way to load any model for inference.

    from models.zoo import load_model
    model, transform = load_model('caption_base', task='caption', device='cuda')
    captions = model.generate(torch.stack([transform(img) for img in images]).cuda())

`load_model` takes a zoo name (downloaded once into the checkpoint cache, see
engine.fileio.checkpoint_cache_dir) or a local/URL checkpoint plus the model keys of a task
config (`vit`, `image_size`, `med_config`, `embed_dim`, `prompt`), and builds the model a task
needs: 'caption' (blip_decoder), 'vqa' (blip_vqa), 'itm' (blip_itm: ITM head and ITC
features, for matching, classification and search).
"""
from dataclasses import dataclass

import torch

from data import eval_transform

BASE_URL = 'https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/'


@dataclass(frozen=True)
class ZooEntry:
    file: str
    tasks: tuple        # the predict tasks this checkpoint serves
    vit: str
    image_size: int     # the size its official config evaluates at
    description: str

    @property
    def url(self):
        return BASE_URL + self.file


_MATCHING = ('itm',)
ZOO = {
    'pretrain_base': ZooEntry('model_base.pth', _MATCHING, 'base', 224, 'pre-trained, ViT-B, 129M images'),
    'pretrain_base_14m': ZooEntry('model_base_14M.pth', _MATCHING, 'base', 224, 'pre-trained, ViT-B, 14M images'),
    'pretrain_capfilt_large': ZooEntry('model_base_capfilt_large.pth', _MATCHING, 'base', 224,
                                       'pre-trained, ViT-B, 129M images, CapFilt-L'),
    'pretrain_large': ZooEntry('model_large.pth', _MATCHING, 'large', 224, 'pre-trained, ViT-L, 129M images'),
    'retrieval_coco_base': ZooEntry('model_base_retrieval_coco.pth', _MATCHING, 'base', 384,
                                    'image-text retrieval, COCO, ViT-B'),
    'retrieval_coco_large': ZooEntry('model_large_retrieval_coco.pth', _MATCHING, 'large', 384,
                                     'image-text retrieval, COCO, ViT-L'),
    'retrieval_flickr_base': ZooEntry('model_base_retrieval_flickr.pth', _MATCHING, 'base', 384,
                                      'image-text retrieval, Flickr30k, ViT-B'),
    'retrieval_flickr_large': ZooEntry('model_large_retrieval_flickr.pth', _MATCHING, 'large', 384,
                                       'image-text retrieval, Flickr30k, ViT-L'),
    'itm_base': ZooEntry('model_base_retrieval_coco.pth', _MATCHING, 'base', 384,
                         'image-text matching (ITM + ITC), the COCO retrieval model, ViT-B'),
    'itm_large': ZooEntry('model_large_retrieval_coco.pth', _MATCHING, 'large', 384,
                          'image-text matching (ITM + ITC), the COCO retrieval model, ViT-L'),
    'caption_base': ZooEntry('model_base_caption_capfilt_large.pth', ('caption',), 'base', 384,
                             'captioning, COCO, ViT-B (CapFilt-L)'),
    'caption_large': ZooEntry('model_large_caption.pth', ('caption',), 'large', 384, 'captioning, COCO, ViT-L'),
    'vqa_base': ZooEntry('model_base_vqa_capfilt_large.pth', ('vqa',), 'base', 480, 'VQA v2, ViT-B (CapFilt-L)'),
    'vqa_base_129m': ZooEntry('model_vqa.pth', ('vqa',), 'base', 480, 'VQA v2, ViT-B'),
    'nlvr_base': ZooEntry('model_base_nlvr.pth', (), 'base', 384, 'NLVR2, ViT-B (train_nlvr.py only)'),
}

# The model keys a task config may hold, with the defaults of the official configs.
MODEL_DEFAULTS = {'med_config': 'configs/med_config.json', 'embed_dim': 256, 'prompt': 'a picture of '}
TASKS = ('caption', 'vqa', 'itm')


def describe():
    """One line per zoo entry: name, tasks, ViT, image size, what it is."""
    width = max(len(name) for name in ZOO)
    return '\n'.join(f"{name:<{width}}  {','.join(entry.tasks) or '-':<8} ViT-{entry.vit[0].upper()} "
                     f"{entry.image_size}px  {entry.description}" for name, entry in ZOO.items())


def resolve(model, task, config=None):
    """(checkpoint path or URL, factory keyword arguments) for a zoo name or a checkpoint.

    A checkpoint that is not a zoo name needs the model keys of its task config (`config`, a
    dict): at least `vit` and `image_size`; `med_config`, `embed_dim`, `prompt` default to
    the official values. Keys given in `config` override a zoo entry's too."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    config = dict(config or {})
    if model in ZOO:
        entry = ZOO[model]
        if task not in entry.tasks:
            servers = [name for name, e in ZOO.items() if task in e.tasks]
            raise ValueError(f"zoo model {model!r} ({entry.description}) is not a {task} model; "
                             f"{task} models: {', '.join(servers)}")
        checkpoint, keys = entry.url, {'vit': entry.vit, 'image_size': entry.image_size}
    else:
        missing = [key for key in ('vit', 'image_size') if key not in config]
        if missing:
            raise ValueError(f"{model!r} is not a zoo name ({', '.join(ZOO)}); a checkpoint file needs "
                             f"--config with the model keys of its task config (missing: {', '.join(missing)})")
        checkpoint, keys = model, {}
    keys.update({key: config[key] for key in ('vit', 'image_size', 'med_config', 'embed_dim', 'prompt')
                 if key in config})
    for key, value in MODEL_DEFAULTS.items():
        keys.setdefault(key, value)
    kwargs = {'image_size': int(keys['image_size']), 'vit': keys['vit'], 'med_config': keys['med_config']}
    if task == 'caption':
        kwargs['prompt'] = keys['prompt']
    if task == 'itm':
        kwargs['embed_dim'] = int(keys['embed_dim'])
    return checkpoint, kwargs


def load_model(model, task, config=None, device='cpu'):
    """The model for `task` ('caption', 'vqa' or 'itm') from a zoo name or a checkpoint, in eval
    mode on `device`, and the image transform it expects (PIL image -> normalised tensor)."""
    from models.blip import BLIP_Decoder, build_for_inference, require_weights
    from models.blip_itm import BLIP_ITM
    from models.blip_vqa import BLIP_VQA

    checkpoint, kwargs = resolve(model, task, config)
    net, msg = build_for_inference({'caption': BLIP_Decoder, 'vqa': BLIP_VQA, 'itm': BLIP_ITM}[task], kwargs, checkpoint)
    require_weights(net, checkpoint, f'it is not a {task} model', msg=msg)
    return net.to(torch.device(device)).eval(), eval_transform(kwargs['image_size'])
