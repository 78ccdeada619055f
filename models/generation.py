"""Text generation for BLIP's decoder: greedy search, beam search and nucleus sampling, with a
key/value cache of our own.

BLIP was trained and evaluated with transformers 4.15, and its captions depend on that
release's decoding rules, which later releases changed (beam scoring and finishing, cache
internals). So decoding is written out here, top to bottom, with 4.15's semantics:

- logits processors in 4.15's order: repetition penalty, then min-length (no [SEP] while the
  sequence is shorter than `min_length`); when sampling, then top-k and top-p (`filter_logits`);
- greedy search and sampling: rows that emitted [SEP] are padded with `pad_token_id` until every
  row is done or `max_length` is reached (lengths count every token, [DEC] and prompt included);
- beam search: 4.15's BeamSearchScorer. The 2 * num_beams best candidates are walked best first;
  an [SEP] among the top num_beams becomes a finished hypothesis, scored by its summed log-prob
  / its full length (prompt included, [SEP] not); an image is done when its worst kept hypothesis
  beats its best candidate / current length; at max_length the running beams compete too; a
  sequence that ended early gets its [SEP] back and pads after it.

Speed: each image's cross-attention keys/values are projected once (`compute_cross_kv`) and
shared by all of its beams or samples without copies (BertSelfAttention folds the rows of one
image into its query length); self-attention keys/values live in a preallocated `KVCache`; one
forward per step for all rows of all images.
"""
from typing import NamedTuple, Optional

import torch


class KVCache:
    """Self-attention keys and values of the tokens seen so far, per layer (rows, heads, T, d),
    written into buffers preallocated for `capacity` tokens (grown if a sequence goes beyond)."""

    def __init__(self, capacity=0):
        self.capacity = capacity
        self.layers = {}  # layer index -> [keys buffer, values buffer, tokens filled]

    def get_seq_length(self):
        """Tokens cached so far: where the next input's positions start."""
        return max((filled for _, _, filled in self.layers.values()), default=0)

    def update(self, layer_idx, key, value):
        """Append one layer's keys/values of the new tokens; return all of that layer's so far."""
        entry = self.layers.get(layer_idx)
        start = entry[2] if entry is not None else 0
        end = start + key.shape[2]
        if entry is None or end > entry[0].shape[2]:
            size = max(end, self.capacity, 2 * start)
            keys = key.new_empty(key.shape[0], key.shape[1], size, key.shape[3])
            values = value.new_empty(value.shape[0], value.shape[1], size, value.shape[3])
            if entry is not None:
                keys[:, :, :start], values[:, :, :start] = entry[0][:, :, :start], entry[1][:, :, :start]
            entry = self.layers[layer_idx] = [keys, values, start]
        entry[0][:, :, start:end] = key
        entry[1][:, :, start:end] = value
        entry[2] = end
        return entry[0][:, :, :end], entry[1][:, :, :end]

    def reorder(self, rows):
        """Keep the rows `rows` (LongTensor), in that order: the beams that survive a step."""
        for keys, values, filled in self.layers.values():
            keys[:, :, :filled] = keys[rows, :, :filled]
            values[:, :, :filled] = values[rows, :, :filled]


class GenerateOutput(NamedTuple):
    sequences: torch.Tensor  # (rows, length) token ids, prompt included
    sequences_scores: Optional[torch.Tensor] = None  # beam search: the final hypothesis scores


class _Stepper:
    """Next-token logits for all rows of all images, one decoder forward per step."""

    def __init__(self, decoder, image_embeds, image_atts, capacity, use_cache):
        self.decoder = decoder
        self.cross_kv = decoder.bert.compute_cross_kv(image_embeds)  # once per image
        self.image_atts = image_atts
        self.cache = KVCache(capacity) if use_cache else None

    def next_logits(self, input_ids):
        new_ids = input_ids if self.cache is None else input_ids[:, self.cache.get_seq_length():]
        hidden = self.decoder.bert(new_ids, encoder_attention_mask=self.image_atts, cross_kv=self.cross_kv,
                                   kv_cache=self.cache, is_decoder=True, mode='multimodal').last_hidden_state
        return self.decoder.cls(hidden[:, -1:])[:, -1].float()

    def reorder(self, rows):
        if self.cache is not None:
            self.cache.reorder(rows)


# ----------------------------------------------------------------------------- logits processing

def process_logits(scores, input_ids, repetition_penalty=1.0, min_length=0, eos_token_id=None):
    """transformers 4.15's logits processors, in its order, on (rows, vocab) scores (raw logits
    for greedy search and sampling, log-probs for beam search) given the tokens so far."""
    if repetition_penalty != 1.0:
        # every token already present (prompt and [DEC] included) is made less likely
        seen = scores.gather(1, input_ids)
        seen = torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
        scores = scores.scatter(1, input_ids, seen)
    if eos_token_id is not None and input_ids.shape[-1] < min_length:
        scores = scores.clone()
        scores[:, eos_token_id] = -float('inf')
    return scores


def filter_logits(scores, top_k=50, top_p=1.0, min_tokens_to_keep=1):
    """transformers 4.15's sampling warpers: keep the `top_k` best tokens (0: all), then the
    smallest set of best tokens whose probability reaches `top_p` (the token that crosses it
    included); the rest get -inf."""
    if top_k:
        top_k = min(max(top_k, min_tokens_to_keep), scores.shape[-1])
        kth_best = torch.topk(scores, top_k).values[..., -1, None]
        scores = scores.masked_fill(scores < kth_best, -float('inf'))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative > top_p
        if min_tokens_to_keep > 1:
            drop[..., :min_tokens_to_keep - 1] = False
        drop[..., 1:] = drop[..., :-1].clone()  # shift right: keep the token that crosses top_p
        drop[..., 0] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float('inf'))
    return scores


# ----------------------------------------------------------------------------- entry point

@torch.no_grad()
def generate(decoder, input_ids, image_embeds, image_atts=None, *, max_length=20, min_length=0, num_beams=1,
             do_sample=False, top_k=50, top_p=1.0, repetition_penalty=1.0, eos_token_id=None, pad_token_id=0,
             num_return_sequences=1, length_penalty=1.0, early_stopping=False, use_cache=True):
    """Continue `input_ids` (one row per image: [DEC] + prompt tokens) with `decoder` (a
    BertLMHeadModel) cross-attending to `image_embeds` (one row per image; the question states
    for VQA). Beam search when `num_beams > 1`, nucleus sampling when `do_sample`, else greedy.

    Returns a GenerateOutput whose `sequences` has `num_return_sequences` rows per image, image
    by image. `use_cache=False` recomputes every position at each step (a check of the cache).
    """
    if input_ids.shape[0] != image_embeds.shape[0]:
        raise ValueError(f"image_embeds has {image_embeds.shape[0]} rows for {input_ids.shape[0]} prompts")
    if image_atts is not None and image_atts.shape[0] != image_embeds.shape[0]:
        raise ValueError(f"image_atts has {image_atts.shape[0]} rows for {image_embeds.shape[0]} images")
    if num_return_sequences < 1 or num_beams < 1:
        raise ValueError(f"num_beams ({num_beams}) and num_return_sequences ({num_return_sequences}) must be >= 1")
    step = _Stepper(decoder, image_embeds, image_atts, max_length, use_cache)
    processing = dict(repetition_penalty=repetition_penalty, min_length=min_length, eos_token_id=eos_token_id)
    if num_beams > 1:
        if do_sample:
            raise ValueError("beam sampling (do_sample with num_beams > 1) is not supported: "
                             "use num_beams=1 for nucleus sampling")
        if num_return_sequences > num_beams:
            raise ValueError(f"num_return_sequences {num_return_sequences} > num_beams {num_beams}")
        return beam_search(step, input_ids, num_beams, max_length, processing, eos_token_id, pad_token_id,
                            num_return_sequences, length_penalty, early_stopping)
    if num_return_sequences > 1 and not do_sample:
        raise ValueError("greedy search returns one sequence per image: num_return_sequences must be 1")
    input_ids = input_ids.repeat_interleave(num_return_sequences, dim=0)  # rows of one image together
    filtering = dict(top_k=top_k, top_p=top_p) if do_sample else None
    return greedy_or_sample(step, input_ids, max_length, processing, filtering, eos_token_id, pad_token_id)


def greedy_or_sample(step, input_ids, max_length, processing, filtering, eos_token_id, pad_token_id):
    """4.15's greedy_search / sample: one token per row per step, finished rows padded."""
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    while True:
        scores = process_logits(step.next_logits(input_ids), input_ids, **processing)
        if filtering is not None:
            next_tokens = torch.multinomial(filter_logits(scores, **filtering).softmax(dim=-1), 1).squeeze(1)
        else:
            next_tokens = scores.argmax(dim=-1)
        if eos_token_id is not None:
            next_tokens = next_tokens * unfinished + pad_token_id * (1 - unfinished)
            unfinished = unfinished * (next_tokens != eos_token_id).long()
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        if not unfinished.any() or input_ids.shape[-1] >= max_length:
            return GenerateOutput(input_ids)


class BeamHypotheses:
    """The finished hypotheses of one image, as transformers 4.15 kept them: the `num_beams`
    best by sum of log-probs / length ** length_penalty (length counting the prompt and not the
    final [SEP]); ties keep the earlier one."""

    def __init__(self, num_beams, length_penalty=1.0, early_stopping=False):
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.beams = []  # (score, token ids)
        self.worst_score = 1e9

    def __len__(self):
        return len(self.beams)

    def add(self, hyp, sum_logprobs):
        score = sum_logprobs / (hyp.shape[-1] ** self.length_penalty)
        if len(self) < self.num_beams or score > self.worst_score:
            self.beams.append((score, hyp))
            if len(self) > self.num_beams:
                ranked = sorted((s, idx) for idx, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs, cur_len):
        """No running beam can enter any more (4.15 compares against the current length)."""
        if len(self) < self.num_beams:
            return False
        if self.early_stopping:
            return True
        return self.worst_score >= best_sum_logprobs / cur_len ** self.length_penalty


def beam_search(step, input_ids, num_beams, max_length, processing, eos_token_id, pad_token_id,
                 num_return_sequences, length_penalty, early_stopping):
    """4.15's beam_search with BeamSearchScorer; rows are image-major (beam j of image b at row
    b * num_beams + j), which is also the grouping the shared cross-attention keys expect."""
    batch_size, device = input_ids.shape[0], input_ids.device
    input_ids = input_ids.repeat_interleave(num_beams, dim=0)
    hyps = [BeamHypotheses(num_beams, length_penalty, early_stopping) for _ in range(batch_size)]
    done = [False] * batch_size
    beam_scores = torch.zeros(batch_size, num_beams, device=device)
    beam_scores[:, 1:] = -1e9  # all beams start equal: expand only the first one
    beam_scores = beam_scores.view(-1)

    while True:
        cur_len = input_ids.shape[-1]
        log_probs = step.next_logits(input_ids).log_softmax(dim=-1)
        scores = process_logits(log_probs, input_ids, **processing)
        vocab_size = scores.shape[-1]
        scores = (scores + beam_scores[:, None]).view(batch_size, num_beams * vocab_size)
        top_scores, top_ids = torch.topk(scores, 2 * num_beams, dim=1, largest=True, sorted=True)
        top_beams, top_tokens = (top_ids // vocab_size).tolist(), (top_ids % vocab_size).tolist()
        top_scores_list = top_scores.tolist()

        # BeamSearchScorer.process: walk each image's candidates best first; an [SEP] among the top
        # num_beams becomes a finished hypothesis, the others fill the running beams. A finished
        # image keeps padding its beams (score 0, beam 0).
        was_done = list(done)
        chosen = [[0] * num_beams for _ in range(batch_size)]
        next_tokens = [[pad_token_id] * num_beams for _ in range(batch_size)]
        next_rows = [[b * num_beams] * num_beams for b in range(batch_size)]
        for b in range(batch_size):
            if was_done[b]:
                continue
            kept = 0
            for rank, (beam, token) in enumerate(zip(top_beams[b], top_tokens[b])):
                row = b * num_beams + beam
                if token == eos_token_id:
                    if rank < num_beams:
                        hyps[b].add(input_ids[row].clone(), top_scores_list[b][rank])
                    continue
                chosen[b][kept], next_tokens[b][kept], next_rows[b][kept] = rank, token, row
                kept += 1
                if kept == num_beams:
                    break
            done[b] = hyps[b].is_done(max(top_scores_list[b]), cur_len)

        next_scores = top_scores.gather(1, torch.tensor(chosen, device=device))
        beam_scores = next_scores.masked_fill(torch.tensor(was_done, device=device)[:, None], 0.0).view(-1)
        rows = torch.tensor(next_rows, device=device).view(-1)
        tokens = torch.tensor(next_tokens, device=device, dtype=input_ids.dtype).view(-1, 1)
        input_ids = torch.cat([input_ids[rows], tokens], dim=-1)
        step.reorder(rows)
        if all(done) or input_ids.shape[-1] >= max_length:
            break

    # BeamSearchScorer.finalize: an image not done lets its running beams compete
    for b in range(batch_size):
        if not done[b]:
            for row in range(b * num_beams, (b + 1) * num_beams):
                hyps[b].add(input_ids[row], beam_scores[row].item())

    best, best_scores = [], []
    for hyp in hyps:
        ranked = sorted(hyp.beams, key=lambda beam: beam[0])
        for _ in range(num_return_sequences):
            score, seq = ranked.pop()
            best.append(seq)
            best_scores.append(score)
    lengths = [len(seq) for seq in best]
    out_len = min(max(lengths) + 1, max_length)
    sequences = torch.full((len(best), out_len), pad_token_id, dtype=input_ids.dtype, device=device)
    for i, seq in enumerate(best):
        sequences[i, :lengths[i]] = seq
        if lengths[i] < max_length:
            sequences[i, lengths[i]] = eos_token_id
    return GenerateOutput(sequences, torch.tensor(best_scores, device=device))
