"""train_retrieval.py as the user runs it, saving every evaluation's score matrices.

For tests/test_retrieval_ddp.py: run like train_retrieval.py (one process or under
torchrun) with SCORE_DUMP_DIR set; the main process writes SCORE_DUMP_DIR/scores_<n>.npz
(arrays i2t, t2i) for the n-th call of ranking.evaluation (val, then test, per epoch).
"""
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ranking  # noqa: E402
import train_retrieval  # noqa: E402
import utils  # noqa: E402

_evaluation = ranking.evaluation
_calls = []


def evaluation_with_dump(model, data_loader, device, config):
    score_i2t, score_t2i = _evaluation(model, data_loader, device, config)
    if utils.is_main_process():
        path = Path(os.environ['SCORE_DUMP_DIR']) / f'scores_{len(_calls)}.npz'
        np.savez(path, i2t=score_i2t, t2i=score_t2i)
    _calls.append(1)
    return score_i2t, score_t2i


if __name__ == '__main__':
    os.makedirs(os.environ['SCORE_DUMP_DIR'], exist_ok=True)
    ranking.evaluation = evaluation_with_dump  # evaluate_split looks it up at call time
    train_retrieval.run()
