"""Build the sample list from raw data, split it train/val/test, and crop boxes with padding.

A *prepared root* is a folder holding ``list.csv`` (one row per sample) and, after a split, ``splits/<name>/
{train,val,test}.csv``. List columns: ``path`` (relative to the root, or absolute), ``label`` (amb_neg, amb_pos, neg,
pos), and optionally ``type`` (e.g. ELPV module type), ``defect_prob`` (annotated defect probability in [0, 1]),
``x1, y1, x2, y2`` (box in pixels, x2/y2 exclusive) and ``group`` (samples of one group share a split).

Usage:
    python preprocess_data.py --source elpv --output data/elpv
    python preprocess_data.py --data_path RAW --output data/mine --label_list crack=pos ok=neg \
        --use_bbox True --padding FIX2 --padding_size 16 --imsave True
"""
import argparse
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from imaging import (BOX_COLUMNS, IMAGE_EXTENSIONS, PADDING_MODES, crop_window, crop_with_padding, is_image,
                     read_image, write_image)
from labels import LABELS, parse_label_list
from utils import DataError, atomic_write_bytes, atomic_write_csv, read_csv, run_cli, str2bool

log = logging.getLogger('preprocess')

LIST_NAME = 'list.csv'
SPLITS = ('train', 'val', 'test')


def read_boxes_json(json_path):
    """Rectangles of a labelme-style JSON file (``shapes`` with two or more ``points``).

    Returns:
        list of [x1, y1, x2, y2] int pixel boxes (the bounding rectangle of each shape's points, x2/y2 exclusive).

    Raises:
        DataError: the file is not valid JSON or has no ``shapes`` list.
    """
    try:
        with open(json_path) as f:
            shapes = json.load(f)['shapes']
        boxes = []
        for shape in shapes:
            pts = np.asarray(shape['points'], dtype=np.float64).reshape(-1, 2)
            x1, y1 = np.floor(pts.min(0)).astype(int)
            x2, y2 = np.ceil(pts.max(0)).astype(int)
            boxes.append([int(x1), int(y1), max(int(x2), int(x1) + 1), max(int(y2), int(y1) + 1)])
        return boxes
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f'{json_path}: not a labelme-style box file ({e.__class__.__name__}: {e})') from None


def scan_class_folders(root, label_list=None):
    """Build the sample list of a raw root whose top-level folders name the classes.

    Each top-level folder is a label (or is mapped to one by ``label_list``); images anywhere below it belong to it.
    A labelme JSON file beside an image (same stem) adds its boxes as columns ``x1..y2`` (one row per box, ``group``
    = the image path).

    Args:
        root: folder with class folders.
        label_list: optional ``--label_list`` mapping (dict folder name -> label, or ``folder=label`` items).

    Returns:
        DataFrame with columns path (relative to root, '/'-separated), label[, x1, y1, x2, y2, group].

    Raises:
        DataError: root missing, no class folder, an unknown folder name, or an empty class folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f'{root}: data path does not exist or is not a folder')
    label_list = parse_label_list(label_list)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name not in ('splits', 'crops'))
    if not folders:
        raise DataError(f'{root}: no class folders (expected some of {", ".join(LABELS)})')
    unknown = [p.name for p in folders if p.name not in LABELS and p.name not in label_list]
    if unknown:
        raise DataError(f'{root}: unknown class folder(s) {", ".join(unknown)}; accepted names are '
                        f'{", ".join(LABELS)}, or map them with --label_list NAME=LABEL')
    rows = []
    for folder in folders:
        label = label_list.get(folder.name, folder.name)
        images = sorted(p for p in folder.rglob('*') if p.is_file() and is_image(p))
        if not images:
            raise DataError(f'{folder}: class folder holds no image ({", ".join(IMAGE_EXTENSIONS)})')
        for img in images:
            rel = img.relative_to(root).as_posix()
            boxes_file = img.with_suffix('.json')
            boxes = read_boxes_json(boxes_file) if boxes_file.is_file() else []
            if boxes:
                rows += [dict(path=rel, label=label, x1=b[0], y1=b[1], x2=b[2], y2=b[3], group=rel) for b in boxes]
            else:
                rows.append(dict(path=rel, label=label))
    check_cross_class_duplicates(root, rows)
    return pd.DataFrame(rows)


def check_cross_class_duplicates(root, rows):
    """Refuse one image (the same bytes) listed under two different labels: it would teach both answers.

    Files are compared by size first and hashed (BLAKE2b) only where sizes collide, so the usual case reads nothing.

    Args:
        root: Path of the raw root. rows: list of dicts with ``path`` (relative to root) and ``label``.
    Raises:
        DataError: naming the first two such files.
    """
    by_size = {}
    for r in rows:
        by_size.setdefault((root / r['path']).stat().st_size, []).append(r)
    seen = {}
    for group in by_size.values():
        if len({r['label'] for r in group}) < 2:
            continue
        for r in group:
            digest = hashlib.blake2b((root / r['path']).read_bytes(), digest_size=16).digest()
            first = seen.setdefault(digest, r)
            if first['label'] != r['label']:
                raise DataError(f'{root}: the same image is listed as {first["label"]} ({first["path"]}) and as '
                                f'{r["label"]} ({r["path"]}); keep it under one class')


def scan_plain_folder(root):
    """All images below ``root`` as an unlabelled sample list (column ``path``, relative to root).

    Raises:
        DataError: root missing or no image found.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f'{root}: data path does not exist or is not a folder')
    images = sorted(p.relative_to(root).as_posix() for p in root.rglob('*') if p.is_file() and is_image(p))
    if not images:
        raise DataError(f'{root}: no image found ({", ".join(IMAGE_EXTENSIONS)})')
    return pd.DataFrame({'path': images})


def validate_list(df, source):
    """Check a sample list and normalise its columns; returns the cleaned DataFrame.

    Raises:
        DataError: missing ``path`` column, unknown labels, boxes partly given or empty, defect_prob outside [0, 1].
    """
    if 'path' not in df.columns:
        raise DataError(f'{source}: sample list has no "path" column')
    if 'label' in df.columns:
        bad = sorted(set(df['label'].dropna().astype(str)) - set(LABELS))
        if bad:
            raise DataError(f'{source}: unknown label(s) {", ".join(bad)}; accepted: {", ".join(LABELS)}')
    present = [c for c in BOX_COLUMNS if c in df.columns]
    if present and len(present) != 4:
        raise DataError(f'{source}: box columns must be all of {", ".join(BOX_COLUMNS)}, got {", ".join(present)}')
    if present:
        has_box = df[BOX_COLUMNS].notna().all(axis=1)
        boxes = df.loc[has_box, BOX_COLUMNS].astype(float)
        if ((boxes['x2'] <= boxes['x1']) | (boxes['y2'] <= boxes['y1'])).any():
            raise DataError(f'{source}: some boxes are empty (x2 <= x1 or y2 <= y1)')
    if 'defect_prob' in df.columns and not df['defect_prob'].dropna().between(0, 1).all():
        raise DataError(f'{source}: defect_prob must lie in [0, 1]')
    if 'group' not in df.columns:
        df = df.assign(group=df['path'])
    df['group'] = df['group'].fillna(df['path'])
    return df.reset_index(drop=True)


def load_list(root, label_list=None):
    """Sample list of a root: its ``list.csv`` if present, else a scan of its class folders.

    Returns:
        DataFrame (see ``validate_list``), paths relative to root.

    Raises:
        DataError: see ``scan_class_folders`` and ``validate_list``.
    """
    root = Path(root)
    list_file = root / LIST_NAME
    if list_file.is_file():
        df = read_csv(list_file, 'sample list')
        return validate_list(df, list_file)
    return validate_list(scan_class_folders(root, label_list), root)


def drop_boxes(df):
    """One sample per image: the list without box columns, duplicate paths removed, each image its own group."""
    if not any(c in df.columns for c in BOX_COLUMNS):
        return df
    out = df.drop(columns=[c for c in BOX_COLUMNS if c in df.columns]).drop_duplicates('path')
    return out.assign(group=out['path']).reset_index(drop=True)


def split_name(test_ratio, val_ratio, seed):
    """Folder name of a split, encoding its ratios and seed, e.g. ``test0.25_val0.1_seed0``."""
    return f'test{test_ratio:g}_val{val_ratio:g}_seed{seed}'


def _strata(df):
    """Stratification key per row: label and type when every label/type cell has two or more rows, else label."""
    key = df['label'].astype(str)
    if 'type' in df.columns:
        combined = key + '|' + df['type'].astype(str)
        if combined.value_counts().min() >= 2:
            return combined
    return key


def _split_off(df, ratio, seed):
    """Split ``df`` into (rest, part) with about ``ratio`` of the rows in ``part``, stratified, groups kept whole.

    Uses scikit-learn's ``train_test_split`` (stratified) when every group has one row, else
    ``StratifiedGroupKFold`` with round(1 / ratio) folds, taking the first fold as the part.
    """
    if ratio <= 0 or len(df) == 0:
        return df, df.iloc[:0]
    strata = _strata(df)
    if df['group'].nunique() == len(df):
        try:
            rest, part = train_test_split(df, test_size=ratio, random_state=seed, stratify=strata)
        except ValueError:  # a class too small to stratify: fall back to a plain random split
            log.warning('a class has too few samples to stratify; splitting at random')
            rest, part = train_test_split(df, test_size=ratio, random_state=seed)
        return rest, part
    n_splits = max(2, round(1 / ratio))
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    rest_idx, part_idx = next(folds.split(df, strata, groups=df['group']))
    return df.iloc[rest_idx], df.iloc[part_idx]


def make_split(df, test_ratio, val_ratio, seed):
    """Split a sample list into train/val/test, stratified by label (and type), groups never divided.

    Args:
        df: sample list with ``label`` and ``group``.
        test_ratio, val_ratio: fractions of the whole list in [0, 1), summing to less than 1.
        seed: int random seed; the same list and seed give the same split.

    Returns:
        dict split name -> DataFrame, each sorted by path.

    Raises:
        DataError: ratios out of range.
    """
    if not (0 <= test_ratio < 1 and 0 <= val_ratio < 1 and test_ratio + val_ratio < 1):
        raise DataError(f'--test_val_ratio {test_ratio} {val_ratio}: each must lie in [0, 1) and sum to below 1')
    rest, test = _split_off(df, test_ratio, seed)
    train, val = _split_off(rest, val_ratio / (1 - test_ratio), seed)
    return {name: part.sort_values(['path'] + [c for c in BOX_COLUMNS if c in part.columns]).reset_index(drop=True)
            for name, part in zip(SPLITS, (train, val, test))}


def prepare_split(root, test_ratio, val_ratio, seed, label_list=None):
    """Make or reuse the split of a prepared (or raw class-folder) root.

    An existing ``root/splits/<split_name>/`` is reused unchanged, so experiments compare on the same images; when
    the list has gained or lost images since, a warning says how many.

    Returns:
        Path of the split folder holding train.csv, val.csv, test.csv.

    Raises:
        DataError: see ``load_list`` and ``make_split``.
    """
    root = Path(root)
    folder = root / 'splits' / split_name(test_ratio, val_ratio, seed)
    df = load_list(root, label_list)
    if all((folder / f'{s}.csv').is_file() for s in SPLITS):
        saved = set()
        for s in SPLITS:
            saved |= set(read_csv(folder / f'{s}.csv', 'split file', usecols=['path'])['path'])
        current = set(df['path'])
        added, removed = len(current - saved), len(saved - current)
        if added or removed:
            log.warning(f'{folder}: reusing the saved split, but {added} image(s) were added and {removed} removed '
                        f'since it was made; delete the folder to split again')
        else:
            log.info(f'reusing split {folder}')
        return folder
    parts = make_split(df, test_ratio, val_ratio, seed)
    for name, part in parts.items():
        atomic_write_csv(part, folder / f'{name}.csv')
    counts = {name: part['label'].value_counts().to_dict() for name, part in parts.items()}
    log.info(f'wrote split {folder}: ' + '; '.join(f'{n} {len(p)} {counts[n]}' for n, p in parts.items()))
    return folder


def export_elpv(output):
    """Export the installed ELPV data set (PyPI ``elpv-dataset``) into class folders plus ``list.csv``.

    Defect probabilities 0, 1/3, 2/3, 1 become neg, amb_neg, amb_pos, pos; the list keeps ``type`` (mono, poly)
    and ``defect_prob``. Images are copied as they are (300x300 8-bit grayscale PNG).

    Returns:
        DataFrame of the list written.

    Raises:
        DataError: the package is not installed, or its label file is unreadable.
    """
    try:
        import elpv_dataset
    except ImportError:
        raise DataError('--source elpv needs the package elpv-dataset (pip install elpv-dataset)') from None
    src = Path(elpv_dataset.__file__).parent / 'data'
    labels = pd.read_csv(src / 'labels.csv', sep=r'\s+', header=None, names=['path', 'defect_prob', 'type'])
    names = {0: 'neg', 1: 'amb_neg', 2: 'amb_pos', 3: 'pos'}
    output = Path(output)
    rows = []
    for path, prob, cell_type in labels.itertuples(index=False):
        label = names[int(round(prob * 3))]
        rel = f'{label}/{Path(path).name}'
        dst = output / rel
        if not dst.is_file():
            atomic_write_bytes((src / path).read_bytes(), dst)
        rows.append(dict(path=rel, label=label, type=cell_type, defect_prob=round(float(prob), 6)))
    df = pd.DataFrame(rows)
    atomic_write_csv(df, output / LIST_NAME)
    log.info(f'exported {len(df)} ELPV cells to {output}: {df["label"].value_counts().to_dict()}')
    return df


def save_crops(root, output, df, padding, padding_size):
    """Write each boxed sample's crop as an image file under ``output/crops/`` and return the list pointing at them.

    Returns:
        DataFrame with ``path`` relative to ``output`` (the crops) and without box columns; samples without a box keep
        their original image.

    Raises:
        DataError: an image cannot be read.
    """
    rows = []
    for i, row in enumerate(df.itertuples(index=False)):
        row = row._asdict()
        src = Path(row['path']) if Path(row['path']).is_absolute() else Path(root) / row['path']
        if all(pd.notna(row.get(c)) for c in BOX_COLUMNS):
            img = read_image(src, channels=3)
            crop = crop_with_padding(img, crop_window([row[c] for c in BOX_COLUMNS], padding, padding_size))
            rel = Path('crops') / row['label'] / f'{Path(row["path"]).stem}_{i:06d}.png'
            write_image(crop, Path(output) / rel)
            row['path'] = rel.as_posix()
        else:
            row['path'] = os.path.relpath(src.resolve(), Path(output).resolve())
        rows.append({k: v for k, v in row.items() if k not in BOX_COLUMNS})
    return pd.DataFrame(rows)


def get_args_parser():
    """Command-line flags of preprocess_data.py."""
    p = argparse.ArgumentParser('Build, split and crop the sample list', add_help=True)
    p.add_argument('--source', default='folders', choices=['folders', 'elpv'],
                   help='folders: class folders under --data_path; elpv: the installed elpv-dataset package')
    p.add_argument('--data_path', default=None, help='raw root with class folders (or a list.csv)')
    p.add_argument('--output', required=True, help='prepared root to write: list.csv and splits/')
    p.add_argument('--label_list', nargs='*', default=None, help='map folder names to labels, e.g. crack=pos ok=neg')
    p.add_argument('--test_val_ratio', nargs=2, type=float, default=[0.2, 0.1], metavar=('TEST', 'VAL'))
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--use_bbox', type=str2bool, default=False, help='one sample per box (labelme JSON or x1..y2)')
    p.add_argument('--padding', default='PIXEL', choices=PADDING_MODES)
    p.add_argument('--padding_size', type=float, default=0, help='pixels (rounded to whole pixels)')
    p.add_argument('--imsave', type=str2bool, default=False, help='write crops as image files under OUTPUT/crops/')
    return p


def main(args):
    """Run preprocessing; returns the split folder. Raises DataError on bad input."""
    output = Path(args.output)
    if args.source == 'elpv':
        export_elpv(output)
    else:
        if not args.data_path:
            raise DataError('--data_path is required with --source folders')
        df = load_list(args.data_path, parse_label_list(args.label_list))
        data_root = Path(args.data_path).resolve()
        has_box = all(c in df.columns for c in BOX_COLUMNS) and df[BOX_COLUMNS].notna().all(axis=1).any()
        if has_box and not args.use_bbox:
            df = drop_boxes(df)
        if has_box and args.use_bbox and args.imsave:
            df = save_crops(data_root, output, df, args.padding, args.padding_size)
        else:
            df = df.assign(path=[os.path.relpath(data_root / p, output.resolve()) if not Path(p).is_absolute()
                                 else p for p in df['path']])
        atomic_write_csv(df, output / LIST_NAME)
        log.info(f'wrote {len(df)} samples to {output / LIST_NAME}: {df["label"].value_counts().to_dict()}')
    folder = prepare_split(output, *args.test_val_ratio, args.seed)
    print(f'split: {folder}')
    return folder


if __name__ == '__main__':
    run_cli(lambda: main(get_args_parser().parse_args()))
