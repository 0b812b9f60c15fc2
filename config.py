"""Run configuration files: YAML mappings of flag names to values, read as command-line defaults.

    python main.py --config configs/elpv_long_run.yaml --seed 1     # the file sets defaults, the command line wins

The same conversion from YAML values to command-line tokens serves run.py's sweep files, so a value means the same
in both. Only ``yaml.safe_load`` reads a file: nothing in it can execute code.
"""
import argparse
from pathlib import Path

import yaml

from utils import DataError, atomic_write_text


def tokens(value):
    """Command-line tokens of a flag value: lists give several tokens, booleans True/False, the rest str().

    Args:
        value: a YAML scalar (str, int, float, bool) or a list of them.
    Returns:
        list of str.
    """
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tokens(v)]
    return [str(value)]


def read_yaml_mapping(path, what):
    """A YAML file whose top level is a mapping, as a dict (an empty file gives {}).

    Args:
        path: str or Path of the file.
        what: str naming the file's role in the error message, e.g. 'run config'.
    Raises:
        DataError: unreadable file, invalid YAML, or a top level that is not a mapping (one line naming the file).
    """
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        reason = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise DataError(f'{path}: unreadable {what} ({e.__class__.__name__}: {reason})') from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DataError(f'{path}: a {what} must be a mapping of flag names to values, got {type(data).__name__}')
    return data


def flag_names(parser):
    """The destinations (flag names without ``--``) of an argparse parser, ``help`` excluded."""
    return {a.dest for a in parser._actions if a.dest != argparse.SUPPRESS and a.dest != 'help'}


def check_flag_names(names, parser, source):
    """Raise DataError naming ``source`` and the first unknown flag when ``names`` holds a flag ``parser`` lacks."""
    known = flag_names(parser)
    unknown = sorted(str(n) for n in names if str(n).lstrip('-') not in known)
    if unknown:
        raise DataError(f'{source}: unknown flag(s) {", ".join(unknown)} (see python main.py --help)')


def config_tokens(path, parser):
    """Command-line tokens equivalent to a run config file, to be placed before the real command line.

    A key is a flag name (with or without ``--``); a value is a scalar, a list (a flag taking several values) or
    null (kept at the parser's default). ``config`` keys are ignored, so a saved ``config.yaml`` reads back as is.

    Raises:
        DataError: unreadable file, not a mapping, or an unknown key.
    """
    cfg = read_yaml_mapping(path, 'run config')
    check_flag_names(cfg, parser, path)
    out = []
    for key, value in cfg.items():
        name = str(key).lstrip('-')
        if value is None or name == 'config' or value == []:
            continue
        out += [f'--{name}', *tokens(value)]
    return out


def parse_with_config(parser, argv):
    """Parse ``argv`` with ``--config FILE`` values as defaults: the command line wins over the file.

    Args:
        parser: argparse.ArgumentParser with a ``--config`` flag.
        argv: list of str.
    Returns:
        (argparse.Namespace, set of str): the flags and the names of those set by the file or the command line.
    Raises:
        DataError: a bad config file (see config_tokens).
        SystemExit: argparse's own errors (status 2), e.g. a bad value in the file shown as a command-line value.
    """
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument('--config', default=None)
    known, _ = pre.parse_known_args(argv)
    from_file = config_tokens(known.config, parser) if known.config else []
    args = parser.parse_args(from_file + list(argv))
    explicit = {a[2:].split('=', 1)[0] for a in from_file + list(argv) if a.startswith('--')}
    return args, explicit


def write_config(args, path):
    """Save the effective flags as a YAML run config that ``--config`` accepts again (atomic write).

    Args:
        args: argparse.Namespace of main.py's flags (``config`` itself left out; None is written as null).
        path: str or Path of the file.
    """
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items() if k != 'config'}
    atomic_write_text(yaml.safe_dump(values, sort_keys=False, default_flow_style=None), path)
