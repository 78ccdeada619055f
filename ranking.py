"""Two-stage image-text ranking, as BLIP evaluates retrieval: an ITC shortlist re-ranked by ITM.

For every image the `k` texts of highest ITC similarity are its candidates, and for every text
the `k` images; each candidate pair is scored once, by its raw ITM logit (class 1) plus its ITC
similarity (the original's score). train_retrieval.py and eval_retrieval_video.py evaluate with
it (evaluate_split: one split's recall@K, dense or from the top-k lists); anything else that ranks texts against images (search over a gallery, dataset filtering)
should import it too.

Memory is O((images + texts) x k): similarities are computed a block of rows at a time and only
each row's top-k is kept, never the images x texts matrix. Re-ranking puts several images'
candidates in one forward (the cross-attention keys/values of G images serve G x r texts
without copies). Under N processes each rank ranks a contiguous block of image rows and of text
rows (the original's split) and the top-k lists are summed over ranks.
"""
import contextlib
import datetime
import hashlib
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import utils
from engine import precision
from engine.fileio import CheckpointError, load_checkpoint_file, save_checkpoint
from metrics import itm_eval, itm_eval_topk

TEXT_BATCH = 256               # texts per forward for text features (the original's)
SIM_BLOCK_ELEMENTS = 2 ** 25   # similarities per block of rows (128 MB of float32)
ITC_ONLY_K = 10                # candidates kept when k_test is 0 (enough for recall@10)
PAIRS_PER_FORWARD = 256        # default `rerank_batch_size`: (image, text) pairs per ITM forward
IMAGES_PER_FORWARD = 32        # at most this many images' keys/values in one forward
SAVE_EVERY_S = 60.0            # resumable re-ranking: seconds between progress files
DENSE_LIMIT = 2 ** 28          # eval_mode auto: dense matrices up to this many entries (1 GB each in float32)
TOKENS_IN_MEMORY_BYTES = 32 * 2 ** 30  # eval_tokens auto: image tokens past this go to a memory-mapped file


@torch.no_grad()
def text_features(model, texts, device, config, quiet=False):
    """(token ids with [ENC] first, for ITM; attention masks; normalised ITC features) of texts."""
    text_ids, text_atts, text_embeds = [], [], []
    for i in _progress(range(0, len(texts), TEXT_BATCH), 'Text features:', quiet):
        text_input = model.tokenizer(texts[i:i + TEXT_BATCH], padding='max_length', truncation=True,
                                     max_length=35, return_tensors='pt').to(device)
        with precision.autocast(config, device):
            text_output = model.text_encoder(text_input.input_ids, attention_mask=text_input.attention_mask,
                                             mode='text')
            text_embed = model.text_proj(text_output.last_hidden_state[:, 0, :])
        text_embeds.append(F.normalize(text_embed.float(), dim=-1))
        text_ids.append(text_input.input_ids)
        text_atts.append(text_input.attention_mask)
    text_embeds = torch.cat(text_embeds, dim=0)
    text_ids = torch.cat(text_ids, dim=0)
    text_atts = torch.cat(text_atts, dim=0)
    text_ids[:, 0] = model.tokenizer.enc_token_id  # ITM reads [ENC] first
    return text_ids, text_atts, text_embeds


@torch.no_grad()
def image_features(model, data_loader, device, config, token_file=None):
    """(visual encoder outputs: the cross-attention input; normalised ITC features).

    data_loader yields (images, indices) in index order, as the evaluation sets do. The tokens
    are kept in host memory, as the original, or with token_file written to that .npy file in
    float16 and returned memory-mapped (a 100k-image gallery at 384 px is 88 GB of tokens).
    """
    metric_logger = utils.MetricLogger(delimiter='  ')
    image_feats, image_embeds, stored, done = [], [], None, 0
    for image, _ in metric_logger.log_every(data_loader, 50, 'Image features:'):
        image = image.to(device)
        with precision.autocast(config, device):
            image_feat = model.visual_encoder(image)
            image_embed = model.vision_proj(image_feat[:, 0, :])
        image_embeds.append(F.normalize(image_embed.float(), dim=-1))
        if token_file is None:
            image_feats.append(image_feat.cpu())
            continue
        if stored is None:
            shape = (len(data_loader.dataset),) + tuple(image_feat.shape[1:])
            stored = np.lib.format.open_memmap(token_file, mode='w+', dtype=np.float16, shape=shape)
        stored[done:done + len(image_feat)] = image_feat.to(torch.float16).cpu().numpy()
        done += len(image_feat)
    image_embeds = torch.cat(image_embeds, dim=0)
    if token_file is None:
        return torch.cat(image_feats, dim=0), image_embeds
    stored.flush()
    return torch.from_numpy(np.load(token_file, mmap_mode='c')), image_embeds  # copy-on-write: never written back


def _progress(iterable, header, quiet=False):
    """The iterable, with progress and ETA lines (MetricLogger) unless quiet."""
    return iterable if quiet else utils.MetricLogger(delimiter='  ').log_every(iterable, 50, header)


def rows_of_this_rank(num_rows):
    """(start, end) of this rank's contiguous block of rows (the original's split of the work)."""
    step = num_rows // utils.get_world_size() + 1
    start = min(num_rows, utils.get_rank() * step)
    return start, min(num_rows, start + step)


def shortlist(query_embeds, gallery_embeds, k, start=0, end=None):
    """ITC top-k of query rows start..end: (similarities, gallery indices), each (rows, k).

    Computed a block of rows at a time, so memory is O(block x gallery + rows x k).
    """
    end = len(query_embeds) if end is None else end
    k = min(k, len(gallery_embeds))
    block = max(1, min(end - start, SIM_BLOCK_ELEMENTS // max(1, len(gallery_embeds))))
    # one buffer for every block: fresh blocks each time fragment the host heap (glibc kept
    # 1.2 GB of freed 16 MB blocks at 40k x 8k)
    buffer = query_embeds.new_empty((block, len(gallery_embeds)))
    sims, indices = [], []
    for begin in range(start, end, block):
        rows = query_embeds[begin:min(end, begin + block)]
        block_sims = torch.matmul(rows, gallery_embeds.t(), out=buffer[:len(rows)])
        values, index = block_sims.topk(k=k, dim=1)
        sims.append(values)
        indices.append(index)
    if not sims:
        empty = query_embeds.new_zeros((0, k))
        return empty, empty.long()
    return torch.cat(sims), torch.cat(indices)


def _forward_plan(pair_images, pair_texts, text_lengths, batch_pairs):
    """Work units for re-ranking, packed into forwards.

    A unit is (image, positions of its pairs), at most batch_pairs pairs, the image's texts
    sorted by length (so a unit's padding columns can be cut). Units of similar size share a
    forward: G units of at most r pairs each, G x r <= batch_pairs.
    """
    images, counts = torch.unique_consecutive(pair_images, return_counts=True)
    units = []
    offset = 0
    for image, count in zip(images.tolist(), counts.tolist()):
        positions = torch.arange(offset, offset + count)
        positions = positions[torch.argsort(text_lengths[pair_texts[positions]], stable=True)]
        units.extend((image, positions[i:i + batch_pairs]) for i in range(0, count, batch_pairs))
        offset += count
    units.sort(key=lambda unit: -len(unit[1]))
    forwards, current = [], []
    for unit in units:
        width = len(current[0][1]) if current else len(unit[1])
        if current and ((len(current) + 1) * width > batch_pairs or len(current) == IMAGES_PER_FORWARD):
            forwards.append(current)
            current = []
        current.append(unit)
    if current:
        forwards.append(current)
    return forwards


@torch.no_grad()
def _score_forward(model, units, image_feats, text_ids, text_atts, device, config):
    """ITM logits (no match, match) of one forward's units, one (texts, 2) tensor per unit."""
    width = len(units[0][1])
    # each unit is padded to `width` texts by repeating its last one (those scores are dropped)
    rows = torch.cat([torch.cat([texts, texts[-1:].expand(width - len(texts))]) for _, texts in units])
    ids, atts = text_ids[rows], text_atts[rows]
    length = int(atts.sum(dim=1).max())  # padding columns of every text are masked: cut them
    ids, atts = ids[:, :length].to(device), atts[:, :length].to(device)
    feats = image_feats[torch.tensor([image for image, _ in units])].to(device)
    if config.get('amp', 'none') == 'none':
        feats = feats.float()  # tokens stored in half precision (token_file) go back to float32
    with precision.autocast(config, device):
        cross_kv = model.text_encoder.compute_cross_kv(feats)
        # every image token is visible, so no image mask is needed (the original's all-ones one)
        output = model.text_encoder(ids, attention_mask=atts, cross_kv=cross_kv, return_dict=True)
        logits = model.itm_head(output.last_hidden_state[:, 0, :]).float()
    logits = logits.view(len(units), width, 2)
    return [logits[i, :len(texts)] for i, (_, texts) in enumerate(units)]


class _ProgressDir:
    """Append-only progress of one re-ranking: files of (unit numbers, scores) in a folder.

    The folder's name is a fingerprint of the work (the candidate lists, this rank's place and
    the model's parameters), so a rerun of the same evaluation continues where the last one
    stopped, and any other evaluation starts afresh.
    """

    def __init__(self, folder):
        self.folder = folder
        self.pending, self.last_save = [], time.time()

    def load(self):
        done = {}
        if self.folder is None or not os.path.isdir(self.folder):
            return done
        for name in sorted(os.listdir(self.folder)):
            if name.endswith('.pt'):
                path = os.path.join(self.folder, name)
                try:
                    part = load_checkpoint_file(path)
                except CheckpointError:
                    continue  # a part cut short by a kill: its units are scored again
                done.update(zip(part['units'], part['scores']))
        if done:
            print(f'Re-ranking: continuing from {self.folder} ({len(done)} forwards already scored)')
        return done

    def add(self, unit_numbers, scores):
        if self.folder is None:
            return
        self.pending.append((unit_numbers, scores))
        if time.time() - self.last_save >= SAVE_EVERY_S:
            self.flush()

    def flush(self):
        if self.folder is None or not self.pending:
            return
        os.makedirs(self.folder, exist_ok=True)
        part = {'units': [n for numbers, _ in self.pending for n in numbers],
                'scores': [s for _, scores in self.pending for s in scores]}
        save_checkpoint(part, os.path.join(self.folder, f"part-{part['units'][0]:09d}.pt"))
        self.pending, self.last_save = [], time.time()

    def finish(self):
        """The work is done: its progress files go (and the parent folder, once empty)."""
        if self.folder is not None and os.path.isdir(self.folder):
            for name in os.listdir(self.folder):
                os.remove(os.path.join(self.folder, name))
            os.rmdir(self.folder)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(self.folder))


def _fingerprint(model, *tensors):
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    # parameter sums: any change of the weights changes the fingerprint
    sums = torch.stack([p.detach().double().sum().cpu() for p in model.parameters()])
    digest.update(sums.numpy().tobytes())
    digest.update(f'{utils.get_rank()}/{utils.get_world_size()}'.encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def score_pairs(model, image_feats, text_ids, text_atts, pair_images, pair_texts, device, config,
                progress_dir=None, quiet=False):
    """Raw ITM logits (no match, match) of (image, text) pairs sorted by image: (pairs, 2) float32.

    image_feats: (images, tokens, width) on any device (or memory-mapped); text_ids with [ENC]
    first (text_features). `rerank_batch_size` pairs go in one forward. With progress_dir,
    scores are saved there as they come (every SAVE_EVERY_S seconds) and a rerun of the same
    work continues from them; the folder is removed when the scoring completes.
    """
    batch_pairs = int(config.get('rerank_batch_size', PAIRS_PER_FORWARD))
    scores = torch.empty(len(pair_images), 2)
    if len(pair_images) == 0:
        return scores
    plan = _forward_plan(pair_images, pair_texts, text_atts.sum(dim=1), batch_pairs)
    folder = None
    if progress_dir:  # the fingerprint reads every parameter: only when progress is kept
        fingerprint = _fingerprint(model, pair_images, pair_texts, text_ids, image_feats[pair_images[0]].float())
        folder = os.path.join(progress_dir, f'rerank-{fingerprint}')
    progress = _ProgressDir(folder)
    done = progress.load()
    unit_number = 0
    for units in _progress(plan, 'Re-ranking:', quiet):
        numbers = list(range(unit_number, unit_number + len(units)))
        unit_number += len(units)
        if all(n in done for n in numbers):
            unit_scores = [done[n] for n in numbers]
        else:
            unit_scores = _score_forward(model, [(image, pair_texts[positions]) for image, positions in units],
                                         image_feats, text_ids, text_atts, device, config)
            progress.add(numbers, [s.cpu() for s in unit_scores])
        for (_, positions), unit_score in zip(units, unit_scores):
            scores[positions] = unit_score.cpu()
    progress.finish()
    return scores


@torch.no_grad()
def match_scores(model, image_feats, image_embeds, texts, owners, device, config):
    """(ITM p(match), ITC cosine) of each text against its own image: texts[i] with image row
    owners[i] (a sorted list) of image_feats / image_embeds (image_features' outputs). ITM reads
    [ENC] first, as the retrieval models were fine-tuned."""
    text_ids, text_atts, text_embeds = text_features(model, texts, device, config, quiet=True)
    owners = torch.as_tensor(owners, dtype=torch.long)
    itc = (image_embeds[owners.to(image_embeds.device)] * text_embeds).sum(dim=-1).float().cpu()
    logits = score_pairs(model, image_feats, text_ids, text_atts, owners, torch.arange(len(texts)), device, config,
                         quiet=True)
    return logits.softmax(dim=-1)[:, 1], itc


def _descending(scores, indices):
    """Sort each row by score, highest first; equal scores put the higher index first (the order
    train_retrieval.itm_eval's stable sort gives them)."""
    by_index = torch.argsort(indices, dim=1, descending=True, stable=True)
    scores, indices = scores.gather(1, by_index), indices.gather(1, by_index)
    by_score = torch.argsort(scores, dim=1, descending=True, stable=True)
    return scores.gather(1, by_score), indices.gather(1, by_score)


@torch.no_grad()
def rank(model, image_embeds, image_feats, text_embeds, text_ids, text_atts, device, config,
         progress_dir=None):
    """Both top-k lists: (i2t_idx, i2t_score, t2i_idx, t2i_score), of shapes (images, k) and
    (texts, k), candidates by descending score, on every rank.

    k is config['k_test'] capped at the gallery size (where the original would fail). Scores are
    ITM logit + ITC similarity; k_test 0 ranks by ITC alone (ITC_ONLY_K candidates, scores are
    the similarities).
    """
    k_test = config['k_test']
    num_images, num_texts = len(image_embeds), len(text_embeds)
    i_start, i_end = rows_of_this_rank(num_images)
    t_start, t_end = rows_of_this_rank(num_texts)
    k = ITC_ONLY_K if k_test == 0 else k_test
    i2t_sim, i2t_idx = shortlist(image_embeds, text_embeds, k, i_start, i_end)
    t2i_sim, t2i_idx = shortlist(text_embeds, image_embeds, k, t_start, t_end)

    if k_test == 0:
        i2t_score, t2i_score = i2t_sim, t2i_sim
    else:
        # every (image, text) pair to score, once, sorted by image
        i2t_images = torch.arange(i_start, i_end, device=i2t_idx.device)[:, None].expand_as(i2t_idx)
        t2i_texts = torch.arange(t_start, t_end, device=t2i_idx.device)[:, None].expand_as(t2i_idx)
        i2t_keys = (i2t_images * num_texts + i2t_idx).flatten()
        t2i_keys = (t2i_idx * num_texts + t2i_texts).flatten()
        pair_keys = torch.unique(torch.cat([i2t_keys, t2i_keys]))
        pair_scores = score_pairs(model, image_feats, text_ids, text_atts, (pair_keys // num_texts).cpu(),
                                  (pair_keys % num_texts).cpu(), device, config, progress_dir)
        pair_scores = pair_scores[:, 1].to(pair_keys.device)  # the raw "match" logit, as the original
        i2t_score = pair_scores[torch.searchsorted(pair_keys, i2t_keys)].view_as(i2t_sim) + i2t_sim
        t2i_score = pair_scores[torch.searchsorted(pair_keys, t2i_keys)].view_as(t2i_sim) + t2i_sim
    i2t_score, i2t_idx = _descending(i2t_score, i2t_idx)
    t2i_score, t2i_idx = _descending(t2i_score, t2i_idx)
    return (_assemble(i2t_idx, i_start, num_images), _assemble(i2t_score, i_start, num_images),
            _assemble(t2i_idx, t_start, num_texts), _assemble(t2i_score, t_start, num_texts))


def _assemble(rows, start, num_rows):
    """This rank's rows placed in a (num_rows, k) tensor, summed over ranks (zeros elsewhere)."""
    if utils.get_world_size() == 1:
        return rows
    full = rows.new_zeros((num_rows, rows.shape[1]))
    full[start:start + len(rows)] = rows
    utils.barrier()
    return utils.all_reduce_sum(full)


def dense(indices, scores, num_columns, filler=-100.0):
    """The original's score matrix from top-k lists: the candidates' scores, `filler` elsewhere."""
    matrix = torch.full((len(indices), num_columns), filler, dtype=scores.dtype, device=scores.device)
    return matrix.scatter_(1, indices, scores)


# --------------------------------------------------------------------------- a retrieval split

@torch.no_grad()
def evaluation_topk(model, data_loader, device, config):
    """Top-k ranking of the eval set: (i2t_idx, i2t_score, t2i_idx, t2i_score).

    LongTensor / FloatTensor of shapes (images, k) and (texts, k), candidates by descending
    score: ITC similarity picks each row's k = k_test candidates, re-scored by ITM logit
    (class 1) + similarity; k_test 0 ranks by ITC alone (ITC_ONLY_K candidates). Memory
    is O((images + texts) x k). Optional config keys: `eval_progress_dir` (re-ranking progress
    is saved there and a rerun continues from it), `eval_tokens` (memory|disk|auto: the image
    tokens kept for re-ranking in host memory or in a memory-mapped float16 file in
    `eval_work_dir`), `rerank_batch_size` (pairs per ITM forward).
    """
    model.eval()
    print('Computing features for evaluation...')
    start_time = time.time()
    texts, num_images = data_loader.dataset.text, len(data_loader.dataset)
    text_ids, text_atts, text_embeds = text_features(model, texts, device, config)
    token_file = _token_file(model, config, num_images)
    image_feats, image_embeds = image_features(model, data_loader, device, config, token_file)
    try:
        result = rank(model, image_embeds, image_feats, text_embeds, text_ids, text_atts, device, config,
                              progress_dir=config.get('eval_progress_dir'))
    finally:
        del image_feats
        if token_file is not None:
            os.remove(token_file)
    print(f'Evaluation time {datetime.timedelta(seconds=int(time.time() - start_time))}')
    return tuple(tensor.cpu() for tensor in result)


def _token_file(model, config, num_images):
    """Where re-ranking keeps the image tokens: None (host memory) or a .npy file to memory-map."""
    mode = config.get('eval_tokens', 'auto')
    if mode not in ('auto', 'memory', 'disk'):
        raise ValueError(f"eval_tokens must be auto, memory or disk, not {mode!r}")
    vit = model.visual_encoder
    nbytes = num_images * (vit.patch_embed.num_patches + 1) * vit.embed_dim * 4
    if mode == 'memory' or (mode == 'auto' and nbytes <= TOKENS_IN_MEMORY_BYTES):
        return None
    folder = config.get('eval_work_dir') or tempfile.gettempdir()
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f'image_tokens_rank{utils.get_rank()}.npy')


def evaluation(model, data_loader, device, config):
    """Score matrices (images x texts, texts x images) as numpy arrays, as the original: each
    row's top-k candidates hold their scores (evaluation_topk), every other entry -100."""
    i2t_idx, i2t_score, t2i_idx, t2i_score = evaluation_topk(model, data_loader, device, config)
    num_images, num_texts = len(i2t_idx), len(t2i_idx)
    return dense(i2t_idx, i2t_score, num_texts).numpy(), dense(t2i_idx, t2i_score, num_images).numpy()


def use_topk(config, num_images, num_texts):
    """Whether the scripts evaluate through the top-k lists (`eval_mode: topk`, or `auto` and a
    gallery whose dense matrices would pass DENSE_LIMIT entries); the metrics are the same."""
    mode = config.get('eval_mode', 'auto')
    if mode not in ('auto', 'dense', 'topk'):
        raise ValueError(f"eval_mode must be auto, dense or topk, not {mode!r}")
    return mode == 'topk' or (mode == 'auto' and num_images * num_texts > DENSE_LIMIT)


def evaluate_split(model, data_loader, device, config):
    """itm_eval's metrics of one split on the main process (None elsewhere), dense or top-k."""
    dataset = data_loader.dataset
    if use_topk(config, len(dataset), len(dataset.text)):
        i2t_idx, _, t2i_idx, _ = evaluation_topk(model, data_loader, device, config)
        return itm_eval_topk(i2t_idx, t2i_idx, dataset.txt2img, dataset.img2txt) if utils.is_main_process() else None
    score_i2t, score_t2i = evaluation(model, data_loader, device, config)
    return itm_eval(score_i2t, score_t2i, dataset.txt2img, dataset.img2txt) if utils.is_main_process() else None
