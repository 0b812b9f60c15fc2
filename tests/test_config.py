"""Run config files (main.py --config), Weights & Biases logging, and flags the original scripts pass."""
import json

import pytest
import yaml

import main
import run
from config import config_tokens, parse_with_config
from conftest import train_argv
from imaging import crop_window
from utils import DataError


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_config_sets_defaults_and_the_command_line_wins(tmp_path):
    cfg = write_yaml(tmp_path / 'run.yaml', {'epochs': 7, 'lr': 0.002, 'use_softlabel': True,
                                             'scale': [0.9, 1.0], 'data_path': ['a', 'b'], 'opt_betas': None})
    args, explicit = parse_with_config(main.get_args_parser(), ['--config', str(cfg), '--epochs', '3'])
    assert args.epochs == 3 and args.lr == 0.002 and args.use_softlabel is True
    assert args.scale == [0.9, 1.0] and args.data_path == ['a', 'b'] and args.opt_betas is None
    assert {'epochs', 'lr', 'use_softlabel', 'scale', 'data_path'} <= explicit
    assert 'batch_size' not in explicit


@pytest.mark.parametrize('content,match', [
    ('epochs: 3\nnot_a_flag: 1\n', 'unknown flag.*not_a_flag'),
    ('- epochs\n- 3\n', 'must be a mapping'),
    ('epochs: [3\n', 'unreadable run config'),
])
def test_bad_config_is_one_line(tmp_path, content, match):
    cfg = tmp_path / 'bad.yaml'
    cfg.write_text(content)
    with pytest.raises(DataError, match=match) as e:
        parse_with_config(main.get_args_parser(), ['--config', str(cfg)])
    assert str(cfg) in str(e.value) and '\n' not in str(e.value)


def test_missing_config_file_is_one_line(tmp_path):
    with pytest.raises(DataError, match='nope.yaml: unreadable run config'):
        config_tokens(tmp_path / 'nope.yaml', main.get_args_parser())


def test_saved_config_reproduces_the_run(elpv_small, tmp_path):
    out = tmp_path / 'run'
    cfg = write_yaml(tmp_path / 'run.yaml', {'epochs': 1, 'lr': 0.002, 'use_amp': False, 'channels_last': False})
    argv = train_argv(elpv_small, out)
    i = argv.index('--epochs')
    main.main(['--config', str(cfg), *argv[:i], *argv[i + 2:]])  # --epochs from the file
    saved = yaml.safe_load((out / 'config.yaml').read_text())
    assert saved['epochs'] == 1 and saved['lr'] == 0.002 and 'config' not in saved
    # the saved file parses back to the same flags
    again, _ = parse_with_config(main.get_args_parser(), ['--config', str(out / 'config.yaml')])
    args = json.loads((out / 'args.json').read_text())
    for key, value in vars(again).items():
        if key != 'config':
            assert value == args[key], key


def test_sweep_with_unknown_flag_is_one_line(tmp_path):
    cfg = write_yaml(tmp_path / 'sweep.yaml', {'sweep_dir': str(tmp_path / 's'), 'base': {'epochs': 1},
                                               'grid': {'learning_rate': [1, 2]}})
    args = run.get_args_parser().parse_args(['--config', str(cfg)])
    with pytest.raises(DataError, match='unknown flag.*learning_rate'):
        run.load_sweep(args)


def test_padding_size_accepts_a_float():
    args = main.get_args_parser().parse_args(['--padding_size', '100.0'])
    assert args.padding_size == 100.0
    assert crop_window((10, 10, 20, 20), 'PIXEL', 100.0) == (-90, -90, 120, 120)
    assert crop_window((10, 10, 20, 20), 'PIXEL', 2.6) == (7, 7, 23, 23)
    with pytest.raises(DataError, match='--padding_size'):
        main.check_args(main.get_args_parser().parse_args(['--padding_size', '-1']))


def test_unknown_optimizer_is_one_line():
    with pytest.raises(DataError, match='--opt adamx: timm has no optimizer of that name'):
        main.check_args(main.get_args_parser().parse_args(['--opt', 'adamx']))
    main.check_args(main.get_args_parser().parse_args(['--opt', 'lookahead_AdamW']))  # timm's prefix, any case


def test_wandb_logs_the_tensorboard_scalars_and_checkpoints(elpv_small, tmp_path, monkeypatch):
    wandb = pytest.importorskip('wandb')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_SILENT', 'true')
    logged, artifacts = {}, []
    real_log, real_artifact = wandb.sdk.wandb_run.Run.log, wandb.sdk.wandb_run.Run.log_artifact

    def spy_log(self, data, *a, **k):
        for tag, value in data.items():
            logged.setdefault(tag, []).append(value)
        return real_log(self, data, *a, **k)

    def spy_artifact(self, artifact, *a, **k):
        artifacts.append((artifact.type, sorted(artifact.manifest.entries), k.get('aliases')))
        return real_artifact(self, artifact, *a, **k)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, 'log', spy_log)
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, 'log_artifact', spy_artifact)
    out = tmp_path / 'run'
    main.main(train_argv(elpv_small, out, '--enable_wandb', 'True', '--project', 'elpv-test', '--wandb_ckpt', 'True',
                         '--use_amp', 'False', '--channels_last', 'False'))
    events = EventAccumulator(str(out / 'tensorboard'))
    events.Reload()
    for tag in events.Tags()['scalars']:
        tb = [e.value for e in events.Scalars(tag)]
        assert logged[tag] == pytest.approx(tb, rel=1e-5), tag
    assert logged['epoch'] == [0, 1]
    assert any(entries == ['checkpoint-best.pth'] and 'best' in aliases for _, entries, aliases in artifacts)
    assert artifacts[-1][1:] == (['checkpoint-last.pth'], ['latest'])
    assert list((out / 'wandb').glob('offline-run-*'))


def test_wandb_missing_is_one_line(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'wandb' else real(name, *a))
    with pytest.raises(DataError, match='pip install wandb'):
        main.check_args(main.get_args_parser().parse_args(['--enable_wandb', 'True']))
