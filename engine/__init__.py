"""The training machinery the task scripts share, one job per module (import the one you need):

    config.py       config files: YAML, KEY=VALUE overrides, the engine's keys and every value rule
    cli.py          the scripts' command line (the original's flags, --resume, overrides, --help)
    preflight.py    checks that fail before any work (paths, URLs, images, toy data generation)
    training.py     set-up (process group, device, seeds), the model in DDP, the optimizer, the Run
                    whose epochs() does each epoch's checkpoint bookkeeping
    loop.py         one training epoch (accumulation, clipping, a stop on a NaN loss)
    precision.py    the one autocast and the GradScaler
    checkpoints.py  checkpoint_best / checkpoint_last, RNG states, resuming
    fileio.py       one atomic write, checkpoint files checked and loaded, the download cache
    logs.py         log.txt / evaluate.txt lines and elapsed times
    monitor.py      under torchrun, names the rank that stopped

Nothing is imported here, so models/ and data/ can use fileio.py without loading the rest.
"""
