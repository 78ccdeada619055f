"""NoCaps (val / test) zero-shot captioning evaluation.

Annotation files (in ann_root, downloaded from the original's URLs when missing):
nocaps_{val,test}.json: [{"image": "val/0013ea2087020901.jpg", "img_id": 0}, ...].
"""
import os

from torch.utils.data import Dataset

from data.utils import DataError, fetch_annotation, load_image, load_json_list

FILES = {"val": "nocaps_val.json", "test": "nocaps_test.json"}


class nocaps_eval(Dataset):
    """Items (image, int(img_id))."""

    def __init__(self, transform, image_root, ann_root, split):
        if split not in FILES:
            raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")
        self.ann_file = fetch_annotation(ann_root, FILES[split])
        self.annotation = load_json_list(self.ann_file, {"image": str, "img_id": (int, str)})
        self.transform = transform
        self.image_root = image_root
        self.img_ids = []
        for index, ann in enumerate(self.annotation):
            try:
                self.img_ids.append(int(ann["img_id"]))
            except ValueError as error:
                raise DataError(f"{self.ann_file}: entry {index} field 'img_id' is not an "
                                f"integer: {ann['img_id']!r}") from error

    def __len__(self):
        return len(self.annotation)

    def image_files(self):
        """(path, annotation file, entry) of every image, for check_image_files."""
        return [(os.path.join(self.image_root, ann["image"]), self.ann_file, i)
                for i, ann in enumerate(self.annotation)]

    def __getitem__(self, index):
        ann = self.annotation[index]
        image = load_image(os.path.join(self.image_root, ann["image"]), self.ann_file, index)
        return self.transform(image), self.img_ids[index]
