"""Visual question answering on VQA v2 (+ Visual Genome QA): fine-tune BLIP, answer the test questions.

    python train_vqa.py --config configs/vqa.yaml --output_dir output/VQA
    python train_vqa.py --config configs/vqa.yaml --evaluate
    torchrun --nproc_per_node=8 train_vqa.py --config configs/vqa.yaml amp=bf16

As the original: every epoch trains and saves checkpoint_%02d.pth (plus checkpoint_last.pth
to resume); the test questions are answered once, after training, into
result/vqa_result.json ([{question_id, answer}], what the official server expects). Answers
are ranked from the answer list (`inference: rank`: the k_test most likely first tokens,
then the best full answer) or generated (`inference: generate`, beam search).

When the test split carries the human answers (an `answer` list per question, as the
synthetic data and a re-split of VQA v2 val do), the VQA accuracy is also computed here and
written to evaluate.txt: the standard metric, see `vqa_accuracy`.
"""
import json
import os
import re
import time
from functools import partial
from itertools import product

import torch

import engine
import utils
from data import create_dataset, create_loader, create_sampler, vqa_collate_fn
from data.utils import save_result
from models.blip_vqa import blip_vqa

# Keys of configs/vqa.yaml, all read below.
REQUIRED_KEYS = ('vqa_root', 'vg_root', 'train_files', 'ann_root', 'pretrained', 'vit', 'batch_size_train',
                 'batch_size_test', 'vit_grad_ckpt', 'vit_ckpt_layer', 'init_lr', 'image_size', 'k_test',
                 'inference', 'weight_decay', 'min_lr', 'max_epoch')
# Model options the official config leaves to blip_vqa's defaults (tiny test models set them).
TASK_DEFAULTS = {'med_config': 'configs/med_config.json'}
INFERENCE_MODES = ('rank', 'generate')


def train_step(model, batch, epoch, i, num_iters, device):
    image, question, answer, weights, n = batch
    image = image.to(device, non_blocking=True)
    weights = weights.to(device, non_blocking=True)
    loss = model(image, question, answer, train=True, n=n, weights=weights)
    return {'loss': loss}


@torch.no_grad()
def evaluation(model, data_loader, device, config):
    """Answer every question of the loader: [{'question_id': int, 'answer': str}] of this rank."""
    model.eval()
    metric_logger = utils.MetricLogger(delimiter='  ')
    header = 'Generate VQA test result:'

    if config['inference'] == 'rank':
        answer_list = data_loader.dataset.answer_list
        # every candidate tokenized once, [DEC] first (as the original)
        answer_candidates = model.tokenize_candidates(answer_list).to(device)

    result = []
    for image, question, question_id in metric_logger.log_every(data_loader, 50, header):
        image = image.to(device, non_blocking=True)
        with engine.autocast(config, device):
            if config['inference'] == 'generate':
                answers = model(image, question, train=False, inference='generate')
            else:
                answer_ids = model(image, question, answer_candidates, train=False, inference='rank',
                                   k_test=config['k_test'])
                answers = [answer_list[answer_id] for answer_id in answer_ids.tolist()]
        for ques_id, answer in zip(question_id, answers):
            result.append({'question_id': int(ques_id), 'answer': answer})
    return result


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


def has_human_answers(annotation):
    return bool(annotation) and all(isinstance(ann.get('answer'), list) and ann['answer'] for ann in annotation)


# --------------------------------------------------------------------------- main

def main(args, config, device):
    #### Dataset ####
    print('Creating vqa datasets')
    datasets = create_dataset('vqa', config)
    engine.check_images(datasets[1:] if args.evaluate else datasets, config)  # --evaluate: the test images
    # the test questions are split over ranks too; padded repeats are dropped by save_result
    samplers = create_sampler(datasets, [True, False], utils.get_world_size(), utils.get_rank())
    train_loader, test_loader = create_loader(datasets, samplers,
                                              batch_size=[config['batch_size_train'], config['batch_size_test']],
                                              num_workers=[config['num_workers']] * 2, is_trains=[True, False],
                                              collate_fns=[vqa_collate_fn, None])

    #### Model ####
    print('Creating model')
    model = blip_vqa(pretrained=config['pretrained'], image_size=config['image_size'], vit=config['vit'],
                     vit_grad_ckpt=config['vit_grad_ckpt'], vit_ckpt_layer=config['vit_ckpt_layer'],
                     med_config=config['med_config'])
    model, model_without_ddp, optimizer, scaler, state = engine.prepare_training(model, args, config, device)

    print('Start training')
    start_time = time.time()
    for epoch in range(state.start_epoch, config['max_epoch']):
        if args.evaluate:
            break
        engine.set_epoch(train_loader, epoch)
        utils.cosine_lr_schedule(optimizer, epoch, config['max_epoch'], config['init_lr'], config['min_lr'])
        train_stats = engine.train_one_epoch(model, train_loader, optimizer, epoch, device, config,
                                             partial(train_step, device=device), scaler=scaler, state=state)
        engine.log_json(args.output_dir, {**engine.split_stats(train=train_stats), 'epoch': epoch})
        # the original's per-epoch checkpoint, and the full state to resume from
        engine.save_model(os.path.join(args.output_dir, 'checkpoint_%02d.pth' % epoch),
                          model_without_ddp, optimizer, config, epoch)
        engine.save_last_checkpoint(args.output_dir, model_without_ddp, optimizer, scaler, config, epoch, state)
        engine.end_epoch(device)

    vqa_result = evaluation(model_without_ddp, test_loader, device, config)
    result_file = save_result(vqa_result, args.result_dir, 'vqa_result', remove_duplicate='question_id')

    annotation = test_loader.dataset.annotation
    if utils.is_main_process() and has_human_answers(annotation):
        with open(result_file) as f:
            accuracy = vqa_accuracy(json.load(f), annotation)
        print(f'VQA accuracy on the test split: {accuracy:.2f}')
        engine.log_json(args.output_dir, {'test_vqa_acc': accuracy, 'num_questions': len(annotation),
                                          'inference': config['inference']}, filename='evaluate.txt')

    engine.print_elapsed(start_time)


def run(argv=None):
    args, config = engine.parse_args_and_config(
        'BLIP visual question answering (VQA v2)', './configs/vqa.yaml', 'output/VQA',
        defaults=TASK_DEFAULTS, required=REQUIRED_KEYS, known=(), argv=argv)
    if config['inference'] not in INFERENCE_MODES:
        raise utils.ConfigError(f"config file {args.config}: inference must be one of "
                                f"{', '.join(INFERENCE_MODES)}; got {config['inference']!r}")
    engine.check_paths(config, args.config, dirs=['vqa_root', 'vg_root'], files=['pretrained'])
    device = engine.setup(args, config)
    args.result_dir = os.path.join(args.output_dir, 'result')
    os.makedirs(args.result_dir, exist_ok=True)
    main(args, config, device)


if __name__ == '__main__':
    run()
