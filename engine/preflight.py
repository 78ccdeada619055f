"""Checks that fail before any work: data folders, checkpoint files and URLs, every image of the
splits, and the toy configs' synthetic data (generated on first use, under a file lock)."""
import json
import os
import urllib.error
import urllib.request

from engine.fileio import cached_checkpoint_path, is_url


def check_images(datasets, config):
    """Every image of the datasets exists and opens, before any work (`check_images` mode), so
    an epoch is never lost to a missing val/test image. Every rank checks (each then fails alike,
    none waits at a collective for one that failed)."""
    from data.utils import check_image_files
    files = [item for dataset in datasets if hasattr(dataset, 'image_files') for item in dataset.image_files()]
    check_image_files(files, config.get('check_images', 'exists'))


def check_url(url, what, timeout=20):
    """Fail early for a checkpoint URL that is not cached and cannot be fetched.

    A HEAD request: 404/410 or an unreachable host is an error naming the URL; other answers
    (some servers refuse HEAD) are left to the downloader.
    """
    if os.path.isfile(cached_checkpoint_path(url)):
        return
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method='HEAD'), timeout=timeout):
            pass
    except urllib.error.HTTPError as error:
        if error.code in (404, 410):
            raise FileNotFoundError(f'{what}: checkpoint URL {url} does not exist '
                                    f'(HTTP {error.code})') from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, 'reason', error)
        raise FileNotFoundError(f'{what}: checkpoint URL {url} cannot be reached ({reason}); '
                                f'download it by hand and set the key to the file') from None


def prepare_synthetic_data(config):
    """Generate the synthetic shapes dataset a toy config names, the first time it is used.

    config['synthetic'] = {root, seed, num_images, ...} (keyword arguments of
    data.synthetic.make_synthetic). Runs before any process group exists, so concurrent
    torchrun processes serialise on a lock file; the finished marker (root/synthetic.json,
    written last) tells the others it is done. A dataset written by an older version of
    data/synthetic.py is written again. A no-op for real-data configs.
    """
    spec = config.get('synthetic')
    if not spec:
        return
    spec = dict(spec)
    root = spec.pop('root')
    from data import synthetic

    def finished():
        try:
            with open(os.path.join(root, 'synthetic.json'), encoding='utf-8') as f:
                return json.load(f).get('version') == synthetic.DATA_VERSION
        except (OSError, ValueError):
            return False

    if finished():
        return
    import fcntl

    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    with open(os.path.abspath(root) + '.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not finished():
            print(f'generating the synthetic dataset in {root} (version {synthetic.DATA_VERSION})',
                  flush=True)
            marker = os.path.join(root, 'synthetic.json')
            if os.path.exists(marker):
                os.remove(marker)  # an interrupted regeneration must not look finished
            synthetic.make_synthetic(root, **spec)


def check_paths(config, config_path, dirs=(), files=()):
    """Fail before any work for a data folder or checkpoint that does not exist.

    dirs: keys naming folders (image_root, ...); files: keys naming checkpoint files or URLs
    (pretrained, ...). Empty values are skipped. A toy config's synthetic dataset is
    generated first (prepare_synthetic_data).
    """
    prepare_synthetic_data(config)
    for key in dirs:
        path = config.get(key)
        if path and not os.path.isdir(path):
            raise FileNotFoundError(f'{config_path}: {key}: data folder {path!r} does not exist')
    for key in files:
        path = config.get(key)
        if not path:
            continue
        if is_url(path):
            check_url(path, f'{config_path}: {key}')
        elif not os.path.isfile(path):
            raise FileNotFoundError(f'{config_path}: {key}: checkpoint {path!r} does not exist')

