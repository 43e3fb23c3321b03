"""What every command-line entry point shares: readable errors, quiet logs, ``--verbose``.

``run_main(main)`` runs ``main`` under absl's ``app.run``. A problem with the user's input (a
``UserError``, ``ValueError``, ``OSError`` such as ``FileNotFoundError`` / ``FileExistsError`` or a
failed write, a bad flag) ends the program with ONE line on stderr, ``error: <message>``, and exit
code 2; genuine bugs (any other exception) keep their traceback. ``--verbose`` shows the traceback
for every error and lets third-party INFO logs through; by default the absl / Python logs of
orbax, TensorFlow, TFDS, clu, JAX and Flax below WARNING are dropped (and TensorFlow's C++ logs
below WARNING via ``TF_CPP_MIN_LOG_LEVEL=2``, set when this module is imported, before TF is).

Import this module before anything that imports TensorFlow (``from codi_jax import cli, ...``
does: ``cli`` sorts first).
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags
from absl import logging as absl_logging

from codi_jax import xla_flags

VERBOSE_SPELLINGS = ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1", "-verbose")
if not any(arg in VERBOSE_SPELLINGS for arg in sys.argv[1:]):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FLAGS = flags.FLAGS
flags.DEFINE_bool("verbose", False, "Show tracebacks for every error and third-party INFO logs.")

THIRD_PARTY = ("orbax", "tensorflow", "tensorflow_datasets", "clu", "jax", "jaxlib", "flax", "etils")
# Third-party warnings that say nothing to a user of the CLIs: orbax on every read-only restore,
# TFDS on every dataset read and while building one.
HARMLESS_WARNINGS = (
    "CheckpointManagerOptions.read_only=True",
    "Given directory is read only",
    "`FeatureConnector.dtype` is deprecated",
    "has no dataset_info.json",
)
EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the command line or the files it names (reported in one line, exit 2)."""


USER_ERRORS = (UserError, ValueError, OSError, app.UsageError)


class Interrupted(BaseException):
    """SIGINT / SIGTERM while a command starts up (a BaseException, as KeyboardInterrupt: library
    code's ``except Exception`` does not swallow it; context managers on the way out still run)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them


def exit_on_signals(*, unwind: bool) -> None:
    """SIGINT / SIGTERM end the command in one line with exit code 128 + signal, until something
    installs its own handlers (the training loop). ``unwind``: by raising ``Interrupted`` (which
    ``run_main`` reports), so locks are released on the way out; else at once (while importing,
    when nothing has been written)."""

    def at_once(signum: int, frame: Any) -> None:
        sys.stderr.write(f"error: {_interrupted_line(signal.Signals(signum).name)}\n")
        os._exit(128 + signum)

    def raising(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, raising if unwind else at_once)


def _interrupted_line(name: str) -> str:
    return f"stopped by {name} during start-up, before the first step; rerun the same command to start."


def one_line(error: BaseException) -> str:
    """The error's message on one line (multi-line messages joined with '; ')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def _package_dirs(names: Sequence[str]) -> tuple[str, ...]:
    dirs = []
    for name in names:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or []) if spec else []:
            dirs.append(os.path.join(os.path.realpath(location), ""))
    return tuple(dirs)


class QuietThirdParty(logging.Filter):
    """Drops records below WARNING logged from third-party packages (absl logging calls included:
    they all go through the 'absl' logger, so the caller's file tells where they came from)."""

    def __init__(self, packages: Sequence[str] = THIRD_PARTY):
        super().__init__()
        self.dirs = _package_dirs(packages)

    def filter(self, record: logging.LogRecord) -> bool:
        third_party = record.name.split(".")[0] in THIRD_PARTY or os.path.realpath(record.pathname).startswith(
            self.dirs
        )
        if not third_party:
            return True
        if record.levelno == logging.WARNING and any(text in str(record.msg) for text in HARMLESS_WARNINGS):
            return False
        return record.levelno >= logging.WARNING


def configure_logging(verbose: bool) -> None:
    """Quiet third-party logs unless ``verbose`` (see the module docstring)."""
    level = logging.INFO if verbose else logging.WARNING
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(level)  # tf.get_logger() is logging.getLogger("tensorflow")
    handler = absl_logging.get_absl_handler()
    for existing in [f for f in handler.filters if isinstance(f, QuietThirdParty)]:
        handler.removeFilter(existing)
    if not verbose:
        handler.addFilter(QuietThirdParty())


def require_flags(*names: str) -> None:
    """Raises ``UserError`` naming every flag of ``names`` left unset (None), with its help."""
    missing = [name for name in names if FLAGS[name].value is None]
    if missing:
        # Multi-value flags' help ends in absl's ";\n repeat this option..." line: keep the first line.
        helps = {name: FLAGS[name].help.splitlines()[0].rstrip(".;") for name in missing}
        described = "; ".join(f"--{name} ({helps[name]})" for name in missing)
        raise UserError(f"missing required flag{'s' if len(missing) > 1 else ''}: {described}")


def require_positive(**values: int) -> None:
    """Raises ``UserError`` for the first integer flag (``name=value``) below 1."""
    for name, value in values.items():
        if value < 1:
            raise UserError(f"--{name}={value}: must be at least 1.")


def flag_values(*names: str) -> dict[str, Any]:
    """``{name: value}`` of these flags, to pass to a library function whose keywords are named so."""
    return {name: FLAGS[name].value for name in names}


def sampling_options() -> Any:
    """The command's sampling flags (those of ``SamplingOptions``' fields it defines) as one
    ``SamplingOptions``; the others keep their defaults."""
    import dataclasses

    from codi_jax.sampling.options import SamplingOptions

    names = [field.name for field in dataclasses.fields(SamplingOptions)]
    return SamplingOptions(**{name: FLAGS[name].value for name in names if name in FLAGS})


def no_arguments(argv: Sequence[str]) -> None:
    """Raises ``UserError`` on positional arguments (everything is passed as --flags)."""
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {list(argv[1:])}; every option is a --flag (see --helpshort).")


def _config_keys(argv: Sequence[str]) -> list[str]:
    """Every dotted field of the ``--config=FILE`` config (for suggestions; [] if it does not load)."""
    path = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")), None)
    try:
        spec = importlib.util.spec_from_file_location("_codi_cli_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config().to_dict()
    except Exception:  # noqa: BLE001  (only for a hint)
        return []

    def walk(tree: dict, prefix: str) -> list[str]:
        keys = []
        for key, value in tree.items():
            keys.append(prefix + key)
            if isinstance(value, dict):
                keys += walk(value, prefix + key + ".")
        return keys

    return walk(config, "")


def _abbreviates(typed: str, name: str) -> bool:
    """``typed`` is a short form of ``name``: the same first letter, and its letters appear in
    ``name`` in order (``lr`` -> ``learning_rate``)."""
    rest = iter(name)
    return len(typed) < len(name) and typed[:1] == name[:1] and all(letter in rest for letter in typed)


def _name_score(typed: str, name: str) -> float:
    """Similarity of two field names (last components) in [0, 1]; an abbreviation scores above 1."""
    ratio = difflib.SequenceMatcher(None, typed, name).ratio()
    return 1.0 + ratio if _abbreviates(typed, name) else ratio


def nearest_fields(field: str, keys: Sequence[str], n: int = 3, cutoff: float = 0.5) -> list[str]:
    """At most ``n`` of the dotted config ``keys`` nearest to the unknown ``field``: first the
    fields of its section, by the similarity of their names (``_name_score``), then any field
    whose whole dotted name is near (difflib ratio); both at least ``cutoff``."""
    section, _, name = field.rpartition(".")
    ranked = []
    for key in keys:
        if field.startswith(key + "."):
            continue  # a section the field is in
        key_section, _, key_name = key.rpartition(".")
        if key_section == section:
            tier, score = 0, _name_score(name, key_name)
        else:
            tier, score = 1, difflib.SequenceMatcher(None, field, key).ratio()
        if score >= cutoff:
            ranked.append((tier, -score, key))
    return [key for _, _, key in sorted(ranked)[:n]]


def unknown_config_field(argv: Sequence[str], error: BaseException) -> str | None:
    """The message for a ``--config.FIELD=...`` override naming no field, with the nearest valid
    ones (``nearest_fields``)."""
    overrides = [arg[len("--config.") :].split("=", 1)[0] for arg in argv if arg.startswith("--config.")]
    keys = _config_keys(argv)
    unknown = [field for field in overrides if keys and field not in keys]
    if not unknown:
        return None
    near = nearest_fields(unknown[0], keys)
    hint = f"; nearest valid: {', '.join(near)}" if near else ""
    return f"--config.{unknown[0]}: no such config field{hint}"


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError) as error:
        message = unknown_config_field(argv, error)
        if message is None and not isinstance(error, flags.Error):
            raise
        sys.stderr.write(f"error: {message or one_line(error)} (see --helpshort)\n")
        sys.exit(EXIT_USER_ERROR)


def _caller() -> str:
    """The module that called the ``define_*`` function (its ``--help`` lists the flags)."""
    return sys._getframe(2).f_globals["__name__"]


def define_run_flags(what: str) -> None:
    """The vocabulary's input flags: ``--run`` (a trained run: ``what``), ``--checkpoint_step``, ``--ema``."""
    module = _caller()
    flags.DEFINE_string("run", None, f"{what} (a training workdir: holds checkpoints/).", module_name=module)
    flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default: latest).", module_name=module)
    flags.DEFINE_bool("ema", True, "The EMA parameters (false: the raw trained ones).", module_name=module)


def define_out_flags(what: str) -> None:
    """The vocabulary's output flags: ``--out`` (``what`` goes there) and ``--overwrite``."""
    module = _caller()
    flags.DEFINE_string("out", None, f"Output folder: {what}.", module_name=module)
    overwrite = "Replace what an earlier run wrote in --out (else refused)."
    flags.DEFINE_bool("overwrite", False, overwrite, module_name=module)


def define_dtype_flag() -> None:
    """``--dtype``: the sampled network's compute dtype (``SamplingOptions.dtype``)."""
    from codi_jax.sampling.options import DTYPES  # light: no JAX

    help_text = (
        "Compute dtype of the network: float32 (the saved weights as they are; the exported diffusers pipeline "
        "gives these images), bfloat16, or run (the run's model.dtype, as in training)."
    )
    flags.DEFINE_enum("dtype", "float32", list(DTYPES), help_text, module_name=_caller())


def define_distributed_flags() -> None:
    """Multi-process flags (several hosts, or several processes on one): ``--jax_distributed`` and
    the explicit ``--coordinator_address`` / ``--num_processes`` / ``--process_id``."""
    module = _caller()
    flags.DEFINE_bool(
        "jax_distributed",
        False,
        "Multi-host (TPU pods, multi-node GPU): call jax.distributed.initialize() first. Alone it relies on "
        "JAX's cluster auto-detection (TPU, SLURM, ...); give the three flags below to set it explicitly.",
        module_name=module,
    )
    address = "host:port of process 0 (implies --jax_distributed)."
    flags.DEFINE_string("coordinator_address", None, address, module_name=module)
    count = "Number of processes, one per host (implies --jax_distributed)."
    flags.DEFINE_integer("num_processes", None, count, module_name=module)
    index = "This process's index in [0, num_processes) (implies --jax_distributed)."
    flags.DEFINE_integer("process_id", None, index, module_name=module)


def initialize_distributed() -> None:
    """``jax.distributed.initialize`` with the explicit flags given (None: auto-detected); nothing
    without the flags. Processes other than 0 then log warnings only."""
    explicit = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if not FLAGS.jax_distributed and all(v is None for v in explicit):
        return
    if any(v is None for v in explicit) and any(v is not None for v in explicit):
        raise UserError("Give all of --coordinator_address, --num_processes and --process_id, or none.")
    import jax

    jax.distributed.initialize(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
    )
    if jax.process_index() > 0:
        absl_logging.set_verbosity(absl_logging.WARNING)  # process 0 logs for the run


HELP_SPELLINGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort")
FULL_HELP_SPELLINGS = ("--helpfull", "-helpfull")


def print_help(module_name: str, full: bool = False) -> NoReturn:
    """The command's docstring and its flags on stdout, exit 0 (``--helpfull``: every flag)."""
    module = sys.modules[module_name]
    usage = (module.__doc__ or module_name).strip()
    flag_help = FLAGS.get_help() if full else FLAGS.module_help(module_name)
    tail = "" if full else "\n\nShared: --verbose (tracebacks, third-party logs); --helpfull lists every flag."
    sys.stdout.write(f"{usage}\n\nFlags:\n{flag_help}{tail}\n")
    sys.exit(0)


def renamed_flags(args: Sequence[str], renamed: dict[str, str]) -> list[str]:
    """``args`` with each deprecated flag name (``renamed``: old -> new; ``--old``, ``--noold``,
    ``--old=v``) spelt the new way, and one warning line on stderr per old name used."""
    out = []
    for arg in args:
        match = re.fullmatch(r"(--?)([A-Za-z_][A-Za-z0-9_]*)(=.*)?", arg)
        if match:
            dashes, name, value = match.group(1), match.group(2), match.group(3) or ""
            negated = name not in renamed and name.startswith("no") and name[2:] in renamed
            old = name[2:] if negated else name
            if old in renamed:
                sys.stderr.write(f"warning: --{old} is deprecated; use --{renamed[old]} (removed next release)\n")
                arg = f"{dashes}{'no' if negated else ''}{renamed[old]}{value}"
        out.append(arg)
    return out


def run_main(main_fn: Callable[[list[str]], Any], argv: list[str] | None = None) -> NoReturn:
    """Runs ``main_fn(argv)`` with ``app.run``; user errors end in one line and exit code 2;
    ``--help`` prints the command's docstring and flags and exits 0. A command module's
    ``RENAMED_FLAGS`` (old name -> new) keeps its old flag names working, with a warning."""
    os.environ["XLA_FLAGS"] = xla_flags.with_collective_timeout(os.environ.get("XLA_FLAGS", ""))
    renamed = getattr(sys.modules[main_fn.__module__], "RENAMED_FLAGS", {})
    args = renamed_flags(sys.argv if argv is None else argv, renamed)
    if any(a in HELP_SPELLINGS + FULL_HELP_SPELLINGS for a in args[1:]):
        print_help(main_fn.__module__, full=any(a in FULL_HELP_SPELLINGS for a in args[1:]))

    def main(args: list[str]) -> Any:
        configure_logging(FLAGS.verbose)
        try:
            return main_fn(args)
        except Interrupted as interrupted:
            sys.stdout.flush()
            sys.stderr.write(f"error: {_interrupted_line(str(interrupted))}\n")
            sys.exit(interrupted.exit_code)
        except USER_ERRORS as error:
            if FLAGS.verbose:
                raise
            sys.stdout.flush()
            sys.stderr.write(f"error: {one_line(error)}\n")
            sys.stderr.flush()
            sys.exit(EXIT_USER_ERROR)

    app.run(main, argv=args, flags_parser=_parse_flags)
