"""One run per output folder: a lock file taken before anything is written there.

Two runs in one --output_dir (a second terminal, a resubmitted job) would interleave log.txt
and leave config.yaml and the checkpoints from different runs. The first run writes
OUTPUT_DIR/.run.lock (host, pid, start time) and refreshes its time from a thread; a second
run stops at once naming the holder. A lock whose holder is gone is taken over with a note:
same host and the pid no longer exists (a killed run restarted), or not refreshed for
STALE_AFTER_S (a job whose node died, restarted elsewhere). Under torchrun the main process
holds it for every rank. The lock goes when the run ends (training.launch), or at exit.
"""
import atexit
import json
import os
import socket
import threading
import time

LOCK_NAME = '.run.lock'
REFRESH_EVERY_S = 10
STALE_AFTER_S = 120

_held = {}  # lock path -> the refresh thread's stop event, for the locks this process holds


class OutputInUseError(RuntimeError):
    """Another run is writing to the output folder."""


def _path(output_dir):
    return os.path.abspath(os.path.join(output_dir, LOCK_NAME))


def acquire(output_dir):
    """Take OUTPUT_DIR's lock for this process, or OutputInUseError naming the holder."""
    path = _path(output_dir)
    if path in _held:  # this process runs there already
        return
    me = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.strftime('%Y-%m-%d %H:%M:%S')}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder, age = _read(path)
            if age is None:  # removed meanwhile: try again
                continue
            in_use = not _gone(holder, age) if holder is not None else age <= STALE_AFTER_S
            if in_use:
                holder = holder or {}
                raise OutputInUseError(
                    f"output folder {output_dir} is in use by another run (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, started {holder.get('started')}): wait for it to finish or use "
                    f"another --output_dir (if there is no such run, delete {path})") from None
            if holder is not None:
                print(f"{output_dir}: the run that held it (pid {holder.get('pid')} on {holder.get('host')}) "
                      f"is gone; taking over its lock", flush=True)
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            json.dump(me, f)
        stop = threading.Event()
        threading.Thread(target=_refresh, args=(path, stop), daemon=True, name='output-lock').start()
        _held[path] = stop
        return
    raise OutputInUseError(f'output folder {output_dir}: could not take its lock {path}')


def release(output_dir):
    """Give the lock back (nothing when this process does not hold it)."""
    stop = _held.pop(_path(output_dir), None)
    if stop is not None:
        stop.set()
        try:
            os.remove(_path(output_dir))
        except OSError:
            pass


@atexit.register
def _release_all():
    for path in list(_held):
        release(os.path.dirname(path))


def _read(path):
    """(the lock's content, seconds since it was last refreshed), or (None, None) if unreadable
    (being written, or removed meanwhile: taken over only once stale)."""
    try:
        with open(path, encoding='utf-8') as f:
            content = json.load(f)
        return (content if isinstance(content, dict) else None), time.time() - os.path.getmtime(path)
    except (OSError, ValueError):
        try:
            return None, time.time() - os.path.getmtime(path)
        except OSError:
            return None, None


def _gone(holder, age):
    same_host = holder.get('host') == socket.gethostname()
    pid = holder.get('pid')
    if same_host and isinstance(pid, int) and (pid == os.getpid() or not _alive(pid)):
        return True
    return age is not None and age > STALE_AFTER_S


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _refresh(path, stop):
    while not stop.wait(REFRESH_EVERY_S):
        try:
            os.utime(path)
        except OSError:
            return
