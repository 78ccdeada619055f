"""Flickr30k (Karpathy split): retrieval training and evaluation.

Annotation files (in ann_root, downloaded from the original's URLs when missing):
- flickr30k_train.json: [{"image": "flickr30k-images/1000092795.jpg", "caption": str,
  "image_id": ...}, ...], one entry per caption;
- flickr30k_{val,test}.json: [{"image": ..., "caption": [str, ...]}, ...].
"""
import os

from torch.utils.data import Dataset

from data.coco_karpathy_dataset import retrieval_eval_dataset
from data.utils import fetch_annotation, load_image, load_json_list, pre_caption

EVAL_FILES = {"val": "flickr30k_val.json", "test": "flickr30k_test.json"}


class flickr30k_train(Dataset):
    """Items (image, prompt + caption, img_idx), as coco_karpathy_train."""

    def __init__(self, transform, image_root, ann_root, max_words=30, prompt=""):
        self.ann_file = fetch_annotation(ann_root, "flickr30k_train.json")
        self.annotation = load_json_list(
            self.ann_file, {"image": str, "caption": str, "image_id": (str, int)})
        self.transform = transform
        self.image_root = image_root
        self.max_words = max_words
        self.prompt = prompt

        self.img_ids = {}
        for ann in self.annotation:
            self.img_ids.setdefault(ann["image_id"], len(self.img_ids))

    def __len__(self):
        return len(self.annotation)

    def __getitem__(self, index):
        ann = self.annotation[index]
        image = load_image(os.path.join(self.image_root, ann["image"]), self.ann_file, index)
        image = self.transform(image)
        caption = self.prompt + pre_caption(ann["caption"], self.max_words)
        return image, caption, self.img_ids[ann["image_id"]]


class flickr30k_retrieval_eval(retrieval_eval_dataset):
    """Items (image, index) with .text, .image, .txt2img, .img2txt."""

    def __init__(self, transform, image_root, ann_root, split, max_words=30):
        if split not in EVAL_FILES:
            raise ValueError(f"split must be one of {sorted(EVAL_FILES)}, got {split!r}")
        ann_file = fetch_annotation(ann_root, EVAL_FILES[split])
        super().__init__(transform, image_root, ann_file, max_words)
