"""COCO (Karpathy split): captioning / retrieval training, caption and retrieval evaluation.

Annotation files (in ann_root, downloaded from the original's URLs when missing):
- coco_karpathy_train.json: [{"image": "val2014/COCO_val2014_000000391895.jpg",
  "caption": str, "image_id": "coco_391895"}, ...], one entry per caption;
- coco_karpathy_{val,test}.json: [{"image": ..., "caption": [str, ...]}, ...], one entry
  per image. Image paths are relative to image_root.
"""
import os

from torch.utils.data import Dataset

from data.utils import DataError, fetch_annotation, load_image, load_json_list, pre_caption

EVAL_FILES = {"val": "coco_karpathy_val.json", "test": "coco_karpathy_test.json"}


def _eval_file(split):
    if split not in EVAL_FILES:
        raise ValueError(f"split must be one of {sorted(EVAL_FILES)}, got {split!r}")
    return EVAL_FILES[split]


def coco_image_id(image_path):
    """Numeric COCO id from a file name, parsed exactly as the original does.

    'val2014/COCO_val2014_000000391895.jpg' -> 391895. (The original strips the
    characters '.', 'j', 'p', 'g' from both ends, then takes the last '_' field.)
    """
    return int(image_path.split("/")[-1].strip(".jpg").split("_")[-1])


class image_dataset(Dataset):
    """What every dataset of this file (and nocaps, custom data) shares: `annotation`, a list of
    entries {image, ...} whose image paths are relative to image_root, read from `ann_file`.
    Error messages name an entry by its optional 'where' (custom data: 'line 3'), else its index."""

    def __init__(self, transform, image_root, annotation, ann_file):
        self.ann_file = ann_file
        self.annotation = annotation
        self.transform = transform
        self.image_root = image_root

    def __len__(self):
        return len(self.annotation)

    def image_files(self):
        """(path, annotation file, entry) of every image, for check_image_files."""
        return [(os.path.join(self.image_root, ann["image"]), self.ann_file, ann.get("where", i))
                for i, ann in enumerate(self.annotation)]

    def read_image(self, index):
        """Entry `index`'s image, transformed (DataError naming the image and the entry)."""
        ann = self.annotation[index]
        return self.transform(load_image(os.path.join(self.image_root, ann["image"]), self.ann_file,
                                         ann.get("where", index)))


class image_id_eval(image_dataset):
    """Caption evaluation: items (image, img_ids[index]), the id a results file names the image by;
    a subclass fills img_ids when it loads the file (so a bad id fails at load time)."""

    def __getitem__(self, index):
        return self.read_image(index), self.img_ids[index]


class caption_train_dataset(image_dataset):
    """Items (image, prompt + caption, img_idx) of `annotation` [{image, caption, image_id}],
    one per entry: img_idx numbers the distinct image_ids in order of first appearance (the
    positive-pair index of the retrieval ITC loss). `ann_file` (and an entry's optional
    'where') name the source in error messages."""

    def __init__(self, transform, image_root, annotation, ann_file, max_words=30, prompt=""):
        super().__init__(transform, image_root, annotation, ann_file)
        self.max_words = max_words
        self.prompt = prompt

        self.img_ids = {}
        for ann in self.annotation:
            self.img_ids.setdefault(ann["image_id"], len(self.img_ids))

    def __getitem__(self, index):
        ann = self.annotation[index]
        image = self.read_image(index)
        caption = self.prompt + pre_caption(ann["caption"], self.max_words)
        return image, caption, self.img_ids[ann["image_id"]]


class karpathy_train(caption_train_dataset):
    """caption_train_dataset of the Karpathy training file a subclass names (COCO and
    Flickr30k share the format), downloaded when missing."""

    ann_name = None

    def __init__(self, transform, image_root, ann_root, max_words=30, prompt=""):
        ann_file = fetch_annotation(ann_root, self.ann_name)
        annotation = load_json_list(ann_file, {"image": str, "caption": str, "image_id": (str, int)})
        super().__init__(transform, image_root, annotation, ann_file, max_words, prompt)


class coco_karpathy_train(karpathy_train):
    ann_name = "coco_karpathy_train.json"


class coco_karpathy_caption_eval(image_id_eval):
    """Items (image, int(coco image id)); the id is parsed from the file name."""

    def __init__(self, transform, image_root, ann_root, split):
        ann_file = fetch_annotation(ann_root, _eval_file(split))
        super().__init__(transform, image_root, load_json_list(ann_file, {"image": str}), ann_file)
        # Parse every id now, so a file name without a numeric id fails at load time.
        self.img_ids = []
        for index, ann in enumerate(self.annotation):
            try:
                self.img_ids.append(coco_image_id(ann["image"]))
            except ValueError as error:
                raise DataError(f"{self.ann_file}: entry {index} field 'image': cannot parse "
                                f"a numeric COCO image id from {ann['image']!r} (expected "
                                f"names like COCO_val2014_000000391895.jpg)") from error


class retrieval_eval_dataset(image_dataset):
    """Image-text retrieval evaluation: items (image, index) plus the text side.

    annotation: [{image, caption: [str, ...]}], one entry per image. .text: every caption
    (pre_caption'd), .image: image paths, .txt2img[text_id] -> image index,
    .img2txt[image index] -> list of text ids, as the original builds them.
    """

    def __init__(self, transform, image_root, annotation, ann_file, max_words=30):
        super().__init__(transform, image_root, annotation, ann_file)
        self.text, self.image = [], []
        self.txt2img, self.img2txt = {}, {}
        for img_id, ann in enumerate(self.annotation):
            self.image.append(ann["image"])
            self.img2txt[img_id] = []
            for caption in ann["caption"]:
                txt_id = len(self.text)
                self.text.append(pre_caption(caption, max_words))
                self.img2txt[img_id].append(txt_id)
                self.txt2img[txt_id] = img_id

    def __getitem__(self, index):
        return self.read_image(index), index


class coco_karpathy_retrieval_eval(retrieval_eval_dataset):
    def __init__(self, transform, image_root, ann_root, split, max_words=30):
        ann_file = fetch_annotation(ann_root, _eval_file(split))
        annotation = load_json_list(ann_file, {"image": str, "caption": list})
        super().__init__(transform, image_root, annotation, ann_file, max_words)
