"""The scripts' command line: the original's arguments, --resume, KEY=VALUE config overrides,
and --help listing every default and the config keys a script reads."""
import argparse
import json
import os
import sys

from engine import emulate
from engine.checkpoints import LAST_CHECKPOINT
from engine.config import ENGINE_DEFAULTS, ConfigError, check_config, load_config
from utils import DIST_TIMEOUT_MINUTES, default_device


def str2bool(text):
    """argparse type for true/false flags ('true', 'False', '1', 'no', ...)."""
    if isinstance(text, bool):
        return text
    lowered = text.strip().lower()
    if lowered in ("true", "t", "yes", "y", "1"):
        return True
    if lowered in ("false", "f", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help as written (examples keep their lines), each option followed by its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = "%(default)" in text or "(default" in text
        if shown or action.default in (None, "", [], False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def add_common_args(parser, default_config=None, default_output_dir="output"):
    """The original scripts' command line, plus --resume and config-key overrides.

    Overrides come after --opts or as trailing positional words: `lr=1e-5 vit.depth=2`.
    """
    parser.add_argument("--config", default=default_config,
                        help="YAML config file (default: %(default)s)")
    parser.add_argument("--output_dir", default=default_output_dir,
                        help="folder for checkpoints, logs and the config copy")
    parser.add_argument("--evaluate", action="store_true", help="evaluate only, no training")
    parser.add_argument("--device", default=default_device(),
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--seed", default=42, type=int, help="base seed; each rank adds its rank")
    parser.add_argument("--dist_url", default="env://",
                        help="url used to set up distributed training")
    # accepted because the original's command lines may pass them; init_distributed_mode sets
    # both from torchrun's environment, whatever was given
    parser.add_argument("--world_size", default=1, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--distributed", default=True, type=str2bool, help=argparse.SUPPRESS)
    parser.add_argument("--dist_timeout", default=DIST_TIMEOUT_MINUTES, type=float, metavar="MINUTES",
                        help="how long a process waits for the others at a collective before the job "
                             "fails (raise it for long single-rank steps, e.g. merging big outputs); a "
                             "rank that stops is named after a tenth of it, at most a minute")
    parser.add_argument("--resume", "--checkpoint", dest="resume", default="",
                        help="checkpoint to resume training from (pretrain.py's --checkpoint)")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. --opts init_lr=1e-5 vit_grad_ckpt=false")
    parser.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, same as --opts")
    return parser


def parse_command_line(description, default_config, default_output_dir="output",
                       defaults=None, argv=None, add_args=None, epilog=None, optional=()):
    """Parse the command line and load the config it names, overrides applied (no key rules:
    parse_args_and_config adds the engine's).

    add_args: optional function(parser) adding script-specific arguments.
    optional: top-level keys without a default that an override may add (load_config).
    Returns (args, config); args.overrides holds every override given. Writes nothing:
    call save_config(config, args.output_dir) on the main process.
    """
    parser = argparse.ArgumentParser(description=description, epilog=epilog, formatter_class=HelpFormatter)
    add_common_args(parser, default_config, default_output_dir)
    if add_args is not None:
        add_args(parser)
    args = parser.parse_intermixed_args(argv)
    args.overrides = list(args.opts) + list(args.overrides)
    for override in args.overrides:
        if "=" not in override:
            parser.error(f"config override {override!r} must look like key=value")
    if args.config is None:
        parser.error("--config is required")
    try:
        config = load_config(args.config, args.overrides, defaults=defaults, optional=optional)
    except ConfigError as e:
        parser.error(str(e))
    return args, config


def _add_engine_args(parser):
    parser.add_argument('--no_auto_resume', action='store_true',
                        help=f'do not continue from {LAST_CHECKPOINT} in --output_dir')


def parse_args_and_config(description, default_config, default_output_dir, defaults=None,
                          required=(), known=None, argv=None, add_args=None, doc=''):
    """The original's command line plus --resume and config overrides; returns (args, config).

    Arguments (add_common_args): --config, --output_dir, --evaluate, --device, --seed,
    --dist_url, --dist_timeout, --resume (alias --checkpoint), --no_auto_resume, and
    KEY=VALUE / a.b.c=VALUE overrides (trailing words or after --opts).
    defaults: the task's optional config keys with the values that reproduce the original
        (merged with ENGINE_DEFAULTS under the file's values; overrides of them are allowed).
    required: keys the task reads that have no default (a missing one is an error naming it).
    known: when given, every key of the file must be in known, required or the defaults; an
        override may add a key of known that the file lacks.
    add_args(parser): script-specific arguments.
    doc: the script's docstring; its indented command lines end --help as examples.
    """
    all_defaults = {**ENGINE_DEFAULTS, **(defaults or {})}

    def add_all_args(parser):
        _add_engine_args(parser)
        if add_args is not None:
            add_args(parser)

    examples = [line.strip() for line in (doc or '').splitlines() if line.startswith(('    python', '    torchrun'))]
    epilog = '\n\n'.join(part for part in (
        'examples:\n' + '\n'.join(f'  {line}' for line in examples) if examples else '',
        _config_keys_help(required, all_defaults)) if part)
    args, config = parse_command_line(description, default_config, default_output_dir,
                                      defaults=all_defaults, argv=argv, add_args=add_all_args,
                                      epilog=epilog, optional=known or ())
    check_config(config, args.config, required, known, all_defaults)
    # torchrun's WORLD_SIZE (what utils.init_distributed_mode joins): checked before any work
    world_size = int(os.environ.get('WORLD_SIZE', 1)) if 'RANK' in os.environ else 1
    emulate.check_config(config, args.config, world_size)
    return args, config


def _config_keys_help(required, defaults):
    """--help's list of the config keys a script reads: the ones the file must set, and the
    ones with defaults (what KEY=VALUE overrides change when the file does not set them)."""
    def wrapped(words):
        lines, line = [], ' '
        for word in words:
            if len(line) + len(word) > 88:
                lines.append(line)
                line = ' '
            line += f' {word}'
        return '\n'.join(lines + [line])
    parts = []
    if required:
        parts.append('config keys the file must set:\n' + wrapped(sorted(required)))
    if defaults:
        parts.append('config keys with defaults (when the file does not set them; KEY=VALUE overrides):\n'
                     + wrapped(f'{key}={json.dumps(value)}' for key, value in sorted(defaults.items())))
    return '\n\n'.join(parts)


def main(run):
    """A script's entry point: run(), with every documented failure ending as one message on
    stderr (what is wrong, naming the file, key or value) and a non-zero exit status instead of
    a traceback: 2 for bad input (config, data, checkpoint, a missing file), 1 for a failure while
    running (an output that cannot be written, a non-finite loss). BLIP_DEBUG=1 shows the
    traceback as well."""
    from data.user_inputs import InputError
    from data.utils import DataError
    from engine.fileio import CheckpointError
    from engine.loop import NonFiniteLossError
    from engine.outlock import OutputInUseError

    bad_input = (ConfigError, DataError, InputError, CheckpointError, FileNotFoundError, OutputInUseError)
    try:
        return run()
    except bad_input + (NonFiniteLossError, OSError) as error:  # OSError: engine.fileio.WriteError too
        if os.environ.get('BLIP_DEBUG'):
            raise
        print(f'{os.path.basename(sys.argv[0])}: error: {error}', file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(error, bad_input) else 1)
