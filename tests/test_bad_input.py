"""The bad-input battery: each case is run as a user would run the entry point (through its command-line wrapper)
and must end in one ``error:`` line (exit status 1 or argparse's 2) or a counted skip, never a traceback, and never
cost an output that was already there."""
import json
import os
import re
import shutil
import sys

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

import benchmark
import load_board
import main
import preprocess_data
import results_table
import run
from conftest import train_argv
from imaging import ImageReadError, read_image
from utils import run_cli

ENTRY = {'main': main.main,
         'preprocess': lambda argv: preprocess_data.main(preprocess_data.get_args_parser().parse_args(argv)),
         'run': run.main, 'load_board': load_board.main,
         'results_table': results_table.main, 'benchmark': benchmark.main}


def cli(entry, argv, capsys):
    """Run an entry point as its ``__main__`` does; returns (exit status, stderr)."""
    capsys.readouterr()
    argv = [str(a) for a in argv]
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: ENTRY[entry](argv))
        sys.exit(0)
    err = capsys.readouterr().err
    code = e.value.code if isinstance(e.value.code, int) else 1
    if isinstance(e.value.code, str):  # sys.exit('error: ...') prints the message itself
        err += e.value.code + '\n'
    return code, err


def expect_error(entry, argv, match, capsys):
    """The run ends with exactly one ``error:`` line matching ``match`` and no traceback."""
    code, err = cli(entry, argv, capsys)
    lines = [line for line in err.splitlines() if line.startswith('error:') or ': error:' in line]
    assert code in (1, 2), err
    assert len(lines) == 1 and re.search(match, lines[0]), err
    assert 'Traceback' not in err
    return lines[0]


def raw_root(tmp_path, elpv_small, n=4):
    """A raw class-folder root (neg/, pos/) of ``n`` real ELPV cells per class."""
    root = tmp_path / 'raw'
    for label in ('neg', 'pos'):
        (root / label).mkdir(parents=True)
        for src in sorted((elpv_small / label).glob('*.png'))[:n]:
            shutil.copy(src, root / label / src.name)
    return root


def train_tiny(data, out, *extra):
    return train_argv(data, out, '--epochs', '1', '--use_amp', 'False', '--channels_last', 'False',
                      '--test_val_ratio', '0.25', '0.25', *extra)


@pytest.fixture(scope='module')
def trained(elpv_small, tmp_path_factory):
    out = tmp_path_factory.mktemp('battery') / 'run'
    main.main(train_tiny(elpv_small, out))
    return out


# ----------------------------------------------------------------------------------------------------- images


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


def test_zero_byte_image_is_a_counted_skip(tmp_path):
    (tmp_path / 'empty.png').write_bytes(b'')
    with pytest.raises(ImageReadError, match='empty.png: empty file'):
        read_image(tmp_path / 'empty.png')


def test_one_pixel_image_is_read(tmp_path):
    img = read_image(write_png(tmp_path / 'one.png', np.full((1, 1), 200, np.uint8)))
    assert img.shape == (1, 1, 3) and img[0, 0, 0] == 200


def test_huge_image_is_refused_before_decoding(tmp_path):
    path = write_png(tmp_path / 'huge.png', np.zeros((12000, 12000), np.uint8))  # 144 Mpx, a small file
    assert path.stat().st_size < 2_000_000
    with pytest.raises(ImageReadError, match=r'huge.png: 12000x12000 pixels'):
        read_image(path)


def test_cmyk_jpeg_is_read_as_rgb(tmp_path):
    from PIL import Image
    Image.new('CMYK', (16, 8), (0, 255, 255, 0)).save(tmp_path / 'cmyk.jpg')  # pure red in CMYK
    img = read_image(tmp_path / 'cmyk.jpg')
    assert img.shape == (8, 16, 3)
    assert img[..., 0].mean() > 150 and img[..., 1].mean() < 100 and img[..., 2].mean() < 100


def test_exif_rotated_jpeg_is_turned_upright(tmp_path):
    from PIL import Image
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the viewer turns it 90 degrees clockwise
    Image.new('L', (40, 20), 128).save(tmp_path / 'turned.jpg', exif=exif.tobytes())
    assert read_image(tmp_path / 'turned.jpg').shape[:2] == (40, 20)  # shown as 20 wide, 40 high


def test_unusual_file_names_train_and_predict(elpv_small, tmp_path, capsys):
    root = raw_root(tmp_path, elpv_small)
    names = sorted((root / 'neg').glob('*.png'))
    names[0].rename(root / 'neg' / 'with space.png')
    odd = os.fsdecode(b'caf\xe9-latin1.png')  # not UTF-8: a surrogate escape in Python
    names[1].rename(root / 'neg' / odd)
    os.symlink(root / 'neg', root / 'neg' / 'loop')  # a symlink loop below a class folder
    out = tmp_path / 'run'
    code, err = cli('main', train_tiny(root, out), capsys)
    assert code == 0, err
    assert 'Traceback' not in err
    split = next((root / 'splits').iterdir())
    listed = [os.path.basename(p) for s in ('train', 'val', 'test')
              for p in pd.read_csv(split / f'{s}.csv', encoding_errors='surrogateescape')['path']]
    assert 'with space.png' in listed and odd in listed and len(listed) == 8
    code, err = cli('main', ['--pred', 'True', '--resume', out / 'checkpoint-best.pth', '--eval_data_path', root,
                             '--eval_split', 'all', '--num_workers', '0', '--pred_save_path', tmp_path / 'pred',
                             '--pred_save', 'True'], capsys)
    assert code == 0, err
    table = pd.read_csv(tmp_path / 'pred' / 'predictions.csv', encoding_errors='surrogateescape')
    assert len(table) == 8
    assert list((tmp_path / 'pred' / 'images').rglob('*with space.png'))


def test_bad_images_in_training_are_counted_skips(elpv_small, tmp_path, capsys):
    root = raw_root(tmp_path, elpv_small)
    (root / 'neg' / 'zero.png').write_bytes(b'')
    write_png(root / 'pos' / 'one.png', np.full((1, 1), 90, np.uint8))
    write_png(root / 'pos' / 'huge.png', np.zeros((12000, 12000), np.uint8))
    from PIL import Image
    Image.new('CMYK', (300, 300), (0, 0, 0, 40)).save(root / 'neg' / 'cmyk.jpg')
    out = tmp_path / 'run'
    code, err = cli('main', train_tiny(root, out, '--test_val_ratio', '0.0', '0.0', '--test', 'False'), capsys)
    assert code == 0 and 'Traceback' not in err, err
    finished = json.loads((out / 'finished.json').read_text())
    assert finished['skipped_images'] == 2  # the empty and the huge file; the 1x1 and CMYK ones train


def test_same_image_under_two_classes_is_one_line(elpv_small, tmp_path, capsys):
    root = raw_root(tmp_path, elpv_small)
    shutil.copy(sorted((root / 'neg').glob('*.png'))[0], root / 'pos' / 'copy.png')
    expect_error('preprocess', ['--data_path', root, '--output', tmp_path / 'prep'],
                 r'the same image.*neg/.*pos/copy.png', capsys)
    assert not (tmp_path / 'prep' / 'list.csv').exists()


# ----------------------------------------------------------------------------------------------------- lists


def prepared(tmp_path, elpv_small):
    root = tmp_path / 'prep'
    shutil.copytree(elpv_small, root, ignore=shutil.ignore_patterns('splits'))
    return root


def test_split_csv_with_unknown_label(elpv_small, tmp_path, capsys):
    root = prepared(tmp_path, elpv_small)
    main.main(train_tiny(root, tmp_path / 'first'))
    split = next((root / 'splits').iterdir())
    table = pd.read_csv(split / 'train.csv')
    table.loc[0, 'label'] = 'cracked'
    table.to_csv(split / 'train.csv', index=False)
    expect_error('main', train_tiny(split, tmp_path / 'o'), r'train.csv: unknown label.*cracked', capsys)


def test_split_csv_without_label_column(elpv_small, tmp_path, capsys):
    root = prepared(tmp_path, elpv_small)
    main.main(train_tiny(root, tmp_path / 'first'))
    split = next((root / 'splits').iterdir())
    pd.read_csv(split / 'val.csv').drop(columns=['label']).to_csv(split / 'val.csv', index=False)
    expect_error('main', train_tiny(split, tmp_path / 'o'), r'val.csv: .*label', capsys)


def test_list_csv_without_path_column(tmp_path, capsys):
    (tmp_path / 'data').mkdir()
    (tmp_path / 'data' / 'list.csv').write_text('file,label\na.png,neg\n')
    expect_error('main', train_tiny(tmp_path / 'data', tmp_path / 'o'), r'list.csv: .*path', capsys)


# ----------------------------------------------------------------------------------------------------- flags and files

@pytest.mark.parametrize('flags,match', [
    (['--soft_label_ratio', '1.5'], 'soft_label_ratio must lie in'),
    (['--label_ratio', '-1'], 'label_ratio must lie in'),
    (['--input_size', '100'], 'input_size must be a positive multiple of 32'),
    (['--model', 'convnext_nonexistent'], 'unknown model name'),
    (['--mask_ratio', '1.5'], 'mask_ratio must lie in'),
    (['--padding_size', '-1'], 'padding_size must be >= 0'),
    (['--batch_size', '0'], 'batch_size'),
    (['--upsample', '1', '-2', '1', '1'], 'upsample takes 4 factors >= 0'),
    (['--label_list', 'crack'], 'label_list'),
    (['--model', 'resnet', '--resnet_layers', '3-3'], 'resnet_layers'),
    (['--test_val_ratio', '0.6', '0.6'], 'test_val_ratio'),
    (['--epochs', 'ten'], 'invalid int value'),
    (['--opt', 'adamx'], '--opt adamx: timm has no optimizer of that name'),
])
def test_bad_flag_values(flags, match, elpv_small, tmp_path, capsys):
    expect_error('main', train_tiny(elpv_small, tmp_path / 'o', *flags), match, capsys)
    assert not (tmp_path / 'o' / 'checkpoint-last.pth').exists()


def test_data_path_is_a_file(elpv_small, tmp_path, capsys):
    expect_error('main', train_tiny(elpv_small / 'list.csv', tmp_path / 'o'), 'list.csv', capsys)


def test_data_path_missing(tmp_path, capsys):
    expect_error('main', train_tiny(tmp_path / 'nowhere', tmp_path / 'o'), 'nowhere: data path does not exist',
                 capsys)


def test_benchmark_data_path_missing_or_not_prepared(tmp_path, capsys):
    expect_error('benchmark', ['--data_path', tmp_path / 'nowhere'], 'nowhere: data path does not exist', capsys)
    (tmp_path / 'empty').mkdir()  # exists, but holds no list.csv: refused inside the pipeline's own process
    expect_error('benchmark', ['--data_path', tmp_path / 'empty', '--steps', '1', '--rounds', '1', '--warmup', '0'],
                 r'^error: tuned pipeline: .*empty', capsys)
    expect_error('benchmark', ['--data_path', tmp_path / 'empty', '--steps', '3', '--rounds', '2'],
                 'steps 3 must be a multiple of --rounds 2', capsys)


def test_benchmark_split_folder_without_training_images(tmp_path, elpv_small, capsys):
    # a split folder given directly whose train.csv lists no image: refused in one line, not a division by zero
    folder = tmp_path / 'split'
    folder.mkdir()
    listed = pd.read_csv(elpv_small / 'list.csv').assign(path=lambda f: [str(elpv_small / p) for p in f['path']])
    listed.iloc[:0].to_csv(folder / 'train.csv', index=False)
    for s in ('val', 'test'):
        listed.iloc[:4].to_csv(folder / f'{s}.csv', index=False)
    expect_error('benchmark', ['--data_path', folder, '--steps', '1', '--rounds', '1', '--warmup', '0'],
                 r'^error: tuned pipeline: .*split: the training split is empty', capsys)


def test_folder_of_non_images(tmp_path, capsys):
    for label in ('neg', 'pos'):
        (tmp_path / 'data' / label).mkdir(parents=True)
        (tmp_path / 'data' / label / 'notes.txt').write_text('not an image')
    expect_error('main', train_tiny(tmp_path / 'data', tmp_path / 'o'), 'holds no image', capsys)


def test_empty_evaluation_folder(trained, tmp_path, capsys):
    (tmp_path / 'empty').mkdir()
    expect_error('main', ['--eval', 'True', '--resume', trained / 'checkpoint-best.pth',
                          '--eval_data_path', tmp_path / 'empty', '--num_workers', '0'], 'empty', capsys)


def test_resume_with_another_number_of_classes(trained, elpv_small, tmp_path, capsys):
    expect_error('main', train_tiny(elpv_small, tmp_path / 'o', '--nb_classes', '4', '--resume',
                                    trained / 'checkpoint-last.pth'), 'checkpoint does not fit', capsys)


def test_resume_missing_checkpoint(elpv_small, tmp_path, capsys):
    expect_error('main', train_tiny(elpv_small, tmp_path / 'o', '--resume', tmp_path / 'none.pth'), 'none.pth',
                 capsys)


def test_resume_file_that_is_not_a_checkpoint(elpv_small, tmp_path, capsys):
    (tmp_path / 'junk.pth').write_bytes(os.urandom(1000))
    expect_error('main', train_tiny(elpv_small, tmp_path / 'o', '--resume', tmp_path / 'junk.pth'), 'junk.pth',
                 capsys)


def test_finetune_from_a_text_file(elpv_small, tmp_path, capsys):
    (tmp_path / 'weights.pth').write_text('hello')
    expect_error('main', train_tiny(elpv_small, tmp_path / 'o', '--finetune', tmp_path / 'weights.pth'),
                 'weights.pth', capsys)


def test_bad_run_config(elpv_small, tmp_path, capsys):
    (tmp_path / 'run.yaml').write_text('epochs: 1\nlearning_rate: 2\n')
    expect_error('main', ['--config', tmp_path / 'run.yaml'], 'run.yaml: unknown flag', capsys)


def test_prediction_keeps_an_existing_report(trained, elpv_small, tmp_path, capsys):
    pred = tmp_path / 'pred'
    pred.mkdir()
    (pred / 'predictions.csv').write_text('kept\n')
    expect_error('main', ['--pred', 'True', '--resume', trained / 'checkpoint-best.pth', '--eval_data_path',
                          elpv_small, '--pred_save_path', pred, '--num_workers', '0'], 'already holds', capsys)
    assert (pred / 'predictions.csv').read_text() == 'kept\n'


# ----------------------------------------------------------------------------------------------------- other tools

def test_sweep_file_with_unknown_key(tmp_path, capsys):
    (tmp_path / 's.yaml').write_text(yaml.safe_dump({'sweep_dir': str(tmp_path / 's'), 'grids': {'seed': [0]}}))
    expect_error('run', ['--config', tmp_path / 's.yaml'], 'unknown key.*grids', capsys)


def test_sweep_file_with_unknown_flag(tmp_path, capsys):
    (tmp_path / 's.yaml').write_text(yaml.safe_dump({'sweep_dir': str(tmp_path / 's'), 'base': {'epoch': 1}}))
    expect_error('run', ['--config', tmp_path / 's.yaml'], 'unknown flag.*epoch', capsys)
    assert not (tmp_path / 's').exists()


def test_sweep_file_missing(tmp_path, capsys):
    expect_error('run', ['--config', tmp_path / 'none.yaml'], 'none.yaml: unreadable sweep file', capsys)


def test_load_board_without_events(tmp_path, capsys):
    (tmp_path / 'runs').mkdir()
    expect_error('load_board', ['--path', tmp_path / 'runs', '--out', tmp_path / 'csv'], 'event', capsys)


def test_results_table_without_runs(tmp_path, capsys):
    (tmp_path / 'runs').mkdir()
    expect_error('results_table', ['--runs', tmp_path / 'runs', '--out', tmp_path / 't.csv'], 'no finished run',
                 capsys)


def test_preprocess_missing_folder(tmp_path, capsys):
    expect_error('preprocess', ['--data_path', tmp_path / 'nowhere', '--output', tmp_path / 'prep'], 'nowhere',
                 capsys)
