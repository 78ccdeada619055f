"""Config files: YAML in, typed KEY=VALUE overrides, every key rule the engine applies, a copy
written to the output folder; errors name the file and the key at fault."""
import copy
import math
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from engine.fileio import atomic_write

# New config keys. Their defaults reproduce the original scripts, so official configs run
# unchanged; they are passed to load_config as `defaults`, so overriding them from the
# command line is allowed.
ENGINE_DEFAULTS = {
    'amp': 'none',            # 'bf16' | 'fp16' | 'none' (float32, as the original)
    'accum_steps': 1,         # micro-batches per optimizer step (global batch = bs * world * accum)
    'emulate_world_size': 1,  # one process trains as this many GPUs did (engine/emulate.py)
    'clip_grad_norm': None,   # max global gradient norm; None: no clipping (the original)
    'text_grad_ckpt': False,  # activation checkpointing of the text transformer layers
    'num_workers': 4,         # data loader workers per split (the original's value)
    'check_images': 'exists',  # before training, every image exists and opens: full | exists | off
    'save_safetensors': False,  # also write checkpoint_best.safetensors (the weights alone)
    'keep_previous_last': True,  # keep the epoch before as checkpoint_last_previous.pth: an auto-resume
                                 # falls back to it when checkpoint_last.pth is damaged (twice the disk)
    'synthetic': None,        # toy configs: {root, seed, num_images, ...} of data/synthetic.py,
                              # generated on first use (see prepare_synthetic_data)
}
AMP_MODES = ('none', 'bf16', 'fp16')

# Numeric keys the scripts read, and the values that mean something: (integer?, lowest, whether
# the lowest itself is allowed, highest). check_config applies them to every key a config has.
VALUE_RULES = {
    'max_epoch': (True, 1, True, None), 'batch_size': (True, 1, True, None),
    'batch_size_train': (True, 1, True, None), 'batch_size_test': (True, 1, True, None),
    'num_workers': (True, 0, True, None), 'image_size': (True, 1, True, None),
    'queue_size': (True, 1, True, None), 'embed_dim': (True, 1, True, None),
    'k_test': (True, 0, True, None),  # 0: rank by ITC alone
    'rerank_batch_size': (True, 1, True, None), 'num_frm_test': (True, 1, True, None),
    'num_beams': (True, 1, True, None), 'max_length': (True, 1, True, None),
    'min_length': (True, 0, True, None), 'vit_ckpt_layer': (True, 0, True, None),
    'warmup_steps': (True, 0, True, None), 'emulate_world_size': (True, 1, True, None),
    'init_lr': (False, 0, True, None), 'min_lr': (False, 0, True, None),
    'warmup_lr': (False, 0, True, None), 'weight_decay': (False, 0, True, None),
    'lr_decay_rate': (False, 0, False, 1), 'alpha': (False, 0, True, 1),
    'momentum': (False, 0, True, 1),
    'num_captions': (True, 1, True, None), 'top_p': (False, 0, False, 1),
    'itm_threshold': (False, 0, True, 1), 'chunk_size': (True, 1, True, None),
}


class ConfigError(ValueError):
    """A config file or an override is wrong; the message names the file and the key."""


def _read_yaml(path):
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
    try:
        data = YAML(typ="safe").load(text)
    except YAMLError as e:
        raise ConfigError(f"malformed YAML in config file {path}:\n{e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, "
                          f"got a {type(data).__name__}")
    _check_key_names(data, path)
    return data


def _check_key_names(mapping, path, prefix=""):
    # `: value` or `1: value` parse as keys None / 1: no task reads such a key
    for key, value in mapping.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"config file {path}: {prefix}{key!r} is not a key name (a line "
                              f"'{key}: ...' or a missing key before ':')")
        if isinstance(value, dict):
            _check_key_names(value, path, f"{prefix}{key}.")


def _merge(base, update):
    """Recursive dict merge: values of `update` win; nested mappings are merged."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override_value(text):
    """Type a command-line value the way YAML would: '1e-5' -> float, '[1,2]' -> list,
    'true' -> bool, '~' / 'null' -> None. Empty text gives '' and text YAML cannot parse
    stays a string."""
    if text.strip() == "":
        return ""
    try:
        return YAML(typ="safe").load(text)
    except YAMLError:
        return text


def apply_override(config, override, source="config", optional=()):
    """Apply one 'key=value' / 'a.b.c=value' override to `config` in place.

    Every key on the path must already exist, or be a top-level key of `optional` (keys a
    task reads when present); otherwise ConfigError lists the valid keys.
    """
    key, sep, raw_value = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like key=value (for {source})")

    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "the top level"
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: '{'.'.join(parts[:depth])}' in "
                              f"{source} is a {type(node).__name__}, not a mapping")
        if part not in node and not (depth == 0 and part in optional):
            valid = ", ".join(sorted(map(str, set(node) | (set(optional) if depth == 0 else set()))))
            raise ConfigError(f"unknown config key '{key}' in override {override!r} "
                              f"(not in {source} at {where}); valid keys: {valid}")
        if depth < len(parts) - 1:
            node = node[part]
    node[parts[-1]] = parse_override_value(raw_value)


def load_config(path, overrides=(), defaults=None, optional=()):
    """Read a YAML config, merge it over `defaults`, then apply `overrides`.

    path:      the YAML file. Missing, unreadable or malformed: ConfigError naming it.
    overrides: strings 'key=value' or 'a.b.c=value'; values are typed as YAML. A key that is
               neither in the file nor in `defaults` raises ConfigError listing valid keys.
    defaults:  values for keys the file may leave out (new keys whose defaults reproduce
               the original behaviour); the file's values win.
    optional:  top-level keys without a default that overrides may add.
    """
    config = _merge(copy.deepcopy(defaults or {}), _read_yaml(path))
    for override in overrides:
        apply_override(config, override, source=str(path), optional=optional)
    return config


def require_keys(config, keys, path):
    """Raise ConfigError naming the first key of `keys` (dotted for nested) that `config`
    (read from `path`) lacks."""
    for key in keys:
        node = config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"config file {path} is missing required key '{key}'")
            node = node[part]


def _plain(value):
    # YAML(typ='safe') dumps only plain types: turn tuples and Paths into lists and str.
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def save_config(config, output_dir):
    """Write `config` to output_dir/config.yaml (atomically); returns the path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "config.yaml"
    yaml = YAML(typ="safe")
    yaml.default_flow_style = False
    with atomic_write(path, "w", encoding="utf-8") as f:
        yaml.dump(_plain(config), f)
    return str(path)


def check_config(config, path, required=(), known=None, defaults=ENGINE_DEFAULTS):
    """Missing required keys, unknown keys (when `known` is given) and engine values."""
    require_keys(config, required, path)
    if known is not None:
        valid = set(known) | set(required) | set(defaults) | set(ENGINE_DEFAULTS)
        unknown = sorted(set(config) - valid)
        if unknown:
            raise ConfigError(f"config file {path}: unknown key(s) {', '.join(unknown)}; "
                                    f"valid keys: {', '.join(sorted(valid))}")
    for key, rule in VALUE_RULES.items():
        if key in config:
            check_value(config[key], key, path, *rule)
    if config['amp'] not in AMP_MODES:
        raise ConfigError(f"config file {path}: amp must be one of {', '.join(AMP_MODES)}; "
                                f"got {config['amp']!r}")
    accum = config['accum_steps']
    if not isinstance(accum, int) or isinstance(accum, bool) or accum < 1:
        raise ConfigError(f'config file {path}: accum_steps must be an integer >= 1; got {accum!r}')
    clip = config['clip_grad_norm']
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip <= 0):
        raise ConfigError(f'config file {path}: clip_grad_norm must be a positive number '
                                f'or null; got {clip!r}')
    check_relations(config, path)


VIT_SIZES = ('base', 'large')  # models.blip.create_vit's names; both have 16-pixel patches
VIT_KEYS = ('width', 'depth', 'heads')  # a mapping's required keys (patch_size defaults to 16)


def check_relations(config, path):
    """Rules between keys (each alone may be fine): the ViT size, the image size against its
    patch size, the generation lengths. ConfigError naming the keys and their values."""
    where = f'config file {path} (or its command-line overrides)'
    vit = config.get('vit')
    patch_size = 16
    if vit is not None:
        if isinstance(vit, dict):
            missing = [key for key in VIT_KEYS if key not in vit]
            if missing:
                raise ConfigError(f'{where}: the vit mapping lacks {", ".join(missing)} (keys: width, depth, heads, '
                                  f'patch_size); got {vit!r}')
            patch_size = vit.get('patch_size', 16)
        elif vit not in VIT_SIZES:
            raise ConfigError(f"{where}: vit must be 'base', 'large' or a mapping {{width, depth, heads, "
                              f"patch_size}}; got {vit!r}")
    image_size = config.get('image_size')
    if vit is not None and isinstance(image_size, int) and isinstance(patch_size, int) and patch_size > 0 \
            and image_size % patch_size:
        raise ConfigError(f'{where}: image_size={image_size} is not a multiple of the ViT patch size {patch_size} '
                          f'(the ViT would drop the last {image_size % patch_size} pixel rows and columns)')
    low, high = config.get('min_length'), config.get('max_length')
    if isinstance(low, int) and isinstance(high, int) and low > high:
        raise ConfigError(f'{where}: min_length={low} is larger than max_length={high}')


def check_value(value, key, path, integer, lowest, lowest_allowed=True, highest=None):
    """ConfigError naming key, value and file unless value is a number in the allowed range."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = is_number and math.isfinite(value) and (not integer or isinstance(value, int))
    ok = ok and (value >= lowest if lowest_allowed else value > lowest) and (highest is None or value <= highest)
    if not ok:
        kind = 'an integer' if integer else 'a number'
        bounds = f"{'>=' if lowest_allowed else '>'} {lowest}" + (f' and <= {highest}' if highest is not None else '')
        raise ConfigError(f'config file {path} (or its command-line overrides): {key} must be {kind} '
                                f'{bounds}; got {value!r}')

