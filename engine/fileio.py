"""Files that must never be left half-written or read as something else: one atomic write,
checkpoint files checked and loaded, the checkpoint download cache."""
import contextlib
import errno
import hashlib
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import torch


def is_url(value):
    """Whether `value` names an http(s) URL (checkpoints and images may be URLs)."""
    return urlparse(str(value)).scheme in ("http", "https")


class WriteError(OSError):
    """A file could not be written (disk full, permissions); the previous version is intact."""


# torch.save's zip writer reports a failed write (ENOSPC included) as a RuntimeError like
# "[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"
_TORCH_WRITE_FAILURE = ("unexpected pos", "inline_container", "PytorchStreamWriter")
_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _is_write_failure(error):
    """Whether `error` came from the file system (full disk, permissions, torch's zip writer),
    not from what produced the bytes (a network read inside the block stays as it is)."""
    if isinstance(error, RuntimeError):
        return any(s in str(error) for s in _TORCH_WRITE_FAILURE)
    return isinstance(error, OSError) and error.errno is not None and not isinstance(error, ConnectionError)


def _write_failure(path, error):
    """WriteError naming the file and, when it is that, the full disk."""
    free = None
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        pass
    full = getattr(error, "errno", None) in _NO_SPACE or (free is not None and free < 2 ** 20)
    reason = (f"no space left on the device ({free / 2 ** 20:.1f} MB free in {path.parent})"
              if full and free is not None else "no space left on the device" if full else str(error))
    previous = "the previous file is unchanged" if path.exists() else "nothing was written"
    return WriteError(f"could not write {path}: {reason}; {previous}")


@contextlib.contextmanager
def atomic_write(path, mode="wb", keep_previous=None, encoding=None):
    """Open a temporary file beside `path` for writing; when the block ends without an error it
    is flushed, fsynced and renamed over `path`, so readers see the old file or the whole new
    one, never a part. On an error (or Ctrl-C) the temporary file is removed and the old file
    is left as it was; a failed write (full disk, permissions) is a WriteError naming the file.
    keep_previous: a path the old file is renamed to once the new one is completely written
    (one good earlier version survives a damaged file). Yields the open file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp_path, path)
    except BaseException as error:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        if _is_write_failure(error):
            raise _write_failure(path, error) from error
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder):
    # Makes the rename itself durable; not every platform lets a folder be opened.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(obj, path, keep_previous=None):
    """torch.save `obj` to `path` atomically.

    The bytes go to a temporary file in the same folder, are flushed and fsynced, then
    os.replace()d over `path`: a crash or a failing save leaves the old file intact and no
    temporary file behind. keep_previous: a path the old file is renamed to first, once the
    new one is completely written (so one good earlier version survives a damaged file).
    """
    with atomic_write(path, keep_previous=keep_previous) as f:
        torch.save(obj, f)
    return str(path)


def save_safetensors(state_dict, path):
    """A state dict of tensors to a .safetensors file, atomically (as save_checkpoint). Tensors
    that share memory (tied weights) are written as separate copies."""
    from safetensors.torch import save
    data = save({key: value.detach().cpu().clone().contiguous() for key, value in state_dict.items()})
    with atomic_write(path) as f:
        f.write(data)
    return str(path)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message names the file and says why."""


def unsafe_load_allowed(allow_unsafe=None):
    """Whether a checkpoint needing full unpickling may be loaded: `allow_unsafe`, else the
    environment variable BLIP_UNSAFE_LOAD=1."""
    if allow_unsafe is not None:
        return bool(allow_unsafe)
    return os.environ.get('BLIP_UNSAFE_LOAD', '').lower() in ('1', 'true', 'yes')


def _safetensors_header(path, head):
    """The JSON header of a .safetensors file (8-byte little-endian length, then JSON), or None."""
    length = int.from_bytes(head[:8], 'little') if len(head) >= 9 else 0
    if head[8:9] != b'{' or not 0 < length < 100_000_000:
        return None
    with open(path, 'rb') as f:
        f.seek(8)
        text = f.read(length)
    try:
        return length, json.loads(text)
    except ValueError:
        return length, None  # cut inside its header


def check_checkpoint_file(path, source=None):
    """CheckpointError unless `path` looks like a whole checkpoint: a torch.save zip archive with
    its directory (torch >= 1.6), a legacy pickle, or a .safetensors file with all its tensor
    bytes. `source` (e.g. the URL it came from) is named in the message instead of the path.
    Returns the kind: 'safetensors' or 'torch'."""
    with open(path, 'rb') as f:
        head = f.read(64)
    size = os.path.getsize(path)
    name = source or path
    safetensors = _safetensors_header(path, head)
    if safetensors is not None:
        length, header = safetensors
        ends = [entry['data_offsets'][1] for key, entry in (header or {}).items() if key != '__metadata__']
        if header is None or size < 8 + length + max(ends, default=0):
            raise CheckpointError(f"{name} is a truncated .safetensors file ({size} bytes): an interrupted copy "
                                  f"or download?")
        return 'safetensors'
    if not head.startswith((b'PK\x03\x04', b'\x80')):
        if not head:
            kind = 'an empty file'
        elif head.lstrip()[:15].lower().startswith((b'<!doctype', b'<html', b'<?xml')):
            kind = 'an HTML/XML page (a server error or login page?)'
        else:
            kind = f'a file starting with {head[:24]!r}'
        raise CheckpointError(f"{name} is not a PyTorch checkpoint: it is {kind} ({size} bytes)")
    if head.startswith(b'PK') and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{name} is truncated or corrupt ({size} bytes, its zip directory is missing): "
                              f"an interrupted copy or download?")
    return 'torch'


def load_checkpoint_file(path, allow_unsafe=None, mmap=False):
    """torch.load a checkpoint onto the CPU with `weights_only=True`, or CheckpointError saying
    what is wrong with the file: not a checkpoint (an HTML error page, text, an empty file),
    truncated (an interrupted copy or download), or holding Python objects whose unpickling
    would run code from the file (then loaded only with the opt-in of `unsafe_load_allowed`).

    mmap: map the file instead of reading it (torch's zip format), so only the tensors the
    caller touches are read: a model's weights out of a training checkpoint that also holds the
    momentum encoders and the optimizer state. For callers that copy what they keep (the file
    stays mapped while a tensor of it is alive)."""
    kind = check_checkpoint_file(path)
    size = os.path.getsize(path)
    if kind == 'safetensors':  # tensors only: safe by construction
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device='cpu')
        except SafetensorError as error:
            raise CheckpointError(f"{path} is not a valid .safetensors file ({size} bytes): {error}") from error
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        if not unsafe_load_allowed(allow_unsafe):
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            reason = next((line for line in lines if 'WeightsUnpickler error' in line),
                          lines[0] if lines else type(error).__name__).split('. Please use')[0]
            raise CheckpointError(
                f"checkpoint {path} holds Python objects that torch.load(weights_only=True) refuses to "
                f"unpickle ({reason}). Loading it runs arbitrary code from the file. If you trust it, opt in "
                f"with the environment variable BLIP_UNSAFE_LOAD=1 or load_checkpoint(..., allow_unsafe=True)."
            ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path} is truncated or corrupt ({size} bytes): {first}") from error
    return torch.load(path, map_location='cpu', weights_only=False)


def remove_stale_temporaries(output_dir):
    """Delete the temporary files an atomic save leaves when its process is killed mid-write
    (`.NAME.XXXX.tmp` beside NAME); the files they were to replace are intact."""
    for name in sorted(os.listdir(output_dir)):
        if name.startswith('.') and name.endswith('.tmp') and os.path.isfile(os.path.join(output_dir, name)):
            os.remove(os.path.join(output_dir, name))
            print(f'removed {os.path.join(output_dir, name)}, left by a save that was killed mid-write')


def checkpoint_cache_dir():
    """$BLIP_CACHE, else torch hub's checkpoint folder (~/.cache/torch/hub/checkpoints)."""
    return os.environ.get('BLIP_CACHE') or os.path.join(torch.hub.get_dir(), 'checkpoints')


def cached_checkpoint_path(url, cache_dir=None):
    """Where download_cached_file keeps `url`: its file name plus a hash of the whole URL, so two
    URLs that end in the same name (two runs' checkpoint_best.pth) never share a cached file."""
    name = os.path.basename(urlparse(url).path) or 'checkpoint.pth'
    stem, suffix = os.path.splitext(name)
    digest = hashlib.sha256(url.encode('utf-8')).hexdigest()[:12]
    return os.path.join(cache_dir or checkpoint_cache_dir(), f'{stem}-{digest}{suffix}')


def download_cached_file(url, cache_dir=None, progress=True, verify=True):
    """Download `url` once into the cache folder; later calls return the cached path without
    touching the network. With `verify`, what arrived must be a whole PyTorch checkpoint (not an
    HTML error page, not cut short) before it is cached; otherwise CheckpointError, and nothing
    is kept."""
    cached = cached_checkpoint_path(url, cache_dir)
    if not os.path.isfile(cached):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        print(f'downloading {url} to {cached}')
        partial = f'{cached}.{os.getpid()}.download'
        try:
            torch.hub.download_url_to_file(url, partial, progress=progress)
            if verify:
                check_checkpoint_file(partial, source=f'{url} (downloaded)')
            os.replace(partial, cached)  # only a verified, complete file gets the cached name
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return cached
