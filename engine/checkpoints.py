"""Training checkpoints: checkpoint_best.pth in the original's format, checkpoint_last.pth with
everything a resumed run needs (RNG states of every rank included), and resuming from them."""
import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch.distributed as dist

import utils
from engine import rng
from engine.fileio import CheckpointError, atomic_write, load_checkpoint_file, save_checkpoint, save_safetensors

LAST_CHECKPOINT = 'checkpoint_last.pth'
EVALUATED = 'checkpoint_last_evaluated.pth'  # small: what the evaluation after checkpoint_last changed
PREVIOUS_CHECKPOINT = 'checkpoint_last_previous.pth'  # the checkpoint_last.pth before, while keep_previous_last
BEST_CHECKPOINT = 'checkpoint_best.pth'


@dataclass
class TrainState:
    """Counters that survive a restart (stored in checkpoint_last.pth)."""
    start_epoch: int = 0     # the next epoch to run
    global_step: int = 0     # optimizer steps taken so far
    best: float = 0.0        # best validation metric so far (what the task compares)
    best_epoch: int = 0
    extra: dict = field(default_factory=dict)  # task values to keep (plain types), e.g. test metrics at the best epoch
    # resumed between the training of epoch start_epoch and the end of its evaluation: the
    # training stats it logs (the script evaluates that epoch without training it again)
    train_stats: Optional[dict] = None


def resumed_train_stats(state, epoch):
    """The training stats of `epoch` when this run resumed after training it but before its
    evaluation finished (then only its evaluation runs), else None (train it)."""
    return state.train_stats if epoch == state.start_epoch else None


def _gather_rng_states(streams=None):
    """Every rank's RNG states, in rank order (a collective under DDP): each process adds the
    ranks it plays (streams: engine.rng.RankStreams; None: the process's own streams)."""
    own = streams.states() if streams is not None else [rng.capture()]
    if not utils.is_dist_avail_and_initialized():
        return own
    states = [None] * utils.get_world_size()
    dist.all_gather_object(states, own)
    return [state for process in states for state in process]


def _restore_rng_states(states, streams, path):
    """Restore this process's ranks' streams from a checkpoint's list (one per rank)."""
    played = len(streams.ranks) if streams is not None else 1
    if len(states) != utils.get_world_size() * played:
        print(f'resume: {path} holds the RNG states of {len(states)} rank(s), this run has '
              f'{utils.get_world_size() * played}: RNG states not restored (seeds from --seed)')
        return
    first = utils.get_rank() * played
    if streams is None:
        rng.restore(states[first])
    else:
        streams.load(states[first:first + played])


def save_model(path, model_without_ddp, optimizer, config, epoch):
    """The original's checkpoint ({'model', 'optimizer', 'config', 'epoch'}), atomically, main only."""
    if utils.is_main_process():
        save_checkpoint({
            'model': model_without_ddp.state_dict(),
            'optimizer': optimizer.state_dict(),
            'config': config,
            'epoch': epoch,
        }, path)


def save_last_checkpoint(output_dir, model_without_ddp, optimizer, scaler, config, epoch, state,
                         train_stats=None, streams=None):
    """Write checkpoint_last.pth for a finished epoch. Call on every rank (gathers RNG states).

    Holds model (queues are buffers, so they are in it), optimizer, scaler, epoch, global
    step, best metric and epoch, every rank's RNG states (python, numpy, torch, cuda) and
    the config. `model` / `epoch` keep the original layout, so it also loads as `pretrained`.
    train_stats: given when written between training and evaluation (so a failing evaluation
    never costs the epoch): a resumed run then evaluates that epoch first (resumed_train_stats),
    unless mark_evaluated recorded that its evaluation finished.
    """
    rng_states = _gather_rng_states(streams)
    if utils.is_main_process():
        save_checkpoint({
            'model': model_without_ddp.state_dict(),
            'optimizer': optimizer.state_dict(),
            'scaler': scaler.state_dict() if scaler is not None else None,
            'config': config,
            'epoch': epoch,
            'global_step': state.global_step,
            'best': state.best,
            'best_epoch': state.best_epoch,
            'extra': state.extra,
            'rng_states': rng_states,
            **({'evaluated': False, 'train_stats': train_stats} if train_stats is not None else {}),
        }, os.path.join(output_dir, LAST_CHECKPOINT),
            keep_previous=os.path.join(output_dir, PREVIOUS_CHECKPOINT) if config.get('keep_previous_last', True)
            else None)
    utils.barrier()


def mark_evaluated(output_dir, epoch, state, streams=None):
    """After the evaluation of an epoch whose checkpoint_last.pth was written before it: save what
    the evaluation changed (best metric and epoch, extra, every rank's RNG states) in a small
    file beside it, so a resumed run continues at the next epoch without evaluating again.
    Call on every rank."""
    rng_states = _gather_rng_states(streams)
    if utils.is_main_process():
        save_checkpoint({'epoch': epoch, 'global_step': state.global_step, 'best': state.best,
                               'best_epoch': state.best_epoch, 'extra': state.extra, 'rng_states': rng_states},
                              os.path.join(output_dir, EVALUATED))
    utils.barrier()


def _evaluated_state(path, checkpoint):
    """The evaluation state saved by mark_evaluated for this very checkpoint, or None."""
    evaluated = os.path.join(os.path.dirname(path), EVALUATED)
    if not os.path.isfile(evaluated):
        return None
    try:
        saved = load_checkpoint_file(evaluated)
    except CheckpointError:
        return None  # cut by a kill: the evaluation is redone
    same = saved.get('epoch') == checkpoint['epoch'] and saved.get('global_step') == checkpoint.get('global_step')
    return saved if same else None


def find_resume_checkpoint(args):
    """--resume, else the output folder's checkpoint_last.pth when present (training only)."""
    if args.resume:
        return args.resume
    if args.evaluate or getattr(args, 'no_auto_resume', False):
        return ''
    for name in (LAST_CHECKPOINT, PREVIOUS_CHECKPOINT):  # the previous alone: killed between two renames
        path = os.path.join(args.output_dir, name)
        if os.path.isfile(path):
            return path
    return ''


def _load_auto_resumed(path, output_dir):
    """checkpoint_last.pth, or, when it is damaged, the previous one kept beside it (the
    damaged file is renamed *.damaged, so the next save keeps the good one); (path, checkpoint)."""
    try:
        return path, load_checkpoint_file(path)
    except (CheckpointError, FileNotFoundError) as error:
        previous = os.path.join(output_dir, PREVIOUS_CHECKPOINT)
        fallback = None
        if os.path.abspath(path) != os.path.abspath(previous) and os.path.isfile(previous):
            try:
                fallback = load_checkpoint_file(previous)
            except CheckpointError:
                pass
        if fallback is None:
            raise CheckpointError(
                f"cannot resume from the output folder's last checkpoint: {error}. To start this run afresh "
                f"in the same folder, pass --no_auto_resume (the file is then overwritten at the end of the "
                f"first epoch)") from error
        utils.barrier()  # every rank has read the folder before the main one renames
        if utils.is_main_process() and os.path.isfile(path):
            os.replace(path, path + '.damaged')
        print(f"WARNING: {error}. Resuming from {previous} instead (epoch {fallback.get('epoch')}, the "
              f"checkpoint before it); the damaged file is kept as {path}.damaged", flush=True)
        return previous, fallback


def resume(args, model_without_ddp, optimizer=None, scaler=None, streams=None):
    """Continue from --resume or the output folder's last checkpoint; returns a TrainState.

    Call after building model and optimizer, right before the epoch loop (the RNG states
    are restored last, so the next epoch draws what the uninterrupted run would have).
    With --evaluate only the model weights are loaded.
    """
    path = find_resume_checkpoint(args)
    if not path:
        return TrainState()
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--resume: checkpoint {path!r} does not exist')
    if args.resume:
        checkpoint = load_checkpoint_file(path)
    else:
        path, checkpoint = _load_auto_resumed(path, args.output_dir)
    if not isinstance(checkpoint, dict) or 'model' not in checkpoint:
        raise ValueError(f"--resume: {path} is not a training checkpoint (no 'model' entry); "
                         f"to start from its weights, set pretrained={path}")
    model_without_ddp.load_state_dict(checkpoint['model'])
    if args.evaluate:
        print(f'loaded model weights from {path} (epoch {checkpoint["epoch"]})')
        return TrainState()
    missing = [k for k in ('optimizer', 'epoch') if k not in checkpoint]
    if missing:
        raise ValueError(f'--resume: {path} has no {", ".join(missing)}: it is not a training '
                         f'checkpoint; to start from its weights, set pretrained={path}')
    if optimizer is not None:
        optimizer.load_state_dict(checkpoint['optimizer'])
    if scaler is not None and checkpoint.get('scaler'):
        scaler.load_state_dict(checkpoint['scaler'])
    # The original's per-epoch checkpoints (pretrain.py's --checkpoint) hold only model,
    # optimizer, config and epoch: they resume too, with RNG streams from --seed.
    rng_states = checkpoint.get('rng_states')
    if rng_states is None:
        print(f'resume: {path} holds no RNG states (an original-format checkpoint): RNG streams '
              f'continue from --seed, not from where the run stopped')
    else:
        _restore_rng_states(rng_states, streams, path)
    state = TrainState(start_epoch=checkpoint['epoch'] + 1, global_step=checkpoint.get('global_step', 0),
                       best=checkpoint.get('best', 0.0), best_epoch=checkpoint.get('best_epoch', 0),
                       extra=checkpoint.get('extra') or {})
    pending = checkpoint.get('evaluated') is False  # saved between training and evaluation
    evaluated = _evaluated_state(path, checkpoint) if pending else None
    if evaluated is not None:  # its evaluation finished too
        state.best, state.best_epoch, state.extra = evaluated['best'], evaluated['best_epoch'], evaluated['extra']
        _restore_rng_states(evaluated['rng_states'], streams, os.path.join(os.path.dirname(path), EVALUATED))
    if pending and evaluated is None:
        state.start_epoch, state.train_stats = checkpoint['epoch'], checkpoint['train_stats']
        print(f'resumed from {path}: epoch {checkpoint["epoch"]} trained, {state.global_step} optimizer steps; '
              f'evaluating epoch {checkpoint["epoch"]} (its evaluation had not finished), then continuing at '
              f'epoch {checkpoint["epoch"] + 1}')
    else:
        print(f'resumed from {path}: epoch {checkpoint["epoch"]} done, {state.global_step} optimizer '
              f'steps; continuing at epoch {state.start_epoch}')
    if utils.is_main_process():
        drop_log_lines_from(args.output_dir, state.start_epoch)
    return state


def drop_log_lines_from(output_dir, epoch, filename='log.txt'):
    """Keep log.txt in step with the checkpoint a run resumes from: a run killed after logging
    an epoch but before its checkpoint_last.pth was written redoes that epoch, so its line (and
    any later one) goes; the redone epoch writes it again."""
    path = os.path.join(output_dir, filename)
    if not os.path.isfile(path):
        return
    with open(path, encoding='utf-8') as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            line_epoch = json.loads(line).get('epoch')
        except (ValueError, AttributeError):
            continue  # a line cut by the kill
        if not isinstance(line_epoch, int) or line_epoch < epoch:
            kept.append(line if line.endswith('\n') else line + '\n')
    if kept != lines:
        with atomic_write(path, 'w', encoding='utf-8') as f:
            f.writelines(kept)
        print(f'{path}: {len(lines) - len(kept)} line(s) of epoch {epoch} or later removed (they are redone)')


def update_best(state, score, epoch, output_dir, model_without_ddp, optimizer, config, save=True):
    """The original's checkpoint_best.pth rule: when `score` beats every earlier epoch's
    (strictly, so the first of equal epochs stays), record it in `state` and, with `save`,
    write the checkpoint. Returns whether it improved."""
    if not score > state.best:
        return False
    state.best, state.best_epoch = score, epoch
    if save:
        save_model(os.path.join(output_dir, BEST_CHECKPOINT), model_without_ddp, optimizer, config, epoch)
        if config.get('save_safetensors') and utils.is_main_process():
            # the weights alone, safe to share and load anywhere a .pth goes (pretrained:, predict.py)
            save_safetensors(model_without_ddp.state_dict(),
                                   os.path.join(output_dir, BEST_CHECKPOINT.replace('.pth', '.safetensors')))
    return True

