"""Every metric the tasks report, computed here rather than by an external server.

- Retrieval: `itm_eval` (the original's recall@1/5/10 both ways from score matrices),
  `itm_eval_topk` (the same from top-k candidate lists), `itm_eval_video` (MSRVTT: video keys
  and the text-to-video median rank).
- Captioning: `caption_eval` (BLEU-1..4, METEOR, ROUGE-L, CIDEr with pycocoevalcap's scorers;
  SPICE only when its Stanford CoreNLP jars are present, see `spice_available`) and
  `coco_caption_eval` (COCO Karpathy val/test); one METEOR java process per Python process.
- VQA: `vqa_accuracy` / `answer_accuracy`, the standard VQA evaluation's accuracy, with its
  answer normalisation (`normalize_answer`, `normalize_punctuation`, `normalize_digits_articles`).
"""
import atexit
import os
import re
import shutil
import warnings
from itertools import product

import numpy as np
import torch

from data.utils import DataError, check_entries, coco_gt_file, load_json


def _recalls(i2t_ranks, t2i_ranks):
    """Recall@1/5/10 (percent) both ways and their means from 0-based ranks (as the original)."""
    def recall(ranks, k):
        return 100.0 * len(np.where(ranks < k)[0]) / len(ranks)
    tr1, tr5, tr10 = (recall(i2t_ranks, k) for k in (1, 5, 10))
    ir1, ir5, ir10 = (recall(t2i_ranks, k) for k in (1, 5, 10))
    tr_mean = (tr1 + tr5 + tr10) / 3
    ir_mean = (ir1 + ir5 + ir10) / 3
    r_mean = (tr_mean + ir_mean) / 2
    return {'txt_r1': tr1, 'txt_r5': tr5, 'txt_r10': tr10, 'txt_r_mean': tr_mean,
            'img_r1': ir1, 'img_r5': ir5, 'img_r10': ir10, 'img_r_mean': ir_mean,
            'r_mean': r_mean}


@torch.no_grad()
def itm_eval(scores_i2t, scores_t2i, txt2img, img2txt):
    """Recall@1/5/10 (percent) in both directions and their means, as the original computes them.

    Rows are ordered by a stable sort, so equal scores rank the higher index first (the
    original's quicksort leaves their order unspecified); itm_eval_topk follows the same rule.
    """
    # image -> text: the rank of the best-placed of the image's captions
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        order = np.argsort(score, kind='stable')[::-1]
        ranks[index] = min((np.where(order == i)[0][0] for i in img2txt[index]), default=1e20)
    i2t_ranks = ranks

    # text -> image: the rank of the caption's image
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        order = np.argsort(score, kind='stable')[::-1]
        ranks[index] = np.where(order == txt2img[index])[0][0]
    return _recalls(i2t_ranks, ranks)


def itm_eval_topk(i2t_idx, t2i_idx, txt2img, img2txt):
    """itm_eval's dict from top-k candidate lists (evaluation_topk's, best first).

    A row's rank is the position of its first ground truth in its list. It equals itm_eval on
    the dense matrices whenever k >= 10 (a ground truth outside the list is then missed by
    recall@10 in both). Below k = 10 a ground truth outside the list counts as not retrieved,
    where the original ranks it among the -100 fillers, an order numpy's sort leaves to chance.
    """
    i2t_idx, t2i_idx = torch.as_tensor(i2t_idx), torch.as_tensor(t2i_idx)
    num_images, num_texts = len(i2t_idx), len(t2i_idx)
    owner = torch.full((num_texts,), -1, dtype=torch.long)  # the image each text belongs to
    for image in range(num_images):
        texts = img2txt[image]
        owner[torch.as_tensor(texts if isinstance(texts, (list, tuple)) else [texts], dtype=torch.long)] = image
    i2t_hits = owner[i2t_idx] == torch.arange(num_images)[:, None]
    t2i_hits = t2i_idx == torch.as_tensor([txt2img[text] for text in range(num_texts)])[:, None]
    return _recalls(_first_hit(i2t_hits), _first_hit(t2i_hits))


def _first_hit(hits):
    """0-based position of the first True per row, 1e20 where there is none (as itm_eval)."""
    first = hits.float().argmax(dim=1).double()
    return torch.where(hits.any(dim=1), first, torch.full_like(first, 1e20)).numpy()


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


@torch.no_grad()
def itm_eval_video(scores_v2t, scores_t2v, txt2vmg, vid2txt):
    """Recall@1/5/10 (percent) both ways, their means and the text-to-video median rank (1 = first).

    Keys as the original: txt_r1, txt_r5, txt_r10, txt_r_mean, vid_r1, vid_r5, vid_r10,
    vid_r_mean, vid_mdR, r_mean. vid2txt maps a video to its text (or list of texts).
    """
    recalls = itm_eval(scores_v2t, scores_t2v, txt2vmg,
                       {index: _as_list(vid2txt[index]) for index in range(len(scores_v2t))})
    # text -> video: the 0-based rank of each text's video (as itm_eval ranks it)
    ranks = np.array([np.where(np.argsort(score, kind='stable')[::-1] == txt2vmg[index])[0][0]
                      for index, score in enumerate(scores_t2v)])
    result = {key: recalls[key] for key in ('txt_r1', 'txt_r5', 'txt_r10', 'txt_r_mean')}
    for key in ('r1', 'r5', 'r10', 'r_mean'):
        result[f'vid_{key}'] = recalls[f'img_{key}']
    result['vid_mdR'] = float(np.median(ranks + 1))
    result['r_mean'] = recalls['r_mean']
    return result


# --------------------------------------------------------------------------- caption metrics

_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def spice_available():
    """SPICE needs java, its jar and the Stanford CoreNLP jars it otherwise downloads."""
    try:
        import pycocoevalcap.spice.spice as spice_module
    except ImportError:
        return False
    spice_dir = os.path.dirname(os.path.abspath(spice_module.__file__))
    needed = [os.path.join(spice_dir, spice_module.SPICE_JAR)]
    needed += [os.path.join(spice_dir, "lib", jar) for jar in _CORENLP_JARS]
    return shutil.which("java") is not None and all(os.path.isfile(p) for p in needed)


def caption_eval(gt_file, results_file, use_spice=None):
    """Score a results file [{image_id, caption}] against COCO-format ground truth.

    Returns a pycocoevalcap COCOEvalCap whose `.eval` maps Bleu_1..Bleu_4, METEOR,
    ROUGE_L, CIDEr (and SPICE when available) to scores, with `.imgToEval` per image,
    as the original's `coco_eval.evaluate()` leaves it. Images are those of the results.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.eval import COCOEvalCap
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    from pycocotools.coco import COCO

    gt = load_json(gt_file)
    if not isinstance(gt, dict) or "annotations" not in gt or "images" not in gt:
        raise DataError(f"{gt_file}: not a COCO caption ground-truth file (needs 'images' "
                        f"and 'annotations')")
    results = load_json(results_file)
    if not isinstance(results, list) or not results:
        raise DataError(f"{results_file}: expected a non-empty JSON list of "
                        f"{{'image_id', 'caption'}} results")
    check_entries(results, results_file, {"image_id": int, "caption": str}, allow_empty=True)

    coco = COCO(gt_file)
    gt_ids = set(coco.getImgIds())
    counts = {}
    for item in results:
        counts[item["image_id"]] = counts.get(item["image_id"], 0) + 1
    unknown = sorted(set(counts) - gt_ids)
    if unknown:
        raise DataError(f"{results_file}: image_id(s) {unknown[:5]} are not in the ground "
                        f"truth {gt_file}")
    repeated = [i for i, n in counts.items() if n > 1]
    if repeated:
        raise DataError(f"{results_file}: image_id {repeated[0]} has {counts[repeated[0]]} "
                        f"captions; merge with save_result(..., remove_duplicate='image_id')")
    if len(counts) < len(gt_ids):
        warnings.warn(f"caption_eval: results cover {len(counts)} of {len(gt_ids)} "
                      f"ground-truth images; metrics are over those {len(counts)}")

    coco_result = coco.loadRes(results_file)
    coco_eval = COCOEvalCap(coco, coco_result)
    img_ids = coco_result.getImgIds()
    coco_eval.params["image_id"] = img_ids
    gts = {i: coco.imgToAnns[i] for i in img_ids}
    res = {i: coco_result.imgToAnns[i] for i in img_ids}

    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)

    scorers = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]),
               (_meteor(), "METEOR"), (Rouge(), "ROUGE_L"), (Cider(), "CIDEr")]
    if use_spice is None:
        use_spice = spice_available()
        if not use_spice:
            warnings.warn("SPICE skipped: its Stanford CoreNLP jars are not installed "
                          "(pycocoevalcap/spice/lib); the other metrics are computed")
    if use_spice:
        from pycocoevalcap.spice.spice import Spice
        scorers.append((Spice(), "SPICE"))

    for scorer, method in scorers:
        score, scores = scorer.compute_score(gts, res)
        if isinstance(method, list):
            for sc, scs, name in zip(score, scores, method):
                coco_eval.setEval(sc, name)
                coco_eval.setImgToEvalImgs(scs, gts.keys(), name)
        else:
            coco_eval.setEval(score, method)
            coco_eval.setImgToEvalImgs(scores, gts.keys(), method)
    coco_eval.setEvalImgs()

    for metric, score in coco_eval.eval.items():
        print(f"{metric}: {score:.3f}")
    return coco_eval


_METEOR = None


def _meteor():
    """One METEOR scorer per process, started at first use and kept alive.

    Starting its java process (and loading the paraphrase tables) takes seconds; caption
    training scores val and test every epoch, so the process is reused and closed at exit.
    """
    global _METEOR
    if _METEOR is None or _METEOR.meteor_p.poll() is not None:
        from pycocoevalcap.meteor.meteor import Meteor
        _METEOR = Meteor()
        atexit.register(_close_meteor, _METEOR)
    return _METEOR


def _close_meteor(meteor):
    # The METEOR java process otherwise lives until garbage collection (its __del__
    # repeats these calls harmlessly).
    with meteor.lock:
        if meteor.meteor_p.poll() is None:
            meteor.meteor_p.stdin.close()
            meteor.meteor_p.kill()
            meteor.meteor_p.wait()


def coco_caption_eval(coco_gt_root, results_file, split):
    """COCO Karpathy val/test caption metrics, as the original."""
    return caption_eval(coco_gt_file(coco_gt_root, split), results_file)


# --------------------------------------------------------------------------- VQA accuracy

# The standard VQA evaluation's answer normalisation (VQA API, vqaEval.py).
_PUNCTUATION = [';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@',
                '`', ',', '?', '!']
_COMMA_BETWEEN_DIGITS = re.compile(r'(\d)(,)(\d)')
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r'\.(?!\d)')
_NUMBER_WORDS = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4', 'five': '5',
                 'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
_ARTICLES = {'a', 'an', 'the'}
# Contractions written without (some of) their apostrophes are restored: "dont" -> "don't".
# (The eval's own table also lists "I'm"-style keys with a capital, which never match after
# lower-casing; they are left out here.)
_CONTRACTIONS_WITH_APOSTROPHES = [
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't",
    "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's",
    "isn't", "it'd", "it'd've", "it'll", "ma'am", "mightn't",
    "mightn't've", "might've", "mustn't", "must've", "needn't", "not've", "o'clock", "oughtn't",
    "'ow's'at", "shan't", "she'd've", "she's", "should've", "shouldn't", "shouldn't've", "somebody'd",
    "somebody'd've", "somebody'll", "somebody's", "someone'd", "someone'd've", "someone'll",
    "someone's", "something'd", "something'd've", "something'll", "that's", "there'd", "there'd've",
    "there're", "there's", "they'd", "they'd've", "they'll", "they're", "they've", "'twas", "wasn't",
    "we'd've", "we've", "weren't", "what'll", "what're", "what's", "what've", "when's", "where'd",
    "where's", "where've", "who'd", "who'd've", "who'll", "who're", "who's", "who've", "why'll",
    "why're", "why's", "won't", "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll",
    "y'all'd've", "you'd", "you'd've", "you'll", "you're", "you've",
]


def _contraction_map():
    """Every spelling of each contraction with at least one apostrophe left out -> the full one."""
    mapping = {}
    for full in _CONTRACTIONS_WITH_APOSTROPHES:
        pieces = full.split("'")
        for kept in product((True, False), repeat=len(pieces) - 1):
            if all(kept):
                continue
            spelled = pieces[0]
            for keep, piece in zip(kept, pieces[1:]):
                spelled += ("'" if keep else '') + piece
            mapping.setdefault(spelled, full)
    return mapping


_CONTRACTIONS = _contraction_map()


def normalize_punctuation(text):
    """The VQA eval's processPunctuation: drop or space out punctuation, drop periods not before a digit."""
    out = text
    joined_digits = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in _PUNCTUATION:
        # a mark next to a space (or any text with a 1,000-style number) is dropped; one
        # inside a word becomes a space
        if (p + ' ' in text or ' ' + p in text) or joined_digits:
            out = out.replace(p, '')
        else:
            out = out.replace(p, ' ')
    return _PERIOD_NOT_BEFORE_DIGIT.sub('', out)


def normalize_digits_articles(text):
    """The VQA eval's processDigitArticle: lower case, number words -> digits, no articles, contractions."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return ' '.join(words)


def normalize_answer(answer):
    """A predicted answer as the standard evaluation compares it."""
    answer = answer.replace('\n', ' ').replace('\t', ' ').strip()
    return normalize_digits_articles(normalize_punctuation(answer))


def answer_accuracy(answer, human_answers):
    """VQA accuracy of one answer: min(#humans that gave it / 3, 1), averaged over the 10 sets
    of 9 of the (usually 10) human answers, as the standard evaluation computes it.

    As there, the prediction is fully normalised (normalize_answer), the human answers only
    have their punctuation normalised, and only when they disagree.
    """
    answer = normalize_answer(answer)
    if len(set(human_answers)) > 1:
        human_answers = [normalize_punctuation(a) for a in human_answers]
    matches = sum(a == answer for a in human_answers)
    # leaving out human i: the others match (matches - [answer_i matches]) times
    scores = [min(1.0, (matches - (a == answer)) / 3) for a in human_answers]
    return sum(scores) / len(scores)


def vqa_accuracy(results, annotation):
    """Overall VQA accuracy (percent) of results [{question_id, answer}] over the questions of
    `annotation` that carry human answers. Every such question must have a result."""
    answers = {int(r['question_id']): r['answer'] for r in results}
    scores = []
    for ann in annotation:
        if not isinstance(ann.get('answer'), list):
            continue
        question_id = int(ann['question_id'])
        if question_id not in answers:
            raise ValueError(f'vqa_accuracy: no answer for question_id {question_id}')
        scores.append(answer_accuracy(answers[question_id], ann['answer']))
    if not scores:
        raise ValueError('vqa_accuracy: no question of the split carries human answers')
    return 100.0 * sum(scores) / len(scores)
