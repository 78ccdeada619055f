"""Worker for tests/test_distributed.py's rank-monitor tests, two processes started by the test.

    python tests/dist_worker_stall.py MODE DIST_TIMEOUT_MINUTES

MODE freeze: rank 1 says what it is doing, then stops itself (SIGSTOP); rank 0 waits for it at
a barrier, which fails after the timeout. MODE finish: rank 1 leaves at once, rank 0 works on
alone for a while (as after the last collective) and ends normally.
"""
import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import utils  # noqa: E402
from engine.monitor import _monitor_intervals, start_rank_monitor  # noqa: E402


def main(mode, minutes):
    args = SimpleNamespace(device='cpu', dist_url='env://', dist_timeout=minutes)
    store = utils.init_distributed_mode(args)
    start_rank_monitor(store, args.rank, args.world_size, minutes * 60)
    interval, stale_after = _monitor_intervals(minutes * 60)
    if mode == 'freeze':
        if args.rank == 1:
            utils.report_progress('at Train Epoch: [0] 3/10')
            time.sleep(3 * interval)  # its monitor publishes that
            os.kill(os.getpid(), signal.SIGSTOP)
        utils.barrier()
    elif args.rank == 0:
        time.sleep(stale_after + 4 * interval)
    print(f'rank {args.rank} done', force=True)


if __name__ == '__main__':
    main(sys.argv[1], float(sys.argv[2]))
