"""Your own image-text pairs for train_retrieval.py and train_caption.py (`dataset: custom`).

A source is a file of (image, caption) rows or a folder:
- `.csv`: a header row naming the columns `image` and `caption` (other columns are ignored);
  one row per caption, so an image with five captions has five rows;
- `.json`: a list of {"image": ..., "caption": "..." or ["...", ...]};
- `.jsonl`: one such object per line;
- a folder: every image under it (recursively) with a sidecar `.txt` of the same name
  (`dog.jpg` + `dog.txt`), one caption per non-empty line.
Image paths are relative to `image_root` when it is set, else to the folder of the file.

Config keys (CUSTOM_DEFAULTS): `train_file`, `val_file`, `test_file` (one source per split), or
`data_file` alone, split by image (never one image in two splits) into `val_fraction` and
`test_fraction` with `split_seed`. Every row is checked before training: a missing image, an
empty caption, a duplicate (image, caption) row, a missing column: a DataError naming the
file and the row (`line N` of a .csv/.jsonl counting the header, `entry N` of a .json list,
the sidecar file of a folder). With `bad_rows: skip` such rows are left out and counted.

The datasets give what the scripts need: training items (image, prompt + caption, image
index) as the Karpathy files, evaluation items (image, image index) with the retrieval
side (.text, .txt2img, .img2txt) and COCO-format caption ground truth (coco_ground_truth).
"""
import csv
import json
import os
import random
from dataclasses import dataclass

from data.coco_karpathy_dataset import caption_train_dataset, retrieval_eval_dataset
from data.utils import DataError, pre_caption
from engine.config import ConfigError

CUSTOM_DEFAULTS = {
    'image_root': '',        # image paths are relative to it; '': to each source's folder
    'train_file': None, 'val_file': None, 'test_file': None,  # .csv | .json | .jsonl | folder
    'data_file': None,       # instead of the three: one source, split by image
    'val_fraction': 0.1, 'test_fraction': 0.1, 'split_seed': 0,
    'bad_rows': 'error',     # error | skip (left out, counted)
}
SPLITS = ('train', 'val', 'test')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff')
FILE_FORMATS = ('.csv', '.json', '.jsonl')


@dataclass
class Row:
    image: str    # the path that is opened
    caption: str  # as written (pre_caption is applied by the datasets, as for every task)
    where: str    # the row in its source, for messages: 'line 3', 'entry 2', 'dog.txt'


def check_config(config, path):
    """ConfigError naming the key unless the custom-data keys of `config` (from file `path`)
    name existing sources and meaningful split fractions."""
    files = {split: config.get(f'{split}_file') for split in SPLITS}
    data_file = config.get('data_file')
    if data_file and any(files.values()):
        raise ConfigError(f"config file {path}: set either data_file or train_file/val_file/"
                          f"test_file, not both")
    if not data_file and not all(files.values()):
        missing = [f'{split}_file' for split, source in files.items() if not source]
        raise ConfigError(f"config file {path}: dataset custom needs data_file, or all of "
                          f"train_file, val_file and test_file (missing: {', '.join(missing)})")
    for key in ['data_file'] if data_file else [f'{split}_file' for split in SPLITS]:
        source = config[key]
        if not isinstance(source, str) or not os.path.exists(source):
            raise ConfigError(f"config file {path}: {key}: {source!r} does not exist")
        if not os.path.isdir(source) and not source.lower().endswith(FILE_FORMATS):
            raise ConfigError(f"config file {path}: {key}: {source!r} is neither a folder nor a "
                              f"{', '.join(FILE_FORMATS)} file")
    if data_file:
        fractions = [config.get('val_fraction', 0.1), config.get('test_fraction', 0.1)]
        for key, value in zip(('val_fraction', 'test_fraction'), fractions):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ConfigError(f"config file {path}: {key} must be a number between 0 and 1 "
                                  f"(exclusive); got {value!r}")
        if sum(fractions) >= 1:
            raise ConfigError(f"config file {path}: val_fraction + test_fraction must leave "
                              f"images to train on; got {fractions[0]} + {fractions[1]}")
    if config.get('bad_rows', 'error') not in ('error', 'skip'):
        raise ConfigError(f"config file {path}: bad_rows must be error or skip; got "
                          f"{config['bad_rows']!r}")
    image_root = config.get('image_root')
    if image_root and not os.path.isdir(image_root):
        raise ConfigError(f"config file {path}: image_root: data folder {image_root!r} does not exist")


# --------------------------------------------------------------------------- reading sources

def _open_text(source):
    try:
        with open(source, encoding='utf-8-sig') as f:  # -sig: spreadsheets write a BOM
            return f.read()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {source}: {error}") from error


def _csv_rows(source):
    lines = _open_text(source).splitlines(keepends=True)
    reader = csv.reader(lines)
    header = [name.strip() for name in next(reader, [])]
    missing = [name for name in ('image', 'caption') if name not in header]
    if missing:
        raise DataError(f"{source}: line 1: the header must name the columns 'image' and "
                        f"'caption' (missing {', '.join(repr(m) for m in missing)}; found "
                        f"{', '.join(repr(h) for h in header) or 'no columns'})")
    image_col, caption_col = header.index('image'), header.index('caption')
    for values in reader:
        where = f'line {reader.line_num}'
        if not any(value.strip() for value in values):
            continue  # a blank line
        if len(values) != len(header):
            yield None, None, where, (f"has {len(values)} values, the header {len(header)} "
                                      f"(a caption with a comma needs quotes)")
            continue
        yield values[image_col].strip(), values[caption_col], where, None


def _json_objects(source):
    text = _open_text(source)
    if source.lower().endswith('.jsonl'):
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield json.loads(line), f'line {number}', None
                except json.JSONDecodeError as error:
                    yield None, f'line {number}', f'is not JSON ({error.msg})'
        return
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{source}: not JSON: {error.msg} at line {error.lineno} column "
                        f"{error.colno}") from error
    if not isinstance(entries, list):
        raise DataError(f"{source}: expected a JSON list of {{image, caption}} objects, got "
                        f"{type(entries).__name__}")
    for number, entry in enumerate(entries):
        yield entry, f'entry {number}', None


def _json_rows(source):
    for entry, where, problem in _json_objects(source):
        if problem is None and not isinstance(entry, dict):
            problem = f'should be an object {{image, caption}}, got {type(entry).__name__}'
        if problem is None:
            missing = [key for key in ('image', 'caption') if key not in entry]
            if missing:
                problem = f"has no field {' or '.join(repr(m) for m in missing)} (fields: {sorted(entry)})"
        if problem is None and not isinstance(entry['image'], str):
            problem = f"field 'image' should be a path, got {entry['image']!r:.60}"
        if problem:
            yield None, None, where, problem
            continue
        captions = entry['caption'] if isinstance(entry['caption'], list) else [entry['caption']]
        for caption in captions:
            yield entry['image'], caption, where, None


def _folder_rows(folder):
    for directory, subdirs, names in os.walk(folder):
        subdirs.sort()
        for name in sorted(names):
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            image = os.path.join(directory, name)
            sidecar = os.path.splitext(image)[0] + '.txt'
            if not os.path.isfile(sidecar):
                yield image, None, image, f'has no caption file {os.path.basename(sidecar)}'
                continue
            captions = [line for line in _open_text(sidecar).splitlines() if line.strip()]
            if not captions:
                yield image, None, sidecar, 'is empty (one caption per line)'
            for caption in captions:
                yield image, caption, sidecar, None


def read_rows(source, image_root='', bad_rows='error'):
    """The checked [Row] of one source (see the module docstring).

    bad_rows 'error': the first bad row raises a DataError naming the source and the row;
    'skip': bad rows are left out and counted in a printed summary. Either way a source
    with no usable row is an error.
    """
    folder = os.path.isdir(source)
    if folder:
        raw = _folder_rows(source)
    elif source.lower().endswith('.csv'):
        raw = _csv_rows(source)
    elif source.lower().endswith(FILE_FORMATS):
        raw = _json_rows(source)
    else:
        raise DataError(f"{source}: not a folder or a {', '.join(FILE_FORMATS)} file")
    base = image_root or (source if folder else os.path.dirname(os.path.abspath(source)))

    rows, skipped, seen = [], [], set()
    for image, caption, where, problem in raw:
        if problem is None and not isinstance(caption, str):
            problem = f"caption should be text, got {caption!r:.60}"
        if problem is None and not image:
            problem = "has no image path"
        if problem is None and not pre_caption(caption):
            problem = f"caption {caption!r} is empty" + (" after removing punctuation" if caption.strip() else "")
        path = image if folder else os.path.join(base, image or '')
        if problem is None and not os.path.isfile(path):
            problem = f"image {path} does not exist"
        if problem is None and (path, caption.strip()) in seen:
            problem = f"repeats the row ({image}, {caption.strip()!r})"
        if problem is not None:
            message = f"{source}: {where} {problem}" if not folder else f"{where} {problem}"
            if bad_rows != 'skip':
                raise DataError(message + " (bad_rows: skip leaves such rows out)")
            skipped.append(message)
            continue
        seen.add((path, caption.strip()))
        rows.append(Row(path, caption, where))
    if skipped:
        print(f"{source}: skipped {len(skipped)} bad row(s) (bad_rows: skip), kept {len(rows)}; "
              f"first: {skipped[0]}", flush=True)
    if not rows:
        raise DataError(f"{source}: no usable (image, caption) rows")
    return rows


def split_by_image(rows, val_fraction, test_fraction, seed):
    """(train, val, test) rows of one source: its images shuffled with `seed` and cut by the
    fractions (at least one image in val and in test), every row following its image."""
    images = list(dict.fromkeys(row.image for row in rows))
    if len(images) < 3:
        raise DataError(f"data_file has {len(images)} image(s); a train/val/test split needs 3 "
                        f"or more")
    random.Random(seed).shuffle(images)
    n_val = max(1, round(val_fraction * len(images)))
    n_test = max(1, round(test_fraction * len(images)))
    if n_val + n_test >= len(images):
        raise DataError(f"data_file: {len(images)} images leave none to train on with "
                        f"val_fraction {val_fraction} and test_fraction {test_fraction}")
    split_of = {image: 'val' for image in images[:n_val]}
    split_of.update({image: 'test' for image in images[n_val:n_val + n_test]})
    return tuple([row for row in rows if split_of.get(row.image, 'train') == split] for split in SPLITS)


def load_splits(config):
    """{'train': (rows, source), 'val': ..., 'test': ...} of a custom-data config."""
    bad_rows = config.get('bad_rows', 'error')
    image_root = config.get('image_root') or ''
    if config.get('data_file'):
        source = config['data_file']
        rows = read_rows(source, image_root, bad_rows)
        parts = split_by_image(rows, config.get('val_fraction', 0.1),
                               config.get('test_fraction', 0.1), config.get('split_seed', 0))
        splits = {split: (part, f'{source} ({split} part)') for split, part in zip(SPLITS, parts)}
    else:
        splits = {split: (read_rows(config[f'{split}_file'], image_root, bad_rows), config[f'{split}_file'])
                  for split in SPLITS}
    train_images = {row.image for row in splits['train'][0]}
    for split in ('val', 'test'):
        shared = len(train_images & {row.image for row in splits[split][0]})
        if shared:
            print(f"warning: {shared} image(s) of the {split} split ({splits[split][1]}) are also "
                  f"training images: its metrics will be optimistic", flush=True)
    return splits


# --------------------------------------------------------------------------- datasets

class custom_train(caption_train_dataset):
    """Items (image, prompt + caption, image index), one per row, in the order of the rows."""

    def __init__(self, transform, rows, source, max_words=30, prompt=''):
        annotation = [{'image': row.image, 'caption': row.caption, 'image_id': row.image,
                       'where': row.where} for row in rows]
        super().__init__(transform, '', annotation, source, max_words, prompt)


class custom_eval(retrieval_eval_dataset):
    """Items (image, image index) with the retrieval side (.text, .txt2img, .img2txt) and the
    captioning ground truth (coco_ground_truth; the image index is its image_id)."""

    def __init__(self, transform, rows, source, max_words=30):
        by_image = {}
        for row in rows:
            entry = by_image.setdefault(row.image, {'image': row.image, 'caption': [], 'where': row.where})
            entry['caption'].append(row.caption)
        super().__init__(transform, '', list(by_image.values()), source, max_words)

    def coco_ground_truth(self):
        """The split's captions as a COCO caption ground-truth dict (what caption_eval reads)."""
        annotations = []
        for image_id, entry in enumerate(self.annotation):
            for caption in entry['caption']:
                annotations.append({'image_id': image_id, 'id': len(annotations), 'caption': caption})
        return {'info': {'description': f'captions of {self.ann_file}'}, 'licenses': [],
                'type': 'captions',
                'images': [{'id': i, 'file_name': entry['image']} for i, entry in enumerate(self.annotation)],
                'annotations': annotations}
