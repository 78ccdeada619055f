"""NoCaps (val / test) zero-shot captioning evaluation.

Annotation files (in ann_root, downloaded from the original's URLs when missing):
nocaps_{val,test}.json: [{"image": "val/0013ea2087020901.jpg", "img_id": 0}, ...].
"""
from data.coco_karpathy_dataset import image_id_eval
from data.utils import DataError, fetch_annotation, load_json_list

FILES = {"val": "nocaps_val.json", "test": "nocaps_test.json"}


class nocaps_eval(image_id_eval):
    """Items (image, int(img_id)), as coco_karpathy_caption_eval."""

    def __init__(self, transform, image_root, ann_root, split):
        if split not in FILES:
            raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")
        ann_file = fetch_annotation(ann_root, FILES[split])
        super().__init__(transform, image_root, load_json_list(ann_file, {"image": str, "img_id": (int, str)}),
                         ann_file)
        self.img_ids = []
        for index, ann in enumerate(self.annotation):
            try:
                self.img_ids.append(int(ann["img_id"]))
            except ValueError as error:
                raise DataError(f"{self.ann_file}: entry {index} field 'img_id' is not an "
                                f"integer: {ann['img_id']!r}") from error
