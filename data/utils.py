"""Text preprocessing, annotation I/O and result merging (caption metrics: metrics.py).

- `pre_caption` / `pre_question`: the original BLIP text normalisation, unchanged.
- Annotation files: `fetch_annotation(ann_root, filename)` downloads a file the original
  release hosts (URL table `ANNOTATION_URLS`) when it is missing; `load_json_list` and
  `load_jsonl` read and validate them so that bad input fails at load time with the file
  and entry index named (`DataError`).
- `save_result`: per-rank result files merged on rank 0 (atomic writes, works with or
  without a process group).
- `coco_gt_file`: the COCO Karpathy caption ground truth (downloaded when missing).
"""
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from engine.fileio import atomic_write
from utils import barrier, get_rank, get_world_size


class DataError(RuntimeError):
    """Bad or missing input data: the message names the file (and the entry index)."""


# --------------------------------------------------------------------------------------
# Text preprocessing (identical behaviour to the original data/utils.py)
# --------------------------------------------------------------------------------------

_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
_MULTI_SPACE = re.compile(r"\s{2,}")


def pre_caption(caption, max_words=50):
    """Lower-case, punctuation to spaces, collapse whitespace, keep the first max_words."""
    caption = _PUNCTUATION.sub(" ", caption.lower())
    caption = _MULTI_SPACE.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def pre_question(question, max_ques_words=50):
    """Lower-case, drop punctuation (no whitespace collapsing), keep max_ques_words words."""
    question = _PUNCTUATION.sub("", question.lower())
    question = question.rstrip(" ")
    words = question.split(" ")
    if len(words) > max_ques_words:
        question = " ".join(words[:max_ques_words])
    return question


# --------------------------------------------------------------------------------------
# Annotation download (the original's URLs; torchvision's download_url replaced by an
# atomic urllib download with a clear offline error)
# --------------------------------------------------------------------------------------

_GCS = "https://storage.googleapis.com/sfr-vision-language-research/datasets/"
ANNOTATION_URLS = {
    name: _GCS + name
    for name in (
        "coco_karpathy_train.json", "coco_karpathy_val.json", "coco_karpathy_test.json",
        "coco_karpathy_val_gt.json", "coco_karpathy_test_gt.json",
        "flickr30k_train.json", "flickr30k_val.json", "flickr30k_test.json",
        "vqa_train.json", "vqa_val.json", "vg_qa.json", "vqa_test.json", "answer_list.json",
        "nlvr_train.json", "nlvr_dev.json", "nlvr_test.json",
        "nocaps_val.json", "nocaps_test.json",
        "msrvtt_test.jsonl",
    )
}

_CHUNK = 1 << 20


def _report(message):
    print(message, file=sys.stderr, flush=True)


def download_if_missing(url, path, timeout=60):
    """Download url to path unless path exists. Returns path.

    Writes to a temporary file in the same folder and renames it, so an interrupted
    download (or several ranks downloading at once) never leaves a truncated file.
    Raises DataError naming the file, the folder to put it in and the URL on failure.
    """
    path = os.path.abspath(path)
    if os.path.isfile(path):
        return path
    folder, name = os.path.split(path)
    _report(f"Downloading {url} -> {path}")
    try:
        with atomic_write(path) as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0)
            done, next_report = 0, 0.1
            while True:
                chunk = response.read(_CHUNK)
                if not chunk:
                    break
                out.write(chunk)
                done += len(chunk)
                if total and done / total >= next_report:
                    _report(f"  {name}: {done / 2**20:.1f} / {total / 2**20:.1f} MiB "
                            f"({100 * done / total:.0f}%)")
                    next_report += 0.1
            if total and done != total:
                raise OSError(f"connection closed after {done} of {total} bytes")
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise DataError(
            f"Annotation file '{name}' is missing from folder '{folder}' and could not be "
            f"downloaded from {url} ({error}). Download it from that URL yourself and put it "
            f"in '{folder}'.") from error
    _report(f"  saved {name} ({done} bytes)")
    return path


def fetch_annotation(ann_root, filename):
    """Path of ann_root/filename, downloaded from the original's URL when it is missing."""
    path = os.path.join(ann_root, filename)
    if os.path.isfile(path):
        return path
    url = ANNOTATION_URLS.get(filename)
    if url is None:
        raise DataError(f"Annotation file '{filename}' not found in folder '{ann_root}' "
                        f"(no download URL is known for it).")
    return download_if_missing(url, path)


# --------------------------------------------------------------------------------------
# Annotation reading and validation
# --------------------------------------------------------------------------------------

def _read_json(path):
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as error:
        raise DataError(f"Annotation file not found: {path}") from error
    except json.JSONDecodeError as error:
        raise DataError(f"Malformed annotation file {path}: {error.msg} at line "
                        f"{error.lineno} column {error.colno}") from error
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"Cannot read annotation file {path}: {error}") from error


def load_json(path):
    """Any JSON document, with DataError naming the file on failure."""
    return _read_json(path)


def _type_name(types):
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in types)


# Text fields of annotation files that must not be empty (an empty caption trains on nothing)
TEXT_FIELDS = ("caption", "sentence", "question")


def check_entries(entries, path, fields, start=0, allow_empty=False):
    """Every entry is a dict with each field of `fields` {name: type or tuple of types}.

    A field type `list` means a list of strings (captions, answers). A field of TEXT_FIELDS
    must hold text, not "" (in a list, no element may be empty), unless `allow_empty` (a
    model's generated captions). Raises DataError naming the file, the entry index and the field.
    """
    for index, entry in enumerate(entries, start):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: entry {index} should be a JSON object, "
                            f"got {type(entry).__name__}")
        for field, types in fields.items():
            if field not in entry:
                raise DataError(f"{path}: entry {index} has no required field '{field}' "
                                f"(fields present: {sorted(entry)})")
            value = entry[field]
            allowed = types if isinstance(types, tuple) else (types,)
            # bool is an int subclass: an id of true/false is a mistake unless bool is allowed
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                raise DataError(f"{path}: entry {index} field '{field}' should be "
                                f"{_type_name(types)}, got {type(value).__name__} {value!r:.60}")
            if isinstance(value, list) and not all(isinstance(v, str) for v in value):
                raise DataError(f"{path}: entry {index} field '{field}' should be a list "
                                f"of strings, got {value!r:.80}")
            if not allow_empty and field in TEXT_FIELDS and any(not v.strip() for v in (value if isinstance(value, list) else [value])
                                            if isinstance(v, str)):
                raise DataError(f"{path}: entry {index} field '{field}' is empty")
    return entries


def load_json_list(path, fields):
    """A JSON list of annotation entries, each checked with `check_entries`."""
    entries = _read_json(path)
    if not isinstance(entries, list):
        raise DataError(f"Malformed annotation file {path}: expected a JSON list of entries, "
                        f"got {type(entries).__name__}")
    return check_entries(entries, path, fields)


def load_jsonl(path, fields):
    """One JSON object per line (blank lines skipped); entry index = line number - 1."""
    entries = []
    try:
        with open(path, "r", encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError as error:
        raise DataError(f"Annotation file not found: {path}") from error
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"Cannot read annotation file {path}: {error}") from error
    for line_number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"Malformed annotation file {path}: line {line_number}: "
                            f"{error.msg}") from error
        check_entries([entry], path, fields, start=line_number - 1)
        entries.append(entry)
    return entries


def _entry(index, ann_file):
    # an entry index, or a row a custom-data source names itself ('line 3')
    return f"entry {index} of {ann_file}" if isinstance(index, int) else f"{index} of {ann_file}"


def load_image(image_path, ann_file, index):
    """RGB PIL image; DataError naming the image, the annotation file and the entry."""
    try:
        with Image.open(image_path) as image:
            return image.convert("RGB")
    except FileNotFoundError as error:
        raise DataError(f"Image not found: {image_path} ({_entry(index, ann_file)})") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"Cannot read image {image_path} ({_entry(index, ann_file)}): "
                        f"{error}") from error


def check_image_files(files, mode="exists", workers=16):
    """Before any training: every image of `files` [(path, annotation file, entry)] exists
    and PIL reads its header (mode "exists"), or decodes whole (mode "full"); "off" skips the
    check. One DataError lists the first failures (file and entry) and the count."""
    if mode == "off":
        return
    if mode not in ("exists", "full"):
        raise ValueError(f"check_images must be full, exists or off, not {mode!r}")
    unique = list({path: (path, ann_file, entry) for path, ann_file, entry in reversed(files)}.values())[::-1]

    def problem(item):
        path, ann_file, entry = item
        try:
            if mode == "full":
                load_image(path, ann_file, entry)
            else:
                with Image.open(path):  # reads the header only
                    pass
        except DataError as error:
            return str(error)
        except FileNotFoundError:
            return f"Image not found: {path} ({_entry(entry, ann_file)})"
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            return f"Cannot read image {path} ({_entry(entry, ann_file)}): {error}"
        return None

    start = time.time()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = [p for p in pool.map(problem, unique) if p]
    print(f"checked {len(unique)} images ({mode}) in {time.time() - start:.1f} s", flush=True)
    if problems:
        listed = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise DataError(f"{len(problems)} of {len(unique)} images cannot be used:\n  {listed}{more}\n"
                        f"(fix or remove those entries; check_images=off skips this check)")


# --------------------------------------------------------------------------------------
# Result files
# --------------------------------------------------------------------------------------

def write_json_atomic(obj, path):
    """json.dump to `path` atomically (engine.fileio.atomic_write)."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def save_result(result, result_dir, filename, remove_duplicate=""):
    """Merge every rank's `result` list into result_dir/filename.json; returns that path.

    Each rank writes filename_rank{r}.json atomically, all ranks meet at a barrier, rank 0
    concatenates the files in rank order, keeps the first entry per `remove_duplicate`
    key (the DistributedSampler pads with repeated samples) and writes the final file
    atomically; a second barrier makes the file visible to every rank on return.
    Without a process group it is the same with one rank.
    """
    rank, world_size = get_rank(), get_world_size()
    final_file = os.path.join(result_dir, f"{filename}.json")
    write_json_atomic(result, os.path.join(result_dir, "%s_rank%d.json" % (filename, rank)))
    barrier()

    if rank == 0:
        merged = []
        for r in range(world_size):
            rank_file = os.path.join(result_dir, "%s_rank%d.json" % (filename, r))
            if not os.path.isfile(rank_file):
                raise DataError(f"save_result: the result file of rank {r}, {rank_file}, is "
                                f"missing (every rank must call save_result)")
            part = _read_json(rank_file)
            if not isinstance(part, list):
                raise DataError(f"{rank_file}: expected a JSON list of results")
            merged += part
        if remove_duplicate:
            seen, unique = set(), []
            for index, item in enumerate(merged):
                if remove_duplicate not in item:
                    raise DataError(f"save_result: result {index} has no key "
                                    f"'{remove_duplicate}' to remove duplicates by")
                key = json.dumps(item[remove_duplicate], sort_keys=True)
                if key not in seen:
                    seen.add(key)
                    unique.append(item)
            merged = unique
        write_json_atomic(merged, final_file)
        print(f"result file saved to {final_file}")
    barrier()
    return final_file


# --------------------------------------------------------------------------------------
# Caption ground truth (the metrics are in metrics.py)
# --------------------------------------------------------------------------------------

def coco_gt_file(coco_gt_root, split):
    """The COCO Karpathy val/test caption ground truth in coco_gt_root (downloaded if missing)."""
    filenames = {"val": "coco_karpathy_val_gt.json", "test": "coco_karpathy_test_gt.json"}
    if split not in filenames:
        raise ValueError(f"coco_caption_eval: split must be 'val' or 'test', got {split!r}")
    return fetch_annotation(coco_gt_root, filenames[split])
