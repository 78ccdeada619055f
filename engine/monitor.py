"""The rank monitor: under torchrun, names the rank that stopped (host, pid, what it was doing)
long before the collective it never joins times out."""
import atexit
import json
import os
import socket
import sys
import threading
import time

import torch.distributed as dist

import utils

# A collective that a frozen rank never joins fails only after --dist_timeout, and its error
# ("Timed out waiting 600000ms for recv operation") names no rank. So every process also runs a
# thread that ticks a key of the job's store and watches the others' ticks: the first process
# to notice that one stopped ticking (SIGSTOP, a hung machine, a lost network) names it.
_MONITOR = {"stop": None, "publish": None, "thread": None}


def _monitor_intervals(timeout_seconds):
    """(seconds between ticks, seconds without a tick after which a rank is reported)."""
    interval = min(10.0, max(0.5, timeout_seconds / 60))
    return interval, 6 * interval


def start_rank_monitor(store, rank, world_size, timeout_seconds):
    """Start this process's monitor thread (a daemon; it ends with the process or the store)."""
    interval, stale_after = _monitor_intervals(timeout_seconds)
    board = dist.PrefixStore("blip_rank_monitor", store)
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    stop = threading.Event()
    _MONITOR["stop"] = stop

    def publish(tick, **extra):
        board.set(f"rank{rank}", json.dumps({**me, "tick": tick, "doing": utils.current_progress(), **extra}))
    _MONITOR["publish"] = publish

    def watch():
        seen = {}  # rank -> (its last tick, when this process saw it change)
        reported = set()
        tick = 0
        try:
            while not stop.is_set():
                tick += 1
                publish(tick)
                now = time.monotonic()
                stalled = {}
                for other in range(world_size):
                    key = f"rank{other}"
                    if other == rank or not board.check([key]):
                        continue
                    beat = json.loads(board.get(key))
                    if beat.get("done"):
                        continue
                    if seen.get(other, (None,))[0] != beat["tick"]:
                        seen[other] = (beat["tick"], now)
                    elif now - seen[other][1] > stale_after:
                        stalled[other] = (beat, now - seen[other][1])
                # the lowest rank still ticking speaks, once per stall
                speaker = min(r for r in range(world_size) if r not in stalled)
                for other, (beat, quiet) in stalled.items():
                    if speaker == rank and other not in reported:
                        sys.stderr.write(
                            f"rank {other} (host {beat['host']}, pid {beat['pid']}) has not responded for "
                            f"{quiet:.0f} s; it was {beat['doing']}. It is frozen or stopped, or its machine "
                            f"cannot be reached: the other ranks wait for it at their next collective, and the "
                            f"job fails when --dist_timeout ({timeout_seconds / 60:g} min) has passed\n")
                        sys.stderr.flush()
                reported = set(stalled)
                stop.wait(interval)
        except Exception:  # the store is gone (the job is ending): nothing left to watch
            return

    thread = threading.Thread(target=watch, name="blip-rank-monitor", daemon=True)
    _MONITOR["thread"] = thread
    thread.start()
    atexit.register(stop_rank_monitor)


def stop_rank_monitor():
    """Tell the other ranks this one finished (so its silence is not reported); called at exit."""
    stop = _MONITOR["stop"]
    if stop is not None and not stop.is_set():
        stop.set()
        # joined, not left running: a daemon thread still inside a store call while the
        # interpreter shuts down aborts the process ("terminate called without an active exception")
        _MONITOR["thread"].join(timeout=10)
        try:
            _MONITOR["publish"](-1, done=True)
        except Exception:  # rank 0's store already closed: the job is over anyway
            pass

