"""Random number streams: a process's state in plain types (for checkpoints), and the streams of
the ranks a process plays (one under torchrun, N with `emulate_world_size`).

A rank's streams are Python's `random`, NumPy's global generator, torch's CPU generator and
the CUDA generators. Training seeds them `seed + rank` once the model is built (RankStreams),
so what a rank draws while training does not depend on how many numbers building the model
took; that is what lets one process replay the streams of N ranks.
"""
import contextlib
import random

import numpy as np
import torch

import utils


def capture():
    """This process's RNG states in plain types (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': (kind, keys.tolist(), pos, has_gauss, cached),
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore(state):
    random.setstate(state['python'])
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


class RankStreams:
    """The RNG streams of the ranks this process plays, each seeded `seed + rank`.

    The first rank's streams are the process's own: they are live outside `use`. `use(rank)`
    swaps a rank's streams in for a block and keeps where they stopped. `replay(state)` runs a
    block from an earlier state of a stream and then forgets what it drew (the second pass of
    an emulated step re-runs the encoders with the dropout masks of the first).
    """

    def __init__(self, seed, ranks):
        self.ranks = list(ranks)
        self._saved = {}
        for rank in reversed(self.ranks):  # ends with the first rank's streams live
            utils.set_seed(seed + rank)
            self._saved[rank] = capture()
        self._live = self.ranks[0]

    @property
    def emulated(self):
        return len(self.ranks) > 1

    @contextlib.contextmanager
    def use(self, rank):
        if rank == self._live:
            yield
            return
        previous = self._live
        self._saved[previous] = capture()
        restore(self._saved[rank])
        self._live = rank
        try:
            yield
        finally:
            self._saved[rank] = capture()
            restore(self._saved[previous])
            self._live = previous

    @staticmethod
    @contextlib.contextmanager
    def replay(state):
        now = capture()
        restore(state)
        try:
            yield
        finally:
            restore(now)

    def states(self):
        """Every played rank's current state, in rank order."""
        return [capture() if rank == self._live else self._saved[rank] for rank in self.ranks]

    def load(self, states):
        """Continue from `states` (one per played rank, as states() returns them)."""
        if len(states) != len(self.ranks):
            raise ValueError(f'{len(states)} RNG states for {len(self.ranks)} ranks')
        for rank, state in zip(self.ranks, states):
            if rank == self._live:
                restore(state)
            else:
                self._saved[rank] = state
