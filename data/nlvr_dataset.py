"""NLVR2: two images, one statement, a true/false label.

Annotation files (in ann_root, downloaded from the original's URLs when missing):
nlvr_{train,dev,test}.json: [{"images": ["dev/dev-850-0-img0.png", "dev/...-img1.png"],
"sentence": str, "label": "True" | "False"}, ...]; images relative to image_root.
"""
import os
import random

from torch.utils.data import Dataset

from data.utils import DataError, fetch_annotation, load_image, load_json_list, pre_caption

FILES = {"train": "nlvr_train.json", "val": "nlvr_dev.json", "test": "nlvr_test.json"}


def _swap_left_right(words):
    swap = {"left": "right", "right": "left"}
    return " ".join(swap.get(word, word) for word in words)


class nlvr_dataset(Dataset):
    """Items (image0, image1, sentence, label) with label 1 for "True", else 0.

    As in the original, in every split the two images come back in swapped order with
    probability 0.5 (Python's `random`); when the statement mentions 'left' or 'right'
    those words are swapped too, so the label stays correct.
    """

    def __init__(self, transform, image_root, ann_root, split):
        if split not in FILES:
            raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")
        self.ann_file = fetch_annotation(ann_root, FILES[split])
        self.annotation = load_json_list(
            self.ann_file, {"images": list, "sentence": str, "label": (str, bool)})
        for index, ann in enumerate(self.annotation):
            if len(ann["images"]) != 2:
                raise DataError(f"{self.ann_file}: entry {index} field 'images' must list "
                                f"2 images, got {len(ann['images'])}")
        self.transform = transform
        self.image_root = image_root

    def __len__(self):
        return len(self.annotation)

    def image_files(self):
        """(path, annotation file, entry) of every image, for check_image_files."""
        return [(os.path.join(self.image_root, name), self.ann_file, i)
                for i, ann in enumerate(self.annotation) for name in ann["images"]]

    def __getitem__(self, index):
        ann = self.annotation[index]
        image0, image1 = (
            self.transform(load_image(os.path.join(self.image_root, name), self.ann_file, index))
            for name in ann["images"])
        sentence = pre_caption(ann["sentence"], 40)
        label = 1 if str(ann["label"]) == "True" else 0

        if random.random() < 0.5:
            return image0, image1, sentence, label
        words = sentence.split(" ")
        if "left" in words or "right" in words:
            sentence = _swap_left_right(words)
        return image1, image0, sentence, label
