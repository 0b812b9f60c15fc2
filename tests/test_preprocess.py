import json
import logging

import cv2
import numpy as np
import pandas as pd
import pytest

import imaging as im
import preprocess_data as pp
from utils import DataError


def make_root(root, counts, size=(20, 30)):
    """Class folders with ``counts`` {label: n} synthetic PNG images, all different (one image under two classes
    is refused)."""
    for k, (label, n) in enumerate(counts.items()):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            cv2.imwrite(str(root / label / f'{label}_{i}.png'), np.full(size, (i * 7 + 50 * k) % 255, np.uint8))
    return root


def test_elpv_export_counts(tmp_path):
    df = pp.export_elpv(tmp_path / 'elpv')
    assert len(df) == 2624
    assert df['label'].value_counts().to_dict() == {'neg': 1508, 'pos': 715, 'amb_neg': 295, 'amb_pos': 106}
    assert set(df['type']) == {'mono', 'poly'}
    listed = pd.read_csv(tmp_path / 'elpv' / 'list.csv')
    assert len(listed) == 2624 and (tmp_path / 'elpv' / listed['path'][0]).is_file()
    assert sorted(listed['defect_prob'].round(3).unique()) == [0.0, 0.333, 0.667, 1.0]


def test_scan_nested_and_extensions(tmp_path):
    make_root(tmp_path, {'neg': 2, 'pos': 1})
    (tmp_path / 'pos' / 'sub').mkdir()
    cv2.imwrite(str(tmp_path / 'pos' / 'sub' / 'x.JPG'), np.zeros((8, 8), np.uint8))
    (tmp_path / 'pos' / 'notes.txt').write_text('not an image')
    df = pp.load_list(tmp_path)
    assert sorted(df['path']) == ['neg/neg_0.png', 'neg/neg_1.png', 'pos/pos_0.png', 'pos/sub/x.JPG']


def test_unknown_folder_error_and_label_list(tmp_path):
    make_root(tmp_path, {'crack': 2, 'ok': 3})
    with pytest.raises(DataError, match='unknown class folder.*crack.*accepted names'):
        pp.load_list(tmp_path)
    df = pp.load_list(tmp_path, pp.parse_label_list(['crack=pos', 'ok=neg']))
    assert df['label'].value_counts().to_dict() == {'neg': 3, 'pos': 2}
    with pytest.raises(DataError, match='label must be one of'):
        pp.parse_label_list(['crack=broken'])


def test_empty_class_folder_and_missing_root(tmp_path):
    make_root(tmp_path, {'neg': 2})
    (tmp_path / 'pos').mkdir()
    with pytest.raises(DataError, match='pos: class folder holds no image'):
        pp.load_list(tmp_path)
    with pytest.raises(DataError, match='does not exist'):
        pp.load_list(tmp_path / 'nowhere')


def synthetic_list(n_per_label=40, types=True):
    rows = []
    for label in ('neg', 'pos', 'amb_neg', 'amb_pos'):
        for i in range(n_per_label):
            rows.append(dict(path=f'{label}/{i}.png', label=label, type=['mono', 'poly'][i % 2] if types else None))
    return pp.validate_list(pd.DataFrame(rows), 'test')


def test_split_reproducible_and_stratified():
    df = synthetic_list()
    a, b = pp.make_split(df, 0.25, 0.1, seed=3), pp.make_split(df, 0.25, 0.1, seed=3)
    c = pp.make_split(df, 0.25, 0.1, seed=4)
    for s in pp.SPLITS:
        assert a[s]['path'].tolist() == b[s]['path'].tolist()
    assert a['test']['path'].tolist() != c['test']['path'].tolist()
    assert len(a['test']) == 40 and len(a['val']) == 16 and len(a['train']) == 104
    # every label and label/type cell keeps its share in the test split
    assert a['test']['label'].value_counts().to_dict() == {k: 10 for k in ('amb_neg', 'amb_pos', 'neg', 'pos')}
    assert a['test'].groupby(['label', 'type']).size().to_dict() == {k: 5 for k in
                                                                     a['test'].groupby(['label', 'type']).groups}
    assert not set(a['train']['path']) & set(a['test']['path'])


def test_split_keeps_groups_whole():
    rows = [dict(path=f'img{g}.png', label='pos' if g % 2 else 'neg', x1=i, y1=0, x2=i + 5, y2=5, group=f'img{g}')
            for g in range(30) for i in range(3)]
    parts = pp.make_split(pp.validate_list(pd.DataFrame(rows), 'test'), 0.2, 0.2, seed=0)
    owner = {}
    for s, part in parts.items():
        for g in part['group']:
            assert owner.setdefault(g, s) == s, f'group {g} split across {owner[g]} and {s}'
    assert all(len(p) for p in parts.values())


def test_split_ratio_errors():
    with pytest.raises(DataError, match='test_val_ratio'):
        pp.make_split(synthetic_list(), 0.7, 0.4, 0)


def test_prepare_split_reused_and_warns_on_change(tmp_path, caplog):
    make_root(tmp_path, {'neg': 10, 'pos': 10})
    folder = pp.prepare_split(tmp_path, 0.2, 0.2, 1)
    assert folder.name == pp.split_name(0.2, 0.2, 1) == 'test0.2_val0.2_seed1'
    before = {s: (folder / f'{s}.csv').read_text() for s in pp.SPLITS}
    mtime = (folder / 'test.csv').stat().st_mtime_ns
    make_root(tmp_path, {'neg': 14})  # four new images
    with caplog.at_level(logging.WARNING):
        again = pp.prepare_split(tmp_path, 0.2, 0.2, 1)
    assert again == folder and (folder / 'test.csv').stat().st_mtime_ns == mtime
    assert {s: (folder / f'{s}.csv').read_text() for s in pp.SPLITS} == before
    assert '4 image(s) were added and 0 removed' in caplog.text


# boxes at the image border: a 20 x 30 (h x w) image, box touching the top-left corner
IMG = np.arange(20 * 30, dtype=np.uint8).reshape(20, 30)
BOX = (0, 0, 6, 4)  # w 6, h 4


@pytest.mark.parametrize('mode,size,window', [
    ('PIXEL', 3, (-3, -3, 9, 7)),
    ('FIX', 10, (-2, -3, 8, 7)),      # 10 x 10 centred on the box
    ('FIX', 2, (0, 0, 6, 4)),         # box larger than the window: grown to the box
    ('FIX2', 2, (-2, -3, 8, 7)),      # side max(6, 4) + 4 = 10
])
def test_padding_modes_window(mode, size, window):
    assert im.crop_window(BOX, mode, size) == window


def test_crop_pads_past_border_without_shifting():
    window = im.crop_window(BOX, 'PIXEL', 3)
    crop = im.crop_with_padding(IMG, window)
    assert crop.shape == (10, 12)
    assert (crop[:3] == 0).all() and (crop[:, :3] == 0).all()  # padded, not shifted
    assert np.array_equal(crop[3:, 3:], IMG[:7, :9])
    # bottom-right corner
    crop = im.crop_with_padding(IMG, im.crop_window((26, 17, 30, 20), 'FIX2', 2))
    assert crop.shape == (8, 8) and np.array_equal(crop[:5, :6], IMG[15:20, 24:30]) and (crop[5:] == 0).all()
    rgb = np.stack([IMG] * 3, -1)
    assert im.crop_with_padding(rgb, (-2, -2, 3, 3)).shape == (5, 5, 3)


def test_shift_never_past_box():
    rng = np.random.default_rng(0)
    box = (10, 5, 16, 9)
    window = im.crop_window(box, 'FIX', 12)
    seen = set()
    for _ in range(200):
        w = im.shift_window(window, box, rng)
        assert w[2] - w[0] == window[2] - window[0] and w[3] - w[1] == window[3] - window[1]
        assert w[0] <= box[0] and w[1] <= box[1] and w[2] >= box[2] and w[3] >= box[3]
        seen.add(w)
    assert len(seen) > 10


def test_labelme_boxes_and_imsave(tmp_path):
    raw = make_root(tmp_path / 'raw', {'neg': 2, 'pos': 1}, size=(40, 50))
    shapes = [{'points': [[2, 3], [12, 9]]}, {'points': [[30, 20], [48, 38]]}]
    (raw / 'pos' / 'pos_0.json').write_text(json.dumps({'shapes': shapes}))
    args = pp.get_args_parser().parse_args(['--data_path', str(raw), '--output', str(tmp_path / 'out'),
                                            '--use_bbox', 'True', '--padding', 'PIXEL', '--padding_size', '2',
                                            '--imsave', 'True', '--test_val_ratio', '0', '0'])
    pp.main(args)
    df = pd.read_csv(tmp_path / 'out' / 'list.csv')
    crops = df[df['path'].str.startswith('crops/')]
    assert len(df) == 4 and len(crops) == 2
    sizes = sorted(cv2.imread(str(tmp_path / 'out' / p)).shape[:2] for p in crops['path'])
    assert sizes == [(10, 14), (22, 22)]
    assert all((tmp_path / 'out' / p).is_file() for p in df['path'])
