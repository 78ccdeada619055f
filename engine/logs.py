"""What a run writes about itself: log.txt / evaluate.txt JSON lines and elapsed times."""
import datetime
import json
import os
import time

import utils


def split_stats(**splits):
    """Every split's stats in one flat dict, each key prefixed by its split's name, in the
    order given: split_stats(train={'loss': ...}, val={'acc': ...}) ->
    {'train_loss': ..., 'val_acc': ...} (the original's log.txt keys)."""
    return {f'{split}_{key}': value for split, stats in splits.items() for key, value in stats.items()}


def print_elapsed(start_time, what='Training time'):
    """The original's closing line: `what` and the time since start_time as H:MM:SS."""
    print(f'{what} {datetime.timedelta(seconds=int(time.time() - start_time))}')


def log_json(output_dir, stats, filename='log.txt'):
    """Append one JSON line to output_dir/filename (main process only), as the original."""
    if utils.is_main_process():
        with open(os.path.join(output_dir, filename), 'a') as f:
            f.write(json.dumps(stats) + '\n')
