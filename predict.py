"""BLIP on your own images, without writing Python: one command per job, JSON lines out.

    python predict.py caption --model caption_base photos/
    python predict.py vqa --model vqa_base --question "what is the man holding?" photo.jpg
    python predict.py match --model itm_base --text "a dog on a beach" photos/*.jpg
    python predict.py index --model itm_base photos/ --out gallery.safetensors
    python predict.py search --model itm_base --index gallery.safetensors --query "a dog on a beach" --k 5
    python predict.py classify --model itm_base --labels "dog,cat,bird" --template "a picture of a {}" photos/
    python predict.py models                      # the zoo: every official checkpoint by name

--model is a zoo name (downloaded once) or a checkpoint (.pth or .safetensors, local or URL) with --config, a
task config holding its model keys (vit, image_size, med_config, embed_dim, prompt), e.g.
configs/shapes/caption_coco.yaml. INPUTS are image files, folders (recursively), globs, http(s)
URLs, or a .txt list (one per line) / .jsonl list of {"image": ...} objects. Output: one JSON
line per result on stdout, or appended to --out FILE.jsonl|.csv, where a rerun skips what is
already there. An image that cannot be read is reported on stderr and skipped; the exit status
is then 1.
"""
import argparse
import contextlib
import csv
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

import ranking
from data.user_inputs import ImageReadError, InputError, collect_inputs, load_answer_list, load_labels, read_image
from engine.cli import HelpFormatter
from engine.config import ConfigError, load_config
from engine.fileio import is_url
from engine.precision import autocast
from models import zoo

CAPTION_DEFAULTS = dict(num_beams=3, max_length=20, min_length=5)  # configs/caption_coco.yaml


# ----------------------------------------------------------------------------- the tasks

def caption(model, images, owners, records, args):
    captions = model.generate(images[owners], sample=args.sample, num_beams=args.beams, max_length=args.max_length,
                              min_length=args.min_length, top_p=args.top_p, num_captions=args.num_captions)
    results = []
    for i, record in enumerate(records):
        options = captions[i * args.num_captions:(i + 1) * args.num_captions]
        result = {'image': record['image'], 'caption': options[0]}
        if args.num_captions > 1:
            result['captions'] = options
        results.append(result)
    return results


def vqa(model, image_embeds, owners, records, args):
    questions = [record['question'] for record in records]
    embeds = image_embeds[owners]
    if args.answer_list is None:
        answers = model(None, questions, train=False, inference='generate', image_embeds=embeds)
    else:
        ids = model(None, questions, args.answer_list, train=False, inference='rank', k_test=args.k_test,
                    image_embeds=embeds)
        answers = [args.answer_list[i] for i in ids.tolist()]
    return [{'image': r['image'], 'question': r['question'], 'answer': a} for r, a in zip(records, answers)]


def match(model, image_embeds, owners, records, args):
    texts = [record['text'] for record in records]
    embeds = image_embeds[owners]
    itm = F.softmax(model(None, texts, match_head='itm', image_embeds=embeds).float(), dim=1)[:, 1]
    itc = model(None, texts, match_head='itc', image_embeds=embeds).float().diagonal()
    return [{'image': r['image'], 'text': r['text'], 'itm': round(float(p), 6), 'itc': round(float(s), 6)}
            for r, p, s in zip(records, itm, itc)]


def classify(model, image_embeds, owners, records, args):
    """Zero-shot classification, the evaluation's two stages: ITC shortlists `--k` labels per
    image, ITM (with [ENC] first, as ranking.py scores pairs) re-ranks them; `prob` is p(match)
    normalised over the shortlist."""
    if not hasattr(args, 'label_features'):  # the labels' text features, once per run
        prompts = [args.template.format(label) for label in args.label_list]
        args.label_features = ranking.text_features(model, prompts, image_embeds.device, {}, quiet=True)
    label_ids, label_atts, label_embeds = args.label_features
    itc_embeds = F.normalize(model.vision_proj(image_embeds[owners][:, 0, :]).float(), dim=-1)
    sims, shortlist = (itc_embeds @ label_embeds.t()).topk(min(args.k, len(args.label_list)), dim=1)
    pair_images = owners.cpu()[:, None].expand(shortlist.shape).flatten()
    order = torch.argsort(pair_images, stable=True)  # score_pairs takes pairs sorted by image
    logits = torch.empty(len(order), 2)
    logits[order] = ranking.score_pairs(model, image_embeds, label_ids, label_atts, pair_images[order],
                                        shortlist.cpu().flatten()[order], image_embeds.device, {'amp': args.amp},
                                        quiet=True)
    p_match = logits.softmax(dim=-1)[:, 1].view_as(sims)
    results = []
    for record, row_labels, row_itm, row_itc in zip(records, shortlist.tolist(), p_match.tolist(), sims.tolist()):
        total = sum(row_itm) or 1.0
        ranked = sorted(zip(row_labels, row_itm, row_itc), key=lambda item: -item[1])
        labels = [{'label': args.label_list[i], 'prob': round(p / total, 6), 'itm': round(p, 6), 'itc': round(c, 6)}
                  for i, p, c in ranked]
        results.append({'image': record['image'], 'label': labels[0]['label'], 'labels': labels})
    return results


TASKS = {
    # name: (function, model kind of models.zoo, the fields an input record carries besides
    # 'image', whether the function takes the images' visual encoder outputs or the pixels)
    'caption': (caption, 'caption', (), False),
    'vqa': (vqa, 'vqa', ('question',), True),
    'match': (match, 'itm', ('text',), True),
    'classify': (classify, 'itm', (), True),
}


# ----------------------------------------------------------------------------- embeddings and search

def image_embeddings(model, transform, paths, args, device):
    """(normalised ITC image embeddings of the readable images, their paths, how many failed)."""
    embeds, kept, failed = [], [], 0
    for batch, images, owners, unreadable in image_batches(paths, transform, args, path_of=lambda path: path):
        failed += unreadable
        kept += batch
        if batch:
            with torch.no_grad(), autocast(args.amp, device):
                feats = model.visual_encoder(images.to(device))[owners]
                embeds.append(F.normalize(model.vision_proj(feats[:, 0, :]).float(), dim=-1).cpu())
    width = model.vision_proj.out_features
    return (torch.cat(embeds) if embeds else torch.zeros(0, width)), kept, failed


def run_features(args):
    """features / index: ITC embeddings of images (and --texts) to .safetensors or .npy."""
    from safetensors.torch import save_file
    device = torch.device(args.device)
    config = load_config(args.config) if args.config else {}
    paths = [record['image'] for record in collect_inputs(args.inputs, fields=[])] if args.inputs else []
    texts = load_labels(args.texts, at_least=1) if getattr(args, 'texts', None) else []
    with contextlib.redirect_stdout(sys.stderr):
        model, transform = zoo.load_model(args.model, 'itm', config=config, device=device)
    tensors, failed = {}, 0
    if paths:
        tensors['image_embeds'], paths, failed = image_embeddings(model, transform, paths, args, device)
    if texts:
        with torch.no_grad():
            tensors['text_embeds'] = ranking.text_features(model, texts, device, {'amp': args.amp}, quiet=True)[2].cpu()
    if not tensors:
        raise InputError('nothing to embed: give images and/or --texts')
    meta = {'model': str(args.model), 'images': json.dumps(paths), 'texts': json.dumps(texts)}
    if args.out.endswith('.safetensors'):
        save_file({key: value.contiguous() for key, value in tensors.items()}, args.out, metadata=meta)
    else:  # .npy: one array (images, else texts) and the row names beside it
        import numpy as np
        key = 'image_embeds' if paths else 'text_embeds'
        np.save(args.out, tensors[key].numpy())
        with open(os.path.splitext(args.out)[0] + '.rows.json', 'w', encoding='utf-8') as f:
            json.dump(paths if paths else texts, f)
    print(f"{len(paths)} images, {len(texts)} texts embedded to {args.out}, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


def run_search(args):
    """Text-to-image search over an index: ITC shortlist of --k_test images, re-ranked by ITM
    (logit + similarity, the retrieval evaluation's score); the best --k as JSON lines."""
    from safetensors import safe_open
    device = torch.device(args.device)
    config = load_config(args.config) if args.config else {}
    try:
        with safe_open(args.index, framework='pt') as f:
            meta, image_embeds = f.metadata() or {}, f.get_tensor('image_embeds')
    except Exception as error:  # safetensors raises its own error types for bad files
        raise InputError(f"--index {args.index}: not an index written by `predict.py index` ({error})") from error
    paths = json.loads(meta.get('images', '[]'))
    if meta.get('model') not in (None, str(args.model)):
        print(f"predict.py search: note: the index was built with --model {meta['model']}", file=sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):
        model, transform = zoo.load_model(args.model, 'itm', config=config, device=device)
    queries = [args.query] if args.query else load_labels(args.queries, at_least=1)
    with torch.no_grad():
        ids, atts, query_embeds = ranking.text_features(model, queries, device, {'amp': args.amp}, quiet=True)
        sims, shortlist = ranking.shortlist(query_embeds.cpu(), image_embeds, args.k_test)
        for q, query in enumerate(queries):
            images = torch.stack([transform(read_image(paths[i])) for i in shortlist[q].tolist()]).to(device)
            with autocast(args.amp, device):
                feats = model.visual_encoder(images)
            logits = ranking.score_pairs(model, feats, ids[q:q + 1], atts[q:q + 1], torch.arange(len(images)),
                                         torch.zeros(len(images), dtype=torch.long), device, {'amp': args.amp},
                                         quiet=True)
            scores = logits[:, 1] + sims[q]
            for rank, i in enumerate(scores.argsort(descending=True)[:args.k].tolist()):
                print(json.dumps({'query': query, 'rank': rank + 1, 'image': paths[int(shortlist[q, i])],
                                  'score': round(float(scores[i]), 6),
                                  'itm': round(float(logits[i].softmax(-1)[1]), 6), 'itc': round(float(sims[q, i]), 6)}))
    return 0


# ----------------------------------------------------------------------------- output

class ResultWriter:
    """JSON lines (or CSV rows) to stdout or to a file that a rerun continues: results already
    in the file are skipped; each batch is flushed, so a kill loses at most the batch at hand."""

    def __init__(self, path, key_fields):
        self.path, self.key_fields = path, key_fields
        self.done = set()
        self.stream, self.csv = sys.stdout, None
        if path is None:
            return
        self.is_csv = path.lower().endswith('.csv')
        if os.path.exists(path):
            self._read_finished()
        new_file = not os.path.exists(path) or os.path.getsize(path) == 0
        self.stream = open(path, 'a', encoding='utf-8', newline='')
        self.new_csv_file = new_file

    def _read_finished(self):
        with open(self.path, 'rb') as f:
            data = f.read()
        if data and not data.endswith(b'\n'):  # a line cut short by a kill: drop it
            data = data[:data.rfind(b'\n') + 1]
            with open(self.path, 'wb') as f:
                f.write(data)
        text = data.decode('utf-8')
        rows = csv.DictReader(text.splitlines()) if self.is_csv else (json.loads(line) for line in text.splitlines() if line)
        for row in rows:
            self.done.add(self.key(row))

    def key(self, record):
        return tuple(str(record.get(name)) for name in self.key_fields)

    def write(self, results):
        for result in results:
            if self.path is not None and self.is_csv:
                if self.csv is None:
                    self.csv = csv.DictWriter(self.stream, fieldnames=list(result), extrasaction='ignore')
                    if self.new_csv_file:
                        self.csv.writeheader()
                row = {k: json.dumps(v) if isinstance(v, list) else v for k, v in result.items()}
                self.csv.writerow(row)
            else:
                self.stream.write(json.dumps(result, ensure_ascii=False) + '\n')
        self.stream.flush()

    def close(self):
        if self.stream is not sys.stdout:
            self.stream.close()


def write_sidecars(results):
    """image.jpg -> image.txt holding the caption (the text-to-image training-set convention)."""
    for result in results:
        if not is_url(result['image']):
            with open(os.path.splitext(result['image'])[0] + '.txt', 'w', encoding='utf-8') as f:
                f.write(result['caption'] + '\n')


class Progress:
    """'done/total, ETA' on stderr, for more than a few inputs."""

    def __init__(self, total, enabled=True):
        self.total, self.done, self.start = total, 0, time.time()
        self.enabled = enabled and total > 8

    def update(self, n):
        self.done += n
        if self.enabled:
            elapsed = time.time() - self.start
            eta = elapsed / self.done * (self.total - self.done) if self.done else 0
            print(f"\r{self.done}/{self.total} inputs, {elapsed:.0f}s elapsed, ETA {eta:.0f}s",
                  end='\n' if self.done >= self.total else '', file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the run

def image_batches(items, transform, args, path_of, encode=None):
    """For each --batch_size slice of items: (its readable items, one row per distinct image,
    each item's row, how many items could not be read). Each distinct image is read once per
    slice, and not again when the slice before had it (an image's records usually come
    together: 40 texts against one photo); encode(pixels) -> the rows kept instead of the
    pixels (the visual encoder's output), run once per image likewise. An unreadable image
    is reported on stderr and its items left out. The progress line advances once the caller
    has handled a slice."""
    progress = Progress(len(items), enabled=not args.quiet)
    kept = {}  # path -> row, for the images of the slice before
    for start in range(0, len(items), args.batch_size):
        chunk = items[start:start + args.batch_size]
        paths = list(dict.fromkeys(path_of(item) for item in chunk))  # distinct, in order
        rows, new_paths, new_pixels = {}, [], []
        for path in paths:
            if path in kept:
                rows[path] = kept[path]
                continue
            try:
                new_pixels.append(transform(read_image(path)))
                new_paths.append(path)
            except ImageReadError as error:
                print(f"\npredict.py: cannot read image {error}", file=sys.stderr)
        if new_pixels:
            pixels = torch.stack(new_pixels)
            rows.update(zip(new_paths, pixels if encode is None else encode(pixels)))
        order = [path for path in paths if path in rows]
        index = {path: i for i, path in enumerate(order)}
        batch = [item for item in chunk if path_of(item) in rows]
        owners = [index[path_of(item)] for item in batch]
        yield batch, (torch.stack([rows[path] for path in order]) if order else None), owners, len(chunk) - len(batch)
        kept = rows
        progress.update(len(chunk))


def records_for(args, fields):
    """Input records with the task's text fields filled from the command line or the lists."""
    records = collect_inputs(args.inputs, fields=[f for f in fields if getattr(args, f, None) is None])
    for field in fields:
        value = getattr(args, field, None)
        for record in records:
            if value is not None:
                record.setdefault(field, value)
            elif field not in record:
                raise InputError(f"{args.task} needs --{field} TEXT, or .jsonl inputs whose lines carry "
                                 f"\"{field}\" (no {field} for {record['image']})")
    return records


def run(args):
    function, kind, fields, encodes = TASKS[args.task]
    config = load_config(args.config) if args.config else {}
    if args.task == 'caption':  # generation settings: the command line, else the config, else caption_coco.yaml
        for key, name in (('num_beams', 'beams'), ('max_length', 'max_length'), ('min_length', 'min_length')):
            if getattr(args, name) is None:
                setattr(args, name, config.get(key, CAPTION_DEFAULTS[key]))
        if args.prompt is not None:
            config['prompt'] = args.prompt
    if args.task == 'vqa':
        args.answer_list = load_answer_list(args.answers) if args.answers else None
    if args.task == 'classify':
        args.label_list = load_labels(args.labels)

    records = records_for(args, fields)
    writer = ResultWriter(args.out, ('image',) + fields)
    todo = [r for r in records if writer.key(r) not in writer.done]
    if not todo:
        print(f"nothing to do: {len(records)} inputs, all in {args.out}" if records else "no inputs found",
              file=sys.stderr)
        writer.close()
        return 0 if records else 1

    device = torch.device(args.device)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only results
        model, transform = zoo.load_model(args.model, kind, config=config, device=device)
    torch.manual_seed(args.seed)  # nucleus sampling gives the same captions on every run

    def encode(pixels):  # each image through the visual encoder once per run (image_batches)
        with torch.no_grad(), autocast(args.amp, device):
            return model.visual_encoder(pixels.to(device))

    failed = 0
    for batch, images, owners, unreadable in image_batches(todo, transform, args, path_of=lambda record: record['image'],
                                                           encode=encode if encodes else None):
        failed += unreadable
        if batch:
            with torch.no_grad(), autocast(args.amp, device):
                results = function(model, images.to(device), torch.as_tensor(owners, device=device), batch, args)
            writer.write(results)
            if getattr(args, 'sidecar', False):
                write_sidecars(results)
    writer.close()
    print(f"{len(todo) - failed} done, {failed} failed, {len(records) - len(todo)} already in {args.out}"
          if args.out else f"{len(todo) - failed} done, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    tasks = parser.add_subparsers(dest='task', required=True)
    tasks.add_parser('models', help='list the model zoo')

    def task_parser(name, help_text, inputs='+'):
        p = tasks.add_parser(name, help=help_text, formatter_class=HelpFormatter)
        if inputs:
            p.add_argument('inputs', nargs=inputs, help='image files, folders, globs, URLs, .txt or .jsonl lists')
        p.add_argument('--model', required=True, help='zoo name (see `predict.py models`) or checkpoint')
        p.add_argument('--config', help='task config with the model keys (needed for a checkpoint file)')
        p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
        p.add_argument('--amp', choices=('none', 'bf16'), default='none')
        p.add_argument('--batch_size', type=int, default=8)
        p.add_argument('--out', help='append results to FILE.jsonl or FILE.csv; a rerun skips finished inputs')
        p.add_argument('--seed', type=int, default=0, help='random seed (for --sample)')
        p.add_argument('--quiet', action='store_true', help='no progress line')
        return p

    p = task_parser('caption', 'caption images (beam search, or nucleus sampling with --sample)')
    p.add_argument('--beams', type=int, default=None, help='beams (default: the config, else 3)')
    p.add_argument('--sample', action='store_true', help='nucleus sampling instead of beam search')
    p.add_argument('--top_p', type=float, default=0.9)
    p.add_argument('--min_length', type=int, default=None, help='tokens, [DEC] and prompt included (default 5)')
    p.add_argument('--max_length', type=int, default=None, help='tokens, [DEC] and prompt included (default 20)')
    p.add_argument('--prompt', default=None, help="caption prefix (default: the config's, else 'a picture of ')")
    p.add_argument('--num_captions', type=int, default=1, help='captions per image (samples, or the best beams)')
    p.add_argument('--sidecar', action='store_true', help='also write image.txt next to each image')

    p = task_parser('vqa', 'answer a question about each image')
    p.add_argument('--question', help='the question (or give .jsonl inputs with "question")')
    p.add_argument('--answers', help="rank this answer list (.json list or .txt) instead of generating")
    p.add_argument('--k_test', type=int, default=128, help='candidates re-ranked with --answers')

    p = task_parser('match', 'image-text matching: ITM p(match) and ITC cosine')
    p.add_argument('--text', help='the text (or give .jsonl inputs with "text")')

    p = task_parser('features', 'ITC embeddings (normalised) of images and/or texts to a file', inputs='*')
    p.add_argument('--texts', help='texts to embed too: a file (one per line, or a .json list) or "a,b,c"')
    p.set_defaults(out_required=True)

    p = task_parser('index', 'embed a gallery of images for `search`')
    p.set_defaults(out_required=True)

    p = task_parser('search', 'text-to-image search over an index: ITC shortlist re-ranked by ITM', inputs=None)
    p.add_argument('--index', required=True, help='a .safetensors index written by `predict.py index`')
    p.add_argument('--query', help='the text to search for (or --queries FILE)')
    p.add_argument('--queries', help='texts to search for: a file, one per line')
    p.add_argument('--k', type=int, default=10, help='results per query')
    p.add_argument('--k_test', type=int, default=64, help='images shortlisted by ITC, then re-ranked by ITM')

    p = task_parser('classify', 'zero-shot classification: ITC shortlist re-ranked by ITM')
    p.add_argument('--labels', required=True, help='"a dog,a cat,..." or a file (.json list or one per line)')
    p.add_argument('--template', default='{}', help='text for each label, e.g. "a picture of a {}"')
    p.add_argument('--k', type=int, default=10, help='labels shortlisted by ITC and re-ranked by ITM')

    args = parser.parse_args(argv)
    if args.task != 'models':
        _check(parser, args)
    return args


def _check(parser, args):
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    if getattr(args, 'out_required', False) and not (args.out and args.out.endswith(('.safetensors', '.npy'))):
        parser.error(f"{args.task} needs --out FILE.safetensors" + (" (or .npy)" if args.task == 'features' else ""))
    if args.task == 'index' and not args.out.endswith('.safetensors'):
        parser.error("index needs --out FILE.safetensors")
    if args.task == 'search' and (not (args.query or args.queries) or args.k < 1 or args.k_test < 1):
        parser.error("search needs --query TEXT (or --queries FILE), --k >= 1 and --k_test >= 1")
    if args.task == 'caption':
        if args.num_captions < 1:
            parser.error(f"--num_captions must be >= 1, got {args.num_captions}")
        if args.beams is not None and args.beams < 1:
            parser.error(f"--beams must be >= 1, got {args.beams}")
        if not 0 < args.top_p <= 1:
            parser.error(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.task == 'classify' and (args.k < 1 or not _one_slot(args.template)):
        parser.error(f"--k must be >= 1 (got {args.k}) and --template must hold {{}} once and no other "
                     f"{{...}} (got {args.template!r})")
    if args.task == 'vqa' and args.k_test < 1:
        parser.error(f"--k_test must be >= 1, got {args.k_test}")


def _one_slot(template):
    """Whether template.format(label) works and puts the label in exactly one place."""
    try:
        return template.count('{}') == 1 and template.format('\0').count('\0') == 1
    except (KeyError, IndexError, ValueError):
        return False


def main(argv=None):
    args = parse_args(argv)
    if args.task == 'models':
        print(zoo.describe())
        return 0
    try:
        if args.task in ('features', 'index'):
            return run_features(args)
        if args.task == 'search':
            return run_search(args)
        return run(args)
    except (InputError, ConfigError, ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"predict.py {args.task}: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # an output that cannot be written (full disk, no permission)
        print(f"predict.py {args.task}: cannot write the results: {error}", file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
