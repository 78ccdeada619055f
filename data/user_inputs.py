"""A user's own images for inference (predict.py): files, folders, globs, URLs and lists.

`collect_inputs` turns command-line INPUTS into records {'image': path-or-URL, ...}; `read_image`
opens one (a local file or an http(s) URL) as RGB, raising ImageReadError with the culprit
named, so the caller can report it, count it and go on.
"""
import glob
import io
import json
import os
import urllib.request
from pathlib import Path

from PIL import Image

from engine.fileio import is_url

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
URL_TIMEOUT_S = 30


class ImageReadError(RuntimeError):
    """An input image that cannot be read; the message names it and says why."""


class InputError(ValueError):
    """An input list or argument that cannot be used; the message names the file and line."""


def collect_inputs(inputs, fields=()):
    """Records in command-line order, duplicates dropped. Each input is an image file, a folder
    (its images, recursively, sorted), a glob, an http(s) URL, a .txt list (one input per line)
    or a .jsonl list of objects with 'image' and the `fields` (e.g. 'question')."""
    records, seen = [], set()

    def add(record):
        key = tuple(record.get(name) for name in ('image',) + tuple(fields))
        if key not in seen:
            seen.add(key)
            records.append(record)

    for item in inputs:
        for record in _expand(str(item), fields):
            add(record)
    return records


def _expand(item, fields):
    if is_url(item):
        return [{'image': item}]
    path = Path(item)
    if path.is_dir():
        return [{'image': str(p)} for p in sorted(path.rglob('*')) if p.suffix.lower() in IMAGE_SUFFIXES]
    if path.suffix.lower() == '.txt' and path.is_file():
        lines = [line.strip() for line in path.read_text(encoding='utf-8').splitlines()]
        return [record for line in lines if line and not line.startswith('#') for record in _expand(line, fields)]
    if path.suffix.lower() == '.jsonl' and path.is_file():
        return _read_jsonl(path, fields)
    if any(char in item for char in '*?['):
        matches = sorted(glob.glob(item, recursive=True))
        if not matches:
            raise InputError(f"no file matches {item!r}")
        return [{'image': m} for m in matches if Path(m).suffix.lower() in IMAGE_SUFFIXES]
    return [{'image': item}]  # a file; if it is missing, reading it reports that


def _read_jsonl(path, fields):
    records = []
    for number, line in enumerate(path.read_text(encoding='utf-8').splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{path} line {number}: not JSON ({error.msg})") from None
        if not isinstance(entry, dict):
            raise InputError(f"{path} line {number}: expected an object with 'image', got {type(entry).__name__}")
        for name in ('image',) + tuple(fields):
            if not isinstance(entry.get(name), str) or not entry[name].strip():
                raise InputError(f"{path} line {number}: '{name}' must be a non-empty string")
        image = entry['image']
        if not is_url(image) and not os.path.isabs(image):
            image = str(path.parent / image)  # relative to the list, as datasets are
        records.append({**{name: entry[name] for name in fields}, 'image': image})
    return records


def read_image(name):
    """RGB PIL image of a local path or an http(s) URL."""
    try:
        if is_url(name):
            with urllib.request.urlopen(name, timeout=URL_TIMEOUT_S) as response:
                data = response.read()
            image = Image.open(io.BytesIO(data))
        else:
            image = Image.open(name)
        with image:
            return image.convert('RGB')
    except FileNotFoundError:
        raise ImageReadError(f"{name}: no such file") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageReadError(f"{name}: {type(error).__name__}: {error}") from None


def load_labels(labels, at_least=2):
    """Class names (or texts): a comma-separated list, or a file (.json list, or one per line)."""
    if os.path.isfile(labels):
        with open(labels, encoding='utf-8-sig') as f:  # -sig: Windows editors start files with a BOM
            text = f.read()
        names = json.loads(text) if labels.endswith('.json') else text.splitlines()
    else:
        names = labels.split(',')
    names = [n.strip() for n in names if isinstance(n, str) and n.strip()]
    if len(names) < at_least:
        what = 'class names' if at_least > 1 else 'text'
        raise InputError(f"{labels!r}: give at least {at_least} {what} (comma-separated, or a file)")
    return names


def load_answer_list(path):
    """A JSON list of answer strings (as the VQA answer_list.json) or a text file, one per line."""
    with open(path, encoding='utf-8-sig') as f:
        text = f.read()
    answers = json.loads(text) if path.endswith('.json') else [line.strip() for line in text.splitlines()]
    answers = [a for a in answers if isinstance(a, str) and a.strip()]
    if not answers:
        raise InputError(f"answer list {path} holds no answers")
    return answers
