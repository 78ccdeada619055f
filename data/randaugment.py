"""RandomAugment: the original BLIP/ALBEF RandAugment variant, without OpenCV.

The original (transform/randaugment.py) works on HxWx3 uint8 numpy arrays with cv2. This
re-implementation keeps its operation list, magnitude mapping, random draws (numpy's
global generator, in the same order) and output type (a uint8 numpy array, which
`transforms.ToTensor` accepts), using numpy look-up tables and PIL affine warps:

- each call samples N operation names with replacement (`np.random.choice`), then applies
  each one with probability 0.5 at magnitude M (out of MAX_LEVEL = 10);
- enhance ops (Brightness, Sharpness, Color, Contrast) use factor M/10 * 1.8 + 0.1, so at
  BLIP's M=5 the factor is exactly 1.0 (they leave the image unchanged);
- ShearX/Y shear by M/10 * 0.3, TranslateX/Y shift by M/10 * 10 pixels, Rotate turns by
  M/10 * 30 degrees, each with a random sign, filling with grey (128, 128, 128);
- AutoContrast, Equalize and Sharpness reproduce PIL's definitions like the original;
  Color and Contrast use the original's channel weights (written for BGR arrays, applied
  to the array as given, as the original does on PIL's RGB arrays).

Geometric warps are bilinear as in the original (cv2.INTER_LINEAR); PIL samples at pixel
centres, so results can differ from cv2's by a fraction of a pixel.
"""
import numpy as np
from PIL import Image

MAX_LEVEL = 10
TRANSLATE_CONST = 10
REPLACE_VALUE = (128, 128, 128)


# --------------------------------------------------------------------------------------
# Operations on HxWx3 uint8 arrays
# --------------------------------------------------------------------------------------

def identity_func(img):
    return img


def autocontrast_func(img):
    """Stretch each channel's [min, max] to [0, 255] (PIL ImageOps.autocontrast, cutoff 0)."""
    out = np.empty_like(img)
    for c in range(img.shape[2]):
        channel = img[..., c]
        low, high = int(channel.min()), int(channel.max())
        if high <= low:
            out[..., c] = channel
            continue
        scale = 255.0 / (high - low)
        table = np.arange(256) * scale - low * scale
        out[..., c] = table.clip(0, 255).astype(np.uint8)[channel]
    return out


def equalize_func(img):
    """Histogram equalisation per channel with PIL's ImageOps.equalize table."""
    out = np.empty_like(img)
    for c in range(img.shape[2]):
        channel = img[..., c]
        hist = np.bincount(channel.ravel(), minlength=256)
        nonzero = hist[hist != 0]
        step = int(nonzero[:-1].sum()) // 255
        if step == 0:
            out[..., c] = channel
            continue
        # table[i] = (step // 2 + number of pixels below i) // step
        counts = np.concatenate([[step // 2], hist[:-1]])
        table = (np.cumsum(counts) // step).clip(0, 255).astype(np.uint8)
        out[..., c] = table[channel]
    return out


def _affine(img, coefficients, fill):
    """PIL affine warp; coefficients map output (x, y) to input pixel coordinates."""
    pil = Image.fromarray(img)
    warped = pil.transform(pil.size, Image.Transform.AFFINE, coefficients,
                           resample=Image.Resampling.BILINEAR, fillcolor=tuple(fill))
    return np.array(warped)


def rotate_func(img, degree, fill=(0, 0, 0)):
    """Rotate counter-clockwise by `degree` about the image centre, size kept."""
    pil = Image.fromarray(img)
    return np.array(pil.rotate(degree, resample=Image.Resampling.BILINEAR,
                                 fillcolor=tuple(fill)))


def shear_x_func(img, factor, fill=(0, 0, 0)):
    # output(x, y) = input(x - factor * y, y), as cv2.warpAffine with [[1, f, 0], [0, 1, 0]]
    return _affine(img, (1, -factor, 0, 0, 1, 0), fill)


def shear_y_func(img, factor, fill=(0, 0, 0)):
    return _affine(img, (1, 0, 0, -factor, 1, 0), fill)


def translate_x_func(img, offset, fill=(0, 0, 0)):
    # output(x, y) = input(x + offset, y): the content moves left by `offset` pixels
    return _affine(img, (1, 0, offset, 0, 1, 0), fill)


def translate_y_func(img, offset, fill=(0, 0, 0)):
    return _affine(img, (1, 0, 0, 0, 1, offset), fill)


def solarize_func(img, thresh=128):
    table = np.array([v if v < thresh else 255 - v for v in range(256)])
    return table.clip(0, 255).astype(np.uint8)[img]


def color_func(img, factor):
    # The original's saturation blend, folded into one 3x3 matrix.
    matrix = (np.float32([[0.886, -0.114, -0.114],
                          [-0.587, 0.413, -0.587],
                          [-0.299, -0.299, 0.701]]) * factor
              + np.float32([[0.114], [0.587], [0.299]]))
    return np.matmul(img, matrix).clip(0, 255).astype(np.uint8)


def contrast_func(img, factor):
    mean = np.sum(np.mean(img, axis=(0, 1)) * np.array([0.114, 0.587, 0.299]))
    table = ((np.arange(256) - mean) * factor + mean).clip(0, 255).astype(np.uint8)
    return table[img]


def brightness_func(img, factor):
    table = (np.arange(256, dtype=np.float32) * factor).clip(0, 255).astype(np.uint8)
    return table[img]


def _smooth(img):
    """PIL's SMOOTH kernel [[1,1,1],[1,5,1],[1,1,1]] / 13, reflected borders, rounded."""
    padded = np.pad(img.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="reflect")
    h, w = img.shape[:2]
    total = 4.0 * padded[1:h + 1, 1:w + 1]  # centre weight 5 = 1 (in the loop) + 4
    for dy in range(3):
        for dx in range(3):
            total += padded[dy:dy + h, dx:dx + w]
    return np.floor(total / 13.0 + 0.5).clip(0, 255).astype(np.uint8)


def sharpness_func(img, factor):
    """Blend with the smoothed image; the one-pixel border stays as it is (as PIL)."""
    degenerate = _smooth(img)
    if factor == 0.0:
        return degenerate
    if factor == 1.0:
        return img
    out = img.astype(np.float32)
    inner = degenerate[1:-1, 1:-1].astype(np.float32)
    out[1:-1, 1:-1] = inner + factor * (out[1:-1, 1:-1] - inner)
    return out.clip(0, 255).astype(np.uint8)


def posterize_func(img, bits):
    mask = (0xFF << (8 - bits)) & 0xFF
    return np.bitwise_and(img, np.uint8(mask))


# --------------------------------------------------------------------------------------
# Magnitude (level) to arguments, with the original's random signs
# --------------------------------------------------------------------------------------

def _enhance_args(level):
    return ((level / MAX_LEVEL) * 1.8 + 0.1,)


def _shear_args(level):
    level = (level / MAX_LEVEL) * 0.3
    if np.random.random() > 0.5:
        level = -level
    return (level, REPLACE_VALUE)


def _translate_args(level):
    level = (level / MAX_LEVEL) * float(TRANSLATE_CONST)
    if np.random.random() > 0.5:
        level = -level
    return (level, REPLACE_VALUE)


def _rotate_args(level):
    level = (level / MAX_LEVEL) * 30
    if np.random.random() < 0.5:
        level = -level
    return (level, REPLACE_VALUE)


def _solarize_args(level):
    return (int((level / MAX_LEVEL) * 256),)


def _posterize_args(level):
    return (int((level / MAX_LEVEL) * 4),)


def _no_args(level):
    return ()


# name -> (operation, level-to-arguments); the order is the original's default op list
OPERATIONS = {
    "Identity": (identity_func, _no_args),
    "AutoContrast": (autocontrast_func, _no_args),
    "Equalize": (equalize_func, _no_args),
    "Rotate": (rotate_func, _rotate_args),
    "Solarize": (solarize_func, _solarize_args),
    "Color": (color_func, _enhance_args),
    "Contrast": (contrast_func, _enhance_args),
    "Brightness": (brightness_func, _enhance_args),
    "Sharpness": (sharpness_func, _enhance_args),
    "ShearX": (shear_x_func, _shear_args),
    "TranslateX": (translate_x_func, _translate_args),
    "TranslateY": (translate_y_func, _translate_args),
    "Posterize": (posterize_func, _posterize_args),
    "ShearY": (shear_y_func, _shear_args),
}

# The list BLIP's training transform passes (data/__init__.py of the original).
BLIP_AUGS = ["Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize",
             "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"]


class RandomAugment:
    """Apply N random operations (each with probability 0.5) at magnitude M.

    isPIL=True converts a PIL image to a numpy array first; the result is always an
    HxWx3 uint8 numpy array, as in the original.
    """

    def __init__(self, N=2, M=10, isPIL=False, augs=()):
        unknown = [a for a in augs if a not in OPERATIONS]
        if unknown:
            raise ValueError(f"RandomAugment: unknown operation(s) {unknown}; "
                             f"known: {list(OPERATIONS)}")
        self.N = N
        self.M = M
        self.isPIL = isPIL
        self.augs = list(augs) if augs else list(OPERATIONS)

    def get_random_ops(self):
        sampled = np.random.choice(self.augs, self.N)
        return [(name, 0.5, self.M) for name in sampled]

    def __call__(self, img):
        if self.isPIL:
            img = np.array(img)
        for name, prob, level in self.get_random_ops():
            if np.random.random() > prob:
                continue
            func, level_to_args = OPERATIONS[name]
            img = func(img, *level_to_args(level))
        return img

    def __repr__(self):
        return (f"{type(self).__name__}(N={self.N}, M={self.M}, isPIL={self.isPIL}, "
                f"augs={self.augs})")
