"""CapFilt (BLIP paper, section 3.3): bootstrap a noisy image-text dataset with a captioner and a filter.

    python capfilt.py --config configs/capfilt.yaml --output_dir output/capfilt
    torchrun --nproc_per_node=8 capfilt.py --config configs/capfilt.yaml --output_dir output/capfilt amp=bf16
    python capfilt.py --config configs/capfilt.yaml --output_dir output/scored filter_only=true

For every image of the pre-training lists in `train_file` ({'image': path, 'caption': str or
[str]}, the format pretrain.py reads), the captioner (the image-grounded decoder fine-tuned for
captioning) writes `num_captions` synthetic captions by nucleus sampling (`top_p`, with the
original's repetition penalty 1.1 and top-k 50, after `prompt`), and the filter (the ITM head of
a retrieval model) scores every text, web and synthetic, against its image: a text is kept when
p(match) > `itm_threshold` (the paper's rule: the ITM head predicts "match"). Written to
--output_dir:

    web_filtered.json, synthetic_filtered.json   kept pairs, {'image', 'caption'} as pretrain.py reads
    scores.jsonl    every text: image, source (web / synthetic), text, itm, itc, kept
    summary.json    counts and kept fraction per source, threshold, checkpoints, time per image,
                    the images that could not be read (file and entry)

The images go in chunks of `chunk_size`, each saved under capfilt_parts/ when done and sampled
with its own seed: a run killed and restarted with the same --output_dir skips the finished
chunks and ends with the files an uninterrupted run writes, with any number of processes.
`filter_only` scores the existing captions (no captioner); `caption_only` writes synthetic
captions without filtering them (all kept).
"""
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import ranking
import utils
from data import eval_transform
from data.utils import DataError, load_image, load_json, pre_caption, write_json_atomic
from engine import cli, logs, precision, preflight, training
from engine.config import ConfigError
from engine.fileio import atomic_write
from models.blip import blip_decoder, require_weights
from models.blip_itm import blip_itm

REQUIRED_KEYS = ('train_file', 'captioner_checkpoint', 'filter_checkpoint', 'vit', 'image_size')
TASK_DEFAULTS = {
    'med_config': 'configs/med_config.json',
    'embed_dim': 256,
    'image_root': '',           # joined to relative image paths, and holds the files of `url` entries
    'prompt': 'a picture of ',
    'num_captions': 1,          # synthetic captions per image (the paper: 1)
    'top_p': 0.9,               # nucleus sampling (the paper's)
    'min_length': 5,            # caption_coco.yaml's
    'max_length': 20,
    'itm_threshold': 0.5,       # keep a text when p(match) > this
    'batch_size': 32,
    'chunk_size': 1024,         # images per saved unit of work (resume granularity)
    'filter_only': False,
    'caption_only': False,
}
PARTS = 'capfilt_parts'


class CapfiltImages(Dataset):
    """(image tensor, position, error message or '') of the entries; unreadable images give
    an error instead of stopping the run (they are reported and skipped)."""

    def __init__(self, entries, image_size):
        self.entries, self.transform, self.image_size = entries, eval_transform(image_size), image_size

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, index):
        entry = self.entries[index]
        try:
            return self.transform(load_image(entry['image'], entry['file'], entry['entry'])), index, ''
        except DataError as error:
            return torch.zeros(3, self.image_size, self.image_size), index, str(error)


def train_files(config):
    return config['train_file'] if isinstance(config['train_file'], list) else [config['train_file']]


def read_entries(config):
    """Every image of the `train_file` lists: {'image', 'captions', 'file', 'entry'}, and the
    number of empty web captions left out."""
    files = train_files(config)
    entries, empty = [], 0
    for path in files:
        data = load_json(path)
        if not isinstance(data, list):
            raise DataError(f'{path}: expected a JSON list of {{image, caption}} entries, got {type(data).__name__}')
        for index, item in enumerate(data):
            if not isinstance(item, dict) or not ('image' in item or 'url' in item):
                raise DataError(f"{path}: entry {index} needs an 'image' (or 'url') field, got {item!r:.80}")
            captions = item.get('caption', [])
            captions = [captions] if isinstance(captions, str) else captions
            if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
                raise DataError(f"{path}: entry {index} field 'caption' should be a string or a list of strings")
            empty += sum(not pre_caption(c, 30) for c in captions)
            captions = [c for c in captions if pre_caption(c, 30)]
            entries.append({'image': _image_path(item, config['image_root'], path, index), 'captions': captions,
                            'file': path, 'entry': index})
    return entries, empty


def _image_path(item, image_root, path, index):
    if 'image' in item:
        image = item['image']
        return os.path.join(image_root, image) if image_root and not os.path.isabs(image) else image
    if not image_root:
        raise DataError(f"{path}: entry {index} has a 'url' but no 'image': set image_root to the folder "
                        f"holding the downloaded files (named as the URL's last part)")
    return os.path.join(image_root, os.path.basename(item['url'].split('?')[0]))


@torch.no_grad()
def process_chunk(chunk, entries, models, device, config, seed):
    """The score lines and skipped images of one chunk of entries."""
    captioner, filter_model = models
    dataset = CapfiltImages(entries, config['image_size'])
    loader = DataLoader(dataset, batch_size=config['batch_size'], num_workers=config['num_workers'],
                        shuffle=False, pin_memory=device.type == 'cuda')
    lines, skipped = [], []
    for batch_number, (images, positions, errors) in enumerate(loader):
        readable = [i for i, error in enumerate(errors) if not error]
        skipped += [{'image': entries[int(positions[i])]['image'], 'file': entries[int(positions[i])]['file'],
                     'entry': entries[int(positions[i])]['entry'], 'error': errors[i]}
                    for i in range(len(errors)) if errors[i]]
        if not readable:
            continue
        batch = [entries[int(positions[i])] for i in readable]
        images = torch.stack([images[i] for i in readable]).to(device, non_blocking=True)
        texts, owners, sources = [], [], []
        for row, entry in enumerate(batch):
            texts += entry['captions']
            owners += [row] * len(entry['captions'])
            sources += ['web'] * len(entry['captions'])
        if captioner is not None:
            # each batch its own seed: the samples do not depend on what ran before
            torch.manual_seed(seed + 1_000_003 * chunk + batch_number)
            with precision.autocast(config, device):
                synthetic = captioner.generate(images, sample=True, top_p=config['top_p'],
                                               max_length=config['max_length'], min_length=config['min_length'],
                                               num_captions=config['num_captions'])
            texts, owners, sources = _merge_by_image(texts, owners, sources, synthetic, config['num_captions'])
        if filter_model is not None and texts:
            with precision.autocast(config, device):
                image_feats = filter_model.visual_encoder(images)
                image_embeds = F.normalize(filter_model.vision_proj(image_feats[:, 0, :]).float(), dim=-1)
            itm, itc = ranking.match_scores(filter_model, image_feats, image_embeds,
                                            [pre_caption(t, 30) for t in texts], owners, device, config)
            itm, itc = itm.tolist(), itc.tolist()
        else:
            itm = itc = [None] * len(texts)
        for text, owner, source, p_match, sim in zip(texts, owners, sources, itm, itc):
            kept = True if p_match is None else p_match > config['itm_threshold']
            lines.append({'image': batch[owner]['image'], 'source': source, 'text': text,
                          'itm': p_match, 'itc': sim, 'kept': kept})
    return lines, skipped


def _merge_by_image(texts, owners, sources, synthetic, per_image):
    """Web texts and synthetic captions grouped by image (owners sorted), web first."""
    merged = []
    for index, (text, owner, source) in enumerate(zip(texts, owners, sources)):
        merged.append((owner, 0, index, text, source))
    for index, caption in enumerate(synthetic):
        merged.append((index // per_image, 1, index, caption, 'synthetic'))
    merged.sort(key=lambda item: item[:3])
    return [m[3] for m in merged], [m[0] for m in merged], [m[4] for m in merged]


def load_models(config, device):
    """(captioner or None, filter or None), each refused when its checkpoint lacks its weights."""
    keys = dict(image_size=config['image_size'], vit=config['vit'], med_config=config['med_config'])
    models = []
    for key, used, factory, options in (
            ('captioner_checkpoint', not config['filter_only'], blip_decoder, {'prompt': config['prompt']}),
            ('filter_checkpoint', not config['caption_only'], blip_itm, {'embed_dim': config['embed_dim']})):
        if not used:
            models.append(None)
            continue
        if not config[key]:
            raise ConfigError(f'{key} is empty: CapFilt needs a trained model there (a random one would '
                                    f'caption or filter at chance)')
        model = factory(pretrained=config[key], **options, **keys)
        require_weights(model, config[key], f'{key} must be a trained model (a random one would caption or '
                                            f'filter at chance)')
        models.append(model.to(device).eval())
    return tuple(models)


def merge_outputs(output_dir, num_chunks, config, num_images, empty_captions, seconds):
    """Stream every chunk's lines, in order, into the four output files (main process)."""
    parts = os.path.join(output_dir, PARTS)
    counts = {source: {'texts': 0, 'kept': 0} for source in ('web', 'synthetic')}
    skipped, worked = [], 0.0
    # each output appears whole or not at all (a kill mid-merge leaves the previous files)
    with atomic_write(os.path.join(output_dir, 'scores.jsonl'), 'w') as scores, \
            atomic_write(os.path.join(output_dir, 'web_filtered.json'), 'w') as web, \
            atomic_write(os.path.join(output_dir, 'synthetic_filtered.json'), 'w') as synthetic:
        outputs = {'web': web, 'synthetic': synthetic}
        for out in outputs.values():
            out.write('[')
        for chunk in range(num_chunks):
            with open(os.path.join(parts, f'chunk-{chunk:06d}.json')) as f:
                part = json.load(f)
            skipped += part['skipped']
            worked += part['seconds']
            for line in part['lines']:
                scores.write(json.dumps(line) + '\n')
                count = counts[line['source']]
                count['texts'] += 1
                if line['kept']:
                    out = outputs[line['source']]
                    out.write((', ' if count['kept'] else '') + json.dumps({'image': line['image'],
                                                                             'caption': line['text']}))
                    count['kept'] += 1
        for out in outputs.values():
            out.write(']\n')
    for count in counts.values():
        count['kept_fraction'] = count['kept'] / count['texts'] if count['texts'] else None
    summary = {
        'images': num_images, 'images_skipped': len(skipped), 'skipped': skipped[:100],
        'empty_web_captions_skipped': empty_captions, **counts,
        'itm_threshold': config['itm_threshold'], 'num_captions': config['num_captions'], 'top_p': config['top_p'],
        'captioner_checkpoint': None if config['filter_only'] else config['captioner_checkpoint'],
        'filter_checkpoint': None if config['caption_only'] else config['filter_checkpoint'],
        'seconds_per_image': worked / max(1, num_images - len(skipped)), 'wall_seconds': seconds,
        'processes': utils.get_world_size(),
    }
    write_json_atomic(summary, os.path.join(output_dir, 'summary.json'))
    return summary


def main(args, config, device):
    if config['filter_only'] and config['caption_only']:
        raise ConfigError(f'config file {args.config}: filter_only and caption_only exclude each other')
    entries, empty_captions = read_entries(config)
    print(f'CapFilt: {len(entries)} images from {len(train_files(config))} file(s)')
    models = load_models(config, device)
    size = config['chunk_size']
    num_chunks = (len(entries) + size - 1) // size
    parts = os.path.join(args.output_dir, PARTS)
    os.makedirs(parts, exist_ok=True)
    mine = [c for c in range(num_chunks) if c % utils.get_world_size() == utils.get_rank()]
    todo = [c for c in mine if not os.path.isfile(os.path.join(parts, f'chunk-{c:06d}.json'))]
    if len(todo) < len(mine):
        print(f'CapFilt: {len(mine) - len(todo)} of this process\'s {len(mine)} chunks already done, skipped')
    start_time = time.time()
    metric_logger = utils.MetricLogger(delimiter='  ')
    for chunk in metric_logger.log_every(todo, 1, 'CapFilt chunks:'):
        began = time.time()
        lines, skipped = process_chunk(chunk, entries[chunk * size:(chunk + 1) * size], models, device, config,
                                       args.seed)
        for item in skipped:
            print(f"CapFilt: skipped {item['error']}")
        write_json_atomic({'lines': lines, 'skipped': skipped, 'seconds': time.time() - began},
                          os.path.join(parts, f'chunk-{chunk:06d}.json'))
    utils.barrier()
    if utils.is_main_process():
        summary = merge_outputs(args.output_dir, num_chunks, config, len(entries), empty_captions,
                                time.time() - start_time)
        print(json.dumps({key: summary[key] for key in ('images', 'images_skipped', 'web', 'synthetic')}))
        if summary['images_skipped']:
            print(f"CapFilt: {summary['images_skipped']} image(s) could not be read and were skipped "
                  f"(listed in {os.path.join(args.output_dir, 'summary.json')})")
    logs.print_elapsed(start_time, 'CapFilt time')


def run(argv=None):
    args, config = cli.parse_args_and_config(
        'BLIP CapFilt: caption and filter a noisy image-text dataset', './configs/capfilt.yaml', 'output/CapFilt',
        defaults=TASK_DEFAULTS, required=REQUIRED_KEYS, known=(), argv=argv, doc=__doc__)
    files = [] if config['filter_only'] else ['captioner_checkpoint']
    files += [] if config['caption_only'] else ['filter_checkpoint']
    preflight.check_paths(config, args.config, files=files)
    training.launch(main, args, config)


if __name__ == '__main__':
    cli.main(run)
