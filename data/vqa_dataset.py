"""VQA v2 (+ Visual Genome QA) training and VQA test, with the answer list for ranking.

Annotation files (in ann_root, downloaded from the original's URLs when missing):
- vqa_train.json / vqa_val.json: [{"question_id": int, "question": str,
  "answer": [str, ...] (the 10 human answers), "image": "train2014/COCO_...jpg",
  "dataset": "vqa"}, ...]; image relative to vqa_root;
- vg_qa.json: [{"question_id": ..., "question": str, "answer": str, "image": "image/1.jpg",
  "dataset": "vg"}, ...]; image relative to vg_root;
- vqa_test.json: [{"question_id": int, "question": str, "image": ..., "dataset": "vqa"}];
- answer_list.json: [str, ...], the candidates ranked at test time.
`train_files` names the training files without '.json' (the original:
['vqa_train', 'vqa_val', 'vg_qa']).
"""
import os

import torch
from torch.utils.data import Dataset

from data.utils import DataError, check_entries, fetch_annotation, load_image, load_json, load_json_list, pre_question

# Each VG answer counts as one fifth of a unanimous VQA answer (the original's weight).
VG_ANSWER_WEIGHT = 0.2

_COMMON_FIELDS = {"question": str, "image": str, "dataset": str}


def _check_dataset_field(annotation, path, train):
    for index, ann in enumerate(annotation):
        kind = ann["dataset"]
        if kind not in ("vqa", "vg"):
            raise DataError(f"{path}: entry {index} field 'dataset' must be 'vqa' or 'vg', "
                            f"got {kind!r}")
        if train:
            answer_type = list if kind == "vqa" else str
            check_entries([ann], path, {"answer": answer_type}, start=index)
            if kind == "vqa" and not ann["answer"]:
                raise DataError(f"{path}: entry {index} has an empty 'answer' list")


class vqa_dataset(Dataset):
    """split='train': items (image, question, answers, weights) over `train_files`;
    split='test': items (image, question, question_id), plus `.answer_list`."""

    def __init__(self, transform, ann_root, vqa_root, vg_root, train_files=(), split="train"):
        if split not in ("train", "test"):
            raise ValueError(f"vqa_dataset: split must be 'train' or 'test', got {split!r}")
        self.split = split
        self.transform = transform
        self.vqa_root = vqa_root
        self.vg_root = vg_root

        # Entry i of the concatenated annotation came from self.ann_files[self.ann_source[i]]
        # at position i - self.ann_offsets[...]: kept to name the file in errors.
        self.annotation, self.ann_files, self.ann_offsets = [], [], []
        if split == "train":
            if isinstance(train_files, str):
                train_files = [train_files]
            if not train_files:
                raise ValueError("vqa_dataset: train_files is empty (e.g. "
                                 "['vqa_train', 'vqa_val', 'vg_qa'])")
            for name in train_files:
                path = fetch_annotation(ann_root, f"{name}.json")
                entries = load_json_list(path, _COMMON_FIELDS)
                _check_dataset_field(entries, path, train=True)
                self._add(path, entries)
        else:
            path = fetch_annotation(ann_root, "vqa_test.json")
            entries = load_json_list(path, {**_COMMON_FIELDS, "question_id": (int, str)})
            _check_dataset_field(entries, path, train=False)
            self._add(path, entries)

            answer_file = fetch_annotation(ann_root, "answer_list.json")
            self.answer_list = load_json(answer_file)
            if not (isinstance(self.answer_list, list) and self.answer_list
                    and all(isinstance(a, str) for a in self.answer_list)):
                raise DataError(f"{answer_file}: expected a non-empty JSON list of answer "
                                f"strings")

    def _add(self, path, entries):
        self.ann_files.append(path)
        self.ann_offsets.append(len(self.annotation))
        self.annotation += entries

    def _source(self, index):
        """(annotation file, index within it) of concatenated entry `index`."""
        for path, offset in reversed(list(zip(self.ann_files, self.ann_offsets))):
            if index >= offset:
                return path, index - offset
        raise IndexError(index)

    def __len__(self):
        return len(self.annotation)

    def image_files(self):
        """(path, annotation file, entry) of every image, for check_image_files."""
        files = []
        for index, ann in enumerate(self.annotation):
            root = self.vqa_root if ann["dataset"] == "vqa" else self.vg_root
            files.append((os.path.join(root, ann["image"]), *self._source(index)))
        return files

    def __getitem__(self, index):
        ann = self.annotation[index]
        root = self.vqa_root if ann["dataset"] == "vqa" else self.vg_root
        ann_file, entry = self._source(index)
        image = self.transform(load_image(os.path.join(root, ann["image"]), ann_file, entry))
        question = pre_question(ann["question"])

        if self.split == "test":
            return image, question, ann["question_id"]

        if ann["dataset"] == "vqa":
            # Each distinct answer weighs (its count) / (number of answers), in first-seen order.
            answer_weight = {}
            for answer in ann["answer"]:
                answer_weight[answer] = answer_weight.get(answer, 0) + 1 / len(ann["answer"])
            answers = list(answer_weight)
            weights = list(answer_weight.values())
        else:
            answers = [ann["answer"]]
            weights = [VG_ANSWER_WEIGHT]
        return image, question, answers, weights


def vqa_collate_fn(batch):
    """Stack images; flatten answers and weights; n[i] = number of answers of sample i."""
    images, questions, answers, weights, n = [], [], [], [], []
    for image, question, answer, weight in batch:
        images.append(image)
        questions.append(question)
        answers += answer
        weights += weight
        n.append(len(answer))
    return torch.stack(images, dim=0), questions, answers, torch.Tensor(weights), n
