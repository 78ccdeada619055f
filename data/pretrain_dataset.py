"""Pre-training image-text pairs from JSON lists, plus one LAION shard per epoch.

Each file of `ann_file` (config key train_file) is a JSON list of
{"image": path, "caption": str}; image paths are used as written (absolute, or relative
to the working directory), as in the original. With `laion_path`, the *.json shards in
that folder (same format) are cycled: shard 0 at start, shard epoch % n after
`reload_laion(epoch)`.
"""
import contextlib
import glob
import os

from PIL import Image, ImageFile
from torch.utils.data import Dataset

from data.utils import DataError, load_image, load_json_list, pre_caption


@contextlib.contextmanager
def _permissive_pil():
    """PIL loading truncated and very large images, for the duration of one load only."""
    truncated, max_pixels = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = True, None
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = truncated, max_pixels


def load_web_image(image_path, ann_file, index):
    """As the original for web-crawled data: a truncated or huge image is loaded anyway (the
    missing part grey), with a warning naming it; other tasks' datasets refuse such files.
    The original set this for the whole process on import; here it holds for this load only."""
    try:
        return load_image(image_path, ann_file, index)
    except DataError as error:
        reason = str(error.__cause__ or error).lower()
        if 'truncated' not in reason and 'decompression bomb' not in reason:
            raise
    with _permissive_pil():
        image = load_image(image_path, ann_file, index)
    print(f"warning: {image_path} (entry {index} of {ann_file}) is truncated or very large; loaded anyway, "
          f"as the original does for web data")
    return image

_FIELDS = {"image": str, "caption": str}


class pretrain_dataset(Dataset):
    """Items (image, caption) with caption = pre_caption(caption, 30)."""

    def __init__(self, ann_file, laion_path, transform):
        if isinstance(ann_file, str):
            ann_file = [ann_file]
        self.ann_pretrain, self.pretrain_sources = [], []
        for path in ann_file:
            print(f"loading {path}")
            entries = load_json_list(path, _FIELDS)
            self.pretrain_sources.append((path, len(self.ann_pretrain)))
            self.ann_pretrain += entries

        self.laion_path = laion_path
        self.laion_files = []
        if laion_path:
            # Sorted so that every rank (and every run) sees the same shard order.
            self.laion_files = sorted(glob.glob(os.path.join(laion_path, "*.json")))
            if not self.laion_files:
                raise DataError(f"laion_path '{laion_path}' holds no *.json shard")
            self._load_laion(0)
        else:
            self.ann_laion, self.laion_file = [], None
            self.annotation = self.ann_pretrain
        self.transform = transform

    def _load_laion(self, shard):
        self.laion_file = self.laion_files[shard]
        print(f"loading {self.laion_file}")
        self.ann_laion = load_json_list(self.laion_file, _FIELDS)
        self.annotation = self.ann_pretrain + self.ann_laion

    def reload_laion(self, epoch):
        """Swap in LAION shard epoch % (number of shards)."""
        if not self.laion_files:
            raise DataError("reload_laion: this dataset was built without laion_path")
        self._load_laion(epoch % len(self.laion_files))

    def _source(self, index):
        if index >= len(self.ann_pretrain):
            return self.laion_file, index - len(self.ann_pretrain)
        for path, offset in reversed(self.pretrain_sources):
            if index >= offset:
                return path, index - offset
        raise IndexError(index)

    def __len__(self):
        return len(self.annotation)

    def __getitem__(self, index):
        ann = self.annotation[index]
        ann_file, entry = self._source(index)
        image = self.transform(load_web_image(ann["image"], ann_file, entry))
        return image, pre_caption(ann["caption"], 30)
