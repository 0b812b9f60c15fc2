import logging

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from datasets import (DefectDataset, PerImageStandardize, balanced_label_weights, build_transform, collate_skip,
                      load_splits, upsample)
from imaging import ImageReadError, read_image
from main import get_args_parser
from utils import DataError


def test_read_grayscale_rgba_16bit(tmp_path):
    gray = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (4, 1))
    cv2.imwrite(str(tmp_path / 'g.png'), gray)
    rgb = read_image(tmp_path / 'g.png')
    assert rgb.shape == (4, 25, 3) and rgb.dtype == np.uint8 and (rgb[..., 0] == gray).all()
    assert read_image(tmp_path / 'g.png', channels=1).shape == (4, 25)

    bgra = np.zeros((5, 6, 4), np.uint8)
    bgra[..., 0], bgra[..., 2], bgra[..., 3] = 200, 10, 0  # blue 200, red 10, fully transparent
    cv2.imwrite(str(tmp_path / 'a.png'), bgra)
    rgb = read_image(tmp_path / 'a.png')
    assert rgb.shape == (5, 6, 3) and rgb[0, 0].tolist() == [10, 0, 200]

    deep = np.array([[0, 257, 32896, 65535]], np.uint16)  # 16-bit, full range
    cv2.imwrite(str(tmp_path / 'd.png'), deep)
    cv2.imwrite(str(tmp_path / 'd.tif'), deep)
    for name in ('d.png', 'd.tif'):
        assert read_image(tmp_path / name, channels=1).tolist() == [[0, 1, 128, 255]]  # scaled, not clipped


def test_corrupt_and_missing_raise_with_path(tmp_path):
    (tmp_path / 'bad.png').write_bytes(b'\x89PNG\r\n\x1a\n not really')
    with pytest.raises(ImageReadError, match='bad.png: cannot be decoded'):
        read_image(tmp_path / 'bad.png')
    with pytest.raises(ImageReadError, match='none.png: file not found'):
        read_image(tmp_path / 'none.png')


def args_for(*extra):
    return get_args_parser().parse_args(['--input_size', '32', *extra])


def test_corrupt_image_skipped_and_counted(tmp_path, caplog):
    paths = []
    for i in range(5):
        p = tmp_path / f'{i}.png'
        cv2.imwrite(str(p), np.full((40, 40), 40 * i, np.uint8))
        paths.append(str(p))
    (tmp_path / '2.png').write_bytes(b'garbage')
    frame = pd.DataFrame({'path': paths, 'label': ['neg', 'pos', 'neg', 'pos', 'amb_pos']})
    ds = DefectDataset(frame, build_transform(False, args_for()))
    with caplog.at_level(logging.WARNING):
        batches = [b for b in DataLoader(ds, batch_size=2, collate_fn=collate_skip)]
    indices = torch.cat([b[2] for b in batches]).tolist()
    assert indices == [0, 1, 3, 4]
    assert torch.cat([b[1] for b in batches]).tolist() == [2, 3, 3, 1]
    assert '2.png' in caplog.text
    strict = DefectDataset(frame, build_transform(False, args_for()), strict=True)
    with pytest.raises(ImageReadError):
        strict[2]


def test_item_shapes_and_per_image_norm(elpv_small):
    frame = load_splits([elpv_small], (0.25, 0.25), 0)['train']
    ds = DefectDataset(frame, build_transform(True, args_for('--normalize', 'per_image')))
    x, label, index = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and label.dtype == torch.int64
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3
    ds1 = DefectDataset(frame, build_transform(False, args_for('--in_chans', '1', '--normalize', 'imagenet')),
                        in_chans=1)
    assert ds1[0][0].shape == (1, 32, 32)


def test_bbox_crop_in_dataset(tmp_path):
    img = np.zeros((50, 60), np.uint8)
    img[10:20, 30:40] = 255
    cv2.imwrite(str(tmp_path / 'a.png'), img)
    frame = pd.DataFrame({'path': [str(tmp_path / 'a.png')], 'label': ['pos'], 'x1': [30], 'y1': [10], 'x2': [40],
                          'y2': [20]})
    ds = DefectDataset(frame, transform=lambda im: np.asarray(im), padding='PIXEL', padding_size=5)
    crop = ds[0][0]
    assert crop.shape == (20, 20, 3) and (crop[5:15, 5:15] == 255).all() and crop[:5].max() == 0


def test_missing_split_files_one_error(elpv_small, tmp_path):
    import shutil
    root = tmp_path / 'copy'
    shutil.copytree(elpv_small, root)
    load_splits([root], (0.25, 0.25), 0)
    for p in list((root / 'neg').iterdir())[:3]:
        p.unlink()
    with pytest.raises(DataError, match=r'listed file\(s\) missing from disk: .*neg/'):
        load_splits([root], (0.25, 0.25), 0)
    with pytest.raises(DataError, match='does not exist'):
        load_splits([tmp_path / 'nothing'])


def test_upsample_counts(caplog):
    frame = pd.DataFrame({'path': [f'{i}' for i in range(20)],
                          'label': ['amb_neg'] * 2 + ['amb_pos'] * 4 + ['neg'] * 10 + ['pos'] * 4})
    with caplog.at_level(logging.INFO):
        out = upsample(frame, [3, 2.5, 1, 0])
    assert out['label'].value_counts().to_dict() == {'amb_neg': 6, 'amb_pos': 10, 'neg': 10}
    assert "'amb_pos': 4" in caplog.text and "'amb_pos': 10" in caplog.text
    with pytest.raises(DataError, match='upsample'):
        upsample(frame, [1, -1, 1, 1])


def test_balanced_label_weights():
    frame = pd.DataFrame({'label': ['neg'] * 6 + ['pos'] * 2})
    w = balanced_label_weights(frame)
    assert w.tolist() == pytest.approx([1.0, 1.0, 8 / (2 * 6), 8 / (2 * 2)])


def test_per_image_standardize_constant_image():
    x = torch.full((3, 4, 4), 0.5)
    assert torch.isfinite(PerImageStandardize()(x)).all()


def test_random_rot90_turns_exactly():
    from PIL import Image
    from datasets import RandomRot90
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20  # not square, no symmetry
    img = Image.fromarray(arr)
    torch.manual_seed(0)
    seen = {np.asarray(RandomRot90(1.0)(img)).tobytes() for _ in range(60)}
    turns = {np.rot90(arr, k).tobytes() for k in (1, 2, 3)}
    assert seen == turns  # every turn appears, never the image as it was
    assert np.array_equal(np.asarray(RandomRot90(0.0)(img)), arr)
    args = get_args_parser().parse_args(['--rot90', '0.5', '--rotation', '3', '--input_size', '32'])
    tf = build_transform(True, args)
    text = repr(tf)  # turns first, on the decoded image, then timm's crop and flips
    assert text.index('RandomRot90(p=0.5)') < text.index('RandomRotation') < text.index('RandomResizedCrop')
    assert tf(Image.fromarray(np.zeros((40, 40), np.uint8)).convert('RGB')).shape == (3, 32, 32)
    assert 'RandomRot90' not in repr(build_transform(True, get_args_parser().parse_args([])))


def test_local_contrast_brings_out_a_faint_line_in_training_and_evaluation():
    from PIL import Image
    from datasets import LocalContrast
    from utils import DataError
    # a dim, low-contrast ramp across the cell (grey 100 to 140) with a faint dark line (3 levels) down the middle
    arr = np.tile(np.linspace(100, 140, 64).astype(np.uint8), (64, 1))
    arr[:, 31] -= 3
    out = np.asarray(LocalContrast(2.0, 4)(Image.fromarray(arr))).astype(int)
    assert out.shape == arr.shape
    depth = lambda a: (a[:, 30] + a[:, 32]) / 2 - a[:, 31]  # noqa: E731
    assert depth(out).mean() > 2 * depth(arr.astype(int)).mean()
    rgb = np.asarray(LocalContrast(2.0, 4)(Image.fromarray(arr).convert('RGB')))
    assert rgb.shape == (64, 64, 3) and all(np.array_equal(rgb[..., c], out) for c in range(3))
    colour = np.dstack([arr, arr[:, ::-1], np.full_like(arr, 120)])  # channels differ: each equalised on its own
    eq = np.asarray(LocalContrast(2.0, 4)(Image.fromarray(colour)))
    for c in range(3):
        alone = np.asarray(LocalContrast(2.0, 4)(Image.fromarray(np.ascontiguousarray(colour[..., c]))))
        assert np.array_equal(eq[..., c], alone)
    assert not np.array_equal(eq[..., 1], eq[..., 0])
    for train in (True, False):
        args = get_args_parser().parse_args(['--clahe', '2', '--clahe_grid', '4', '--input_size', '32'])
        assert 'LocalContrast(clip_limit=2.0, grid=4)' in repr(build_transform(train, args))
    assert 'LocalContrast' not in repr(build_transform(False, get_args_parser().parse_args([])))
    for bad in (['--clahe', '-1'], ['--clahe', '2', '--clahe_grid', '0']):
        with pytest.raises(DataError, match='--clahe'):
            build_transform(True, get_args_parser().parse_args(bad))


def test_blackhat_channel_marks_thin_dark_lines_only():
    from PIL import Image
    from datasets import BlackHatChannel
    from flags import check_args
    # a bright ramp with a 2-px dark crack and a 12-px dark band (wider than the 5-px kernel)
    arr = np.tile(np.linspace(150, 200, 64).astype(np.uint8), (64, 1))
    arr[:, 20:22] -= 40
    arr[:, 40:52] -= 40
    rgb = Image.fromarray(arr).convert('RGB')
    out = np.asarray(BlackHatChannel(5, gain=2)(rgb)).astype(int)
    assert out.shape == (64, 64, 3) and np.array_equal(out[..., 0], arr) and np.array_equal(out[..., 1], arr)
    line = out[..., 2]
    assert line[:, 20:22].min() >= 70  # 2 x the ~40 levels of the crack, clipped at 255
    assert line[:, 44:48].max() == 0 and line[:, 2:16].max() <= 2  # inside the wide band and on the ramp: nothing
    for train in (True, False):
        tf = build_transform(train, get_args_parser().parse_args(['--blackhat', '5', '--clahe', '2',
                                                                   '--input_size', '32']))
        assert 'BlackHatChannel(kernel=5' in repr(tf) and tf(rgb).shape == (3, 32, 32)
        assert repr(tf).index('LocalContrast') < repr(tf).index('BlackHatChannel')  # on the equalised image
    assert 'BlackHatChannel' not in repr(build_transform(False, get_args_parser().parse_args([])))
    with pytest.raises(DataError, match='needs 3-channel input'):
        BlackHatChannel(5)(Image.fromarray(arr))
    for bad in (['--blackhat', '2'], ['--blackhat', '5', '--in_chans', '1']):
        with pytest.raises(DataError, match='--blackhat must be 0'):
            check_args(get_args_parser().parse_args(bad))
