"""Flickr30k (Karpathy split): retrieval training and evaluation.

Annotation files (in ann_root, downloaded from the original's URLs when missing):
- flickr30k_train.json: [{"image": "flickr30k-images/1000092795.jpg", "caption": str,
  "image_id": ...}, ...], one entry per caption;
- flickr30k_{val,test}.json: [{"image": ..., "caption": [str, ...]}, ...].
"""
from data.coco_karpathy_dataset import karpathy_train, retrieval_eval_dataset
from data.utils import fetch_annotation, load_json_list

EVAL_FILES = {"val": "flickr30k_val.json", "test": "flickr30k_test.json"}


class flickr30k_train(karpathy_train):
    """Items (image, prompt + caption, img_idx), as coco_karpathy_train."""

    ann_name = "flickr30k_train.json"


class flickr30k_retrieval_eval(retrieval_eval_dataset):
    """Items (image, index) with .text, .image, .txt2img, .img2txt."""

    def __init__(self, transform, image_root, ann_root, split, max_words=30):
        if split not in EVAL_FILES:
            raise ValueError(f"split must be one of {sorted(EVAL_FILES)}, got {split!r}")
        ann_file = fetch_annotation(ann_root, EVAL_FILES[split])
        annotation = load_json_list(ann_file, {"image": str, "caption": list})
        super().__init__(transform, image_root, annotation, ann_file, max_words)
