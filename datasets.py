"""The Dataset, its transforms (timm), and upsampling of rare classes.

Data flows: prepared root (``preprocess_data.py``) -> split CSVs -> ``load_splits`` (pandas) -> ``DefectDataset``.
Each item is (float32 image [C, H, W], int64 label index in ``softLabelLoss.LABELS`` order or -1 when unlabelled,
int64 sample index).
"""
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.utils.class_weight import compute_class_weight
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import Dataset, default_collate
from torchvision import transforms

from imaging import (BOX_COLUMNS, ImageReadError, crop_with_padding, decode_resized, read_image, sample_window,
                     shift_window)
from labels import LABEL_INDEX, LABELS, label_indices, parse_label_list
from preprocess_data import (SPLITS, load_list, prepare_split, scan_class_folders, scan_plain_folder,
                             validate_list)
from utils import DataError, atomic_write_bytes, read_csv

log = logging.getLogger('datasets')
cv2.setNumThreads(0)  # DataLoader workers already run in parallel


class PerImageStandardize:
    """Standardise each image to zero mean and unit variance over all its pixels (float tensor [C, H, W])."""

    def __call__(self, x):
        return (x - x.mean()) / x.std().clamp_min(1e-6)

    def __repr__(self):
        return 'PerImageStandardize()'


class RandomRot90:
    """Turn a PIL image by 90, 180 or 270 degrees (equally likely) with probability ``p``; exact (no resampling).

    Defect images (solar cells, wafers, tiles) have no up or down, so the turns with the flips give the eight
    symmetries of the square (the augmentation the published ELPV CNN used, Deitsch et al. 2019). Randomness comes
    from torch's RNG, so DataLoader workers are seeded as usual.
    """

    def __init__(self, p=0.5):
        self.p = float(p)

    def __call__(self, img):
        if self.p <= 0 or torch.rand(()).item() >= self.p:
            return img
        turn = (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)
        return img.transpose(turn[int(torch.randint(3, ()).item())])

    def __repr__(self):
        return f'RandomRot90(p={self.p})'


def _same_channels(arr):
    """True when an [H, W, C] array has C > 1 channels that are all equal (a grayscale image converted to RGB)."""
    return arr.shape[2] > 1 and all(np.array_equal(arr[..., 0], arr[..., i]) for i in range(1, arr.shape[2]))


class LocalContrast:
    """Contrast Limited Adaptive Histogram Equalisation (CLAHE; Zuiderveld, Graphics Gems IV, 1994; OpenCV's
    ``cv2.createCLAHE``) of a PIL image, per channel of an RGB one: thin dark lines (cracks in electroluminescence
    images) stand out against the slow brightness changes across a cell. A grayscale image converted to RGB (three
    equal channels) is equalised once and the result repeated: the same output in a third of the time.

    Args:
        clip_limit: contrast limit (OpenCV's clipLimit; > 0, 2 is usual).
        grid: tiles per side (the image is equalised in grid x grid regions, bilinearly blended).

    Raises:
        DataError: clip_limit <= 0 or grid < 1.
    """

    deterministic = True  # the same output for the same image: DefectDataset applies it once to cached images

    def __init__(self, clip_limit=2.0, grid=8):
        if not clip_limit > 0 or int(grid) < 1:
            raise DataError(f'--clahe must be > 0 and --clahe_grid >= 1, got {clip_limit} and {grid}')
        self.clip_limit, self.grid = float(clip_limit), int(grid)

    def __call__(self, img):
        # made per call (microseconds): OpenCV's CLAHE object cannot be pickled into DataLoader workers
        clahe = cv2.createCLAHE(clipLimit=self.clip_limit, tileGridSize=(self.grid, self.grid))
        arr = np.asarray(img)
        if arr.ndim == 2:
            return Image.fromarray(clahe.apply(arr))
        if _same_channels(arr):
            return Image.fromarray(cv2.merge([clahe.apply(np.ascontiguousarray(arr[..., 0]))] * arr.shape[2]))
        return Image.fromarray(np.dstack([clahe.apply(np.ascontiguousarray(arr[..., i])) for i in range(arr.shape[2])]))

    def __repr__(self):
        return f'LocalContrast(clip_limit={self.clip_limit}, grid={self.grid})'


class BlackHatChannel:
    """Replace the last channel of an RGB PIL image by the morphological black-hat of its first channel: the
    closing (dilation then erosion) with a ``kernel`` x ``kernel`` ellipse minus the image (Serra, Image Analysis
    and Mathematical Morphology, 1982; OpenCV's ``cv2.morphologyEx(..., cv2.MORPH_BLACKHAT)``). It responds to dark
    structures narrower than the kernel (cracks and finger interruptions in electroluminescence images, busbars)
    and is zero on flat regions and slow brightness changes, handing a from-scratch model a thin-line detector it
    would otherwise have to learn from few defective cells (on ELPV it did not raise the test figures: README).
    The response (uint8) is multiplied by ``gain`` and clipped to 255; the other two channels keep the image.
    Called on a PIL image (uint8 [H, W, 3]), returns a PIL image of the same size and mode.

    Args:
        kernel: ellipse diameter in pixels of the image as decoded (>= 3; 5 keeps 1-3 px cracks, 7 adds busbars).
        gain: factor on the response (black-hat values of ELPV cells are mostly below 60 of 255).

    Raises:
        DataError: kernel < 3 or gain <= 0.
    """

    deterministic = True  # see LocalContrast

    def __init__(self, kernel=5, gain=4.0):
        if int(kernel) < 3 or not gain > 0:
            raise DataError(f'--blackhat must be >= 3 pixels (0 = off) and its gain > 0, got {kernel} and {gain}')
        self.kernel, self.gain = int(kernel), float(gain)
        self.shape = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (self.kernel, self.kernel))  # a plain array

    def __call__(self, img):
        arr = np.asarray(img)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise DataError(f'--blackhat needs 3-channel input (--in_chans 3), got an image of shape {arr.shape}')
        response = cv2.morphologyEx(np.ascontiguousarray(arr[..., 0]), cv2.MORPH_BLACKHAT, self.shape)
        out = arr.copy()
        out[..., 2] = cv2.convertScaleAbs(response, alpha=self.gain)
        return Image.fromarray(out)

    def __repr__(self):
        return f'BlackHatChannel(kernel={self.kernel}, gain={self.gain})'


def build_transform(is_train, args):
    """timm transforms (``timm.data.create_transform``) for training or evaluation.

    ``--clahe`` (clip limit, 0 = off): ``LocalContrast`` first, on the decoded image, in training and evaluation;
    then ``--blackhat`` (kernel in pixels, 0 = off): ``BlackHatChannel`` as the third input channel.
    Training: ``--rot90`` turns (``RandomRot90``) and ``--rotation`` small rotations (torchvision
    ``RandomRotation``, degrees, zero fill) on the decoded image, then RandomResizedCrop(scale=``--scale``) to
    ``--input_size``, ``--hflip``/``--vflip``, ``--color_jitter``, ``--aa`` RandAugment, ``--reprob`` random erasing.
    Evaluation: resize to input_size / ``--crop_pct``, centre crop.
    Normalisation: ``--normalize imagenet`` (ImageNet mean/std) or ``per_image`` (``PerImageStandardize``).

    Returns:
        callable PIL image -> float32 tensor [in_chans, input_size, input_size].
    """
    per_image = args.normalize == 'per_image'
    c = args.in_chans
    mean = (0.0,) * c if per_image else (IMAGENET_DEFAULT_MEAN if c == 3 else (float(np.mean(IMAGENET_DEFAULT_MEAN)),))
    std = (1.0,) * c if per_image else (IMAGENET_DEFAULT_STD if c == 3 else (float(np.mean(IMAGENET_DEFAULT_STD)),))
    if is_train:
        tf = create_transform(args.input_size, is_training=True, scale=tuple(args.scale), hflip=args.hflip,
                              vflip=args.vflip, color_jitter=args.color_jitter or None,
                              auto_augment=args.aa if args.aa and args.aa.lower() != 'none' else None,
                              interpolation='bicubic', re_prob=args.reprob, re_mode='pixel', re_count=1,
                              mean=mean, std=std)
        geometric = ([RandomRot90(args.rot90)] if getattr(args, 'rot90', 0) > 0 else []) + \
            ([transforms.RandomRotation(args.rotation, interpolation=transforms.InterpolationMode.BILINEAR)]
             if getattr(args, 'rotation', 0) > 0 else [])
        tf = transforms.Compose([*geometric, tf]) if geometric else tf
    else:
        tf = create_transform(args.input_size, is_training=False, interpolation='bicubic', crop_pct=args.crop_pct,
                              mean=mean, std=std)
    steps = ([LocalContrast(args.clahe, getattr(args, 'clahe_grid', 8))] if getattr(args, 'clahe', 0) else []) + \
        ([BlackHatChannel(args.blackhat)] if getattr(args, 'blackhat', 0) else []) + \
        [tf] + ([PerImageStandardize()] if per_image else [])  # getattr: runs saved before --clahe / --blackhat
    return transforms.Compose(steps) if len(steps) > 1 else tf


def split_fixed_steps(transform):
    """The leading steps of a transform that give the same output for the same image every time (those whose
    class sets ``deterministic = True``: ``LocalContrast``, ``BlackHatChannel``) and the rest.

    Args:
        transform: callable PIL image -> tensor, a torchvision ``Compose`` (``build_transform``) or a single step.

    Returns:
        (``Compose`` of the fixed steps, or None when there are none; ``Compose`` of the remaining steps).
    """
    steps = list(transform.transforms) if isinstance(transform, transforms.Compose) else [transform]
    n = 0
    while n < len(steps) and getattr(steps[n], 'deterministic', False):
        n += 1
    return (transforms.Compose(steps[:n]) if n else None), transforms.Compose(steps[n:])


def apply_fixed_steps(images, steps, in_chans, threads=None):
    """``steps`` (``split_fixed_steps``' first part) applied once to cached images, so that each epoch starts
    from their result instead of computing it again (CLAHE is about half of a training sample's CPU time at 224 px).

    Args:
        images: list of uint8 arrays [H, W] or [H, W, 3] (or None for an unreadable image, kept as None).
        steps: callable PIL image -> PIL image. in_chans: 1 or 3, the mode the images are converted to first
            (``to_pil``).

    Returns:
        list of uint8 arrays: [H, W] where the result's channels are all equal (``to_pil`` repeats them again
        for 3-channel input, so memory stays that of a grayscale image), else [H, W, 3].
    """
    def work(img):
        if img is None:
            return None
        out = np.asarray(steps(to_pil(img, in_chans)))
        if out.ndim == 3 and _same_channels(out):
            out = np.ascontiguousarray(out[..., 0])
        return out

    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:  # OpenCV releases the GIL
        return list(pool.map(work, images))


def available_memory():
    """Bytes of physical memory available now (Linux ``sysconf``; 0 when unknown)."""
    try:
        return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError, AttributeError):
        return 0


def cache_side(input_size, crop_pct=1.0, min_crop_area=1.0):
    """Shorter side in pixels of cached images: just above what the transforms need, + 10%.

    Evaluation resizes to ``input_size / crop_pct``; training's RandomResizedCrop takes as little as
    ``min_crop_area`` (the lower end of ``--scale``) of the image and resizes it to ``input_size``, so it needs a
    shorter side of ``input_size / sqrt(min_crop_area)`` for the crop to be shrunk, never enlarged. The larger of the
    two is kept (images smaller than that are cached as they are).

    Raises:
        ValueError: crop_pct or min_crop_area not in (0, 1] (crop_pct above 1 is taken as 1).
    """
    if not crop_pct > 0 or not 0 < min_crop_area <= 1:
        raise ValueError(f'cache_side needs crop_pct > 0 and 0 < min_crop_area <= 1, got {crop_pct}, {min_crop_area}')
    need = max(input_size / min(crop_pct, 1.0), input_size / math.sqrt(min_crop_area))
    return int(math.ceil(need * 1.1))


class ImageCache:
    """Images decoded and resized once (``decode_resized``), in memory and optionally in a file.

    Entries are keyed by path and crop window and hold the file's size and modification time, so a changed file is
    decoded again. The file is a safetensors file (plain uint8 arrays, nothing in it can execute code) whose metadata
    holds a JSON index of the entries; it is written atomically and only when entries changed. A file that cannot be
    read, or whose index does not match its arrays, is reported in one line, ignored and rebuilt. Decoding runs in a
    thread pool (OpenCV releases the GIL).

    Args:
        side: shorter side in pixels of the cached images.
        path: optional cache file (``.safetensors``) to read and update.
    """

    def __init__(self, side, path=None):
        self.side, self.path, self.entries = int(side), (Path(path) if path else None), {}
        if self.path and self.path.is_file():
            try:
                self.entries = self.read(self.path, self.side)
            except Exception as e:  # safetensors, JSON and shape errors have no common base class
                log.warning(f'{self.path}: unreadable image cache ({e.__class__.__name__}), decoding the images '
                            f'again and rewriting it')

    @staticmethod
    def read(path, side):
        """Entries of a cache file: dict (path, window) -> ((size, mtime_ns), uint8 array or None).

        Returns an empty dict for a file made at another ``side``.

        Raises:
            ValueError: an index that does not describe the file's arrays; any safetensors or JSON error.
        """
        from safetensors import safe_open
        from safetensors.numpy import load_file
        with safe_open(str(path), framework='np') as f:
            meta = f.metadata() or {}
        if int(meta.get('side', -1)) != side:
            return {}
        arrays = load_file(str(path))
        entries = {}
        for item in json.loads(meta['index']):
            name, img = item['array'], None
            if name is not None:
                img = arrays[name]
                if img.dtype != np.uint8 or img.ndim not in (2, 3):
                    raise ValueError(f'array {name} is {img.dtype} with {img.ndim} dimensions')
            window = tuple(int(v) for v in item['window']) if item['window'] is not None else None
            entries[(str(item['path']), window)] = ((int(item['size']), int(item['mtime_ns'])), img)
        return entries

    @staticmethod
    def stamp(path):
        """(size in bytes, modification time in ns) of a file, or None when it is missing."""
        try:
            st = os.stat(path)
            return st.st_size, st.st_mtime_ns
        except OSError:
            return None

    def images(self, paths, windows, threads=None):
        """Cached images of the samples, decoding the ones missing or changed.

        Args:
            paths: list of image paths. windows: list of crop windows (or None), same length.

        Returns:
            list of uint8 arrays, None where an image could not be read (logged with its path).
        """
        keys = [(str(p), tuple(w) if w is not None else None) for p, w in zip(paths, windows)]
        stamps = [self.stamp(p) for p in paths]
        todo = dict(sorted(((k, st) for k, st in zip(keys, stamps) if st is not None and
                            (k not in self.entries or self.entries[k][0] != st)), key=lambda kv: str(kv[0])))

        def work(key):
            try:
                return key, decode_resized(key[0], self.side, key[1])
            except ImageReadError as e:
                log.warning(f'skipped image {e}')
                return key, None

        if todo:
            t0 = time.time()
            with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
                for key, img in pool.map(work, todo):
                    self.entries[key] = (todo[key], img)
            log.info(f'decoded {len(todo)} image(s) at {self.side} px in {time.time() - t0:.1f}s'
                     + (f', cache {self.path}' if self.path else ''))
            if self.path:
                self.save()
        return [self.entries[k][1] if st is not None else None for k, st in zip(keys, stamps)]

    def save(self):
        """Write the cache file atomically: the arrays, and the index as JSON in the safetensors metadata."""
        from safetensors.numpy import save
        arrays, index = {}, []
        for i, ((path, window), ((size, mtime_ns), img)) in enumerate(self.entries.items()):
            name = None if img is None else f'i{i}'
            if name is not None:
                arrays[name] = np.ascontiguousarray(img)
            index.append({'path': path, 'window': list(window) if window is not None else None, 'size': size,
                          'mtime_ns': mtime_ns, 'array': name})
        atomic_write_bytes(save(arrays, metadata={'side': str(self.side), 'index': json.dumps(index)}), self.path)


def cache_fits(n_images, side, fraction=0.25):
    """True if ``n_images`` grayscale images of side x side pixels take less than ``fraction`` of free memory."""
    return n_images * side * side * 1.2 < fraction * available_memory()


class DefectDataset(Dataset):
    """Images of a sample list, optionally cropped to their boxes and decoded once into a cache.

    Args:
        frame: DataFrame with ``path`` (absolute), optional ``label`` (LABELS names), optional box columns.
        transform: callable PIL image -> float32 tensor [C, H, W].
        in_chans: 3 (RGB) or 1 (grayscale).
        padding, padding_size: box crop mode and size (see ``preprocess_data.crop_window``); used for rows with a box.
        use_shift: move each crop window at random, never past its box (training only; such crops are not cached).
        strict: raise on an unreadable image instead of skipping it.
        cache: optional ``ImageCache``: images are decoded and resized once, augmentation runs on the cached copies;
            the transform's leading deterministic steps (``split_fixed_steps``: CLAHE, black-hat) run once on them
            here, the rest each time an item is read.

    Items: (float32 tensor [C, H, W], int64 label index or -1, int64 sample index), or None for a skipped image
    (``collate_skip`` drops those).
    """

    def __init__(self, frame, transform, in_chans=3, padding='PIXEL', padding_size=0, use_shift=False, strict=False,
                 cache=None):
        self.frame = frame.reset_index(drop=True)
        self.paths = self.frame['path'].tolist()
        self.labels = label_indices(self.frame['label'] if 'label' in self.frame.columns else [None] * len(frame))
        has_box = all(c in self.frame.columns for c in BOX_COLUMNS)
        self.boxes = self.frame[BOX_COLUMNS].to_numpy(np.float64) if has_box else None
        self.transform, self.in_chans = transform, in_chans
        self.padding, self.padding_size, self.use_shift, self.strict = padding, padding_size, use_shift, strict
        self.reported = set()
        self.cached = None
        if cache is not None and not (use_shift and self.boxes is not None):
            windows = [sample_window(None if self.boxes is None else self.boxes[i], padding, padding_size)
                       for i in range(len(self.paths))]
            self.cached = cache.images(self.paths, windows)
            bad = [i for i, img in enumerate(self.cached) if img is None]
            if bad and strict:
                raise ImageReadError(f'{self.paths[bad[0]]}: cannot be read (and {len(bad) - 1} more)')
            self.reported.update(bad)
            fixed, rest = split_fixed_steps(transform)
            if fixed is not None:  # e.g. CLAHE: once here rather than every epoch
                t0 = time.time()
                self.cached, self.transform = apply_fixed_steps(self.cached, fixed, in_chans), rest
                log.info(f'{", ".join(map(repr, fixed.transforms))} applied once to {len(self.cached)} cached '
                         f'image(s) in {time.time() - t0:.1f}s')

    def __len__(self):
        return len(self.paths)

    def load(self, index):
        """uint8 image array of sample ``index``, cropped to its box when it has one (from the cache: after the
        transform's fixed steps, see ``split_fixed_steps``). Raises ImageReadError."""
        if self.cached is not None:
            img = self.cached[index]
            if img is None:
                raise ImageReadError(f'{self.paths[index]}: cannot be decoded (corrupt or unsupported)')
            return img
        img = read_image(self.paths[index], self.in_chans)
        box = None if self.boxes is None else self.boxes[index]
        window = sample_window(box, self.padding, self.padding_size)
        if window is not None:
            if self.use_shift:
                window = shift_window(window, box, np.random.default_rng(torch.randint(2**31, ()).item()))
            img = crop_with_padding(img, window)
        return img

    def __getitem__(self, index):
        try:
            img = self.load(index)
        except ImageReadError as e:
            if self.strict:
                raise
            if index not in self.reported:
                log.warning(f'skipped image {e}')
                self.reported.add(index)
            return None
        return to_tensor(img, self.in_chans, self.transform), torch.tensor(self.labels[index]), torch.tensor(index)


def to_pil(img, in_chans):
    """A decoded uint8 image ([H, W] or [H, W, 3] RGB) as a PIL image in grayscale (``in_chans`` 1) or RGB (3)."""
    pil = Image.fromarray(img)
    if in_chans == 1 and pil.mode != 'L':
        pil = pil.convert('L')
    elif in_chans == 3 and pil.mode != 'RGB':
        pil = pil.convert('RGB')
    return pil


def to_tensor(img, in_chans, transform):
    """A decoded uint8 image ([H, W] or [H, W, 3] RGB) -> the model's input tensor [in_chans, S, S] (float32):
    ``to_pil``, then ``transform`` (``build_transform``)."""
    return transform(to_pil(img, in_chans))


def collate_skip(batch):
    """``default_collate`` after dropping skipped (None) items; returns None when the whole batch was skipped."""
    batch = [b for b in batch if b is not None]
    return default_collate(batch) if batch else None


def check_files_exist(frame, source):
    """Raise DataError listing the first few files of ``frame`` that are missing from disk."""
    missing = [p for p in frame['path'] if not Path(p).is_file()]
    if missing:
        shown = ', '.join(missing[:5]) + (' ...' if len(missing) > 5 else '')
        raise DataError(f'{source}: {len(missing)} listed file(s) missing from disk: {shown}')


def _absolute(frame, base):
    """Make ``path`` absolute, relative paths being taken from ``base``."""
    base = Path(base).resolve()
    return frame.assign(path=[str(p) if Path(p).is_absolute() else str((base / p).resolve()) for p in frame['path']])


def _read_split_csv(path):
    """A split's CSV as a validated sample list; it must have ``path`` and ``label`` columns.

    Raises:
        DataError: unreadable file, a missing column, or a bad value (one line naming the file).
    """
    frame = validate_list(read_csv(path, 'split file'), path)
    if 'label' not in frame.columns:
        raise DataError(f'{path}: split file has no "label" column (columns: {", ".join(map(str, frame.columns))})')
    return frame


def is_split_folder(path):
    """True if ``path`` holds train.csv, val.csv and test.csv."""
    return all((Path(path) / f'{s}.csv').is_file() for s in SPLITS)


def load_splits(data_paths, test_val_ratio=(0.2, 0.1), seed=0, label_list=None):
    """Train/val/test sample lists of one or more data roots (their union), paths made absolute.

    Each path is either a split folder (train.csv, val.csv, test.csv) or a root prepared by preprocess_data.py or
    holding class folders, whose split is made or reused (``preprocess_data.prepare_split``).

    Returns:
        dict 'train'/'val'/'test' -> DataFrame (columns of the lists, ``path`` absolute).

    Raises:
        DataError: a missing path, bad list, or split files listing images missing from disk.
    """
    parts = {s: [] for s in SPLITS}
    for data_path in data_paths:
        data_path = Path(data_path)
        if not data_path.exists():
            raise DataError(f'{data_path}: data path does not exist')
        folder = data_path if is_split_folder(data_path) else prepare_split(data_path, *test_val_ratio, seed,
                                                                            label_list)
        # split CSV paths are relative to the prepared root (two levels above a split folder inside splits/)
        base = folder.parent.parent if folder.parent.name == 'splits' else folder
        for s in SPLITS:
            frame = _absolute(_read_split_csv(folder / f'{s}.csv'), base)
            check_files_exist(frame, folder / f'{s}.csv')
            parts[s].append(frame)
    return {s: pd.concat(frames, ignore_index=True) for s, frames in parts.items()}


def load_eval_frame(data_path, split='test', test_val_ratio=(0.2, 0.1), seed=0, label_list=None):
    """Sample list to evaluate or predict on.

    A split folder or prepared root gives its ``split`` ('train', 'val', 'test'; 'all' = every listed sample); a
    folder of class folders gives all its images with their labels; any other folder gives all images below it,
    unlabelled.

    Returns:
        DataFrame with absolute ``path`` (and ``label`` etc. when known).

    Raises:
        DataError: a missing path, no image, or listed files missing from disk.
    """
    data_path = Path(data_path)
    if not data_path.exists():
        raise DataError(f'{data_path}: data path does not exist')
    if is_split_folder(data_path) or (data_path / 'list.csv').is_file():
        if split == 'all':
            frame = _absolute(load_list(data_path, label_list), data_path)
        else:
            frame = load_splits([data_path], test_val_ratio, seed, label_list)[split]
    elif any(p.is_dir() and (p.name in LABELS or p.name in parse_label_list(label_list)) for p in data_path.iterdir()):
        frame = _absolute(validate_list(scan_class_folders(data_path, label_list), data_path), data_path)
    else:
        frame = _absolute(scan_plain_folder(data_path), data_path)
    check_files_exist(frame, data_path)
    if not len(frame):
        raise DataError(f'{data_path}: the {split} split is empty')
    return frame


def label_counts(frame):
    """dict label -> count, in LABELS order, labels absent from ``frame`` omitted."""
    counts = frame['label'].value_counts()
    return {k: int(counts[k]) for k in LABELS if k in counts}


def upsample(frame, factors, seed=0):
    """Repeat the rows of each class by a factor (``--upsample amb_neg amb_pos neg pos``).

    A factor f >= 0 keeps floor(f) copies of every row plus a random (seeded) fraction f - floor(f) of the rows;
    f = 1 leaves a class as it is, 0 drops it. Counts before and after are logged.

    Args:
        frame: DataFrame with ``label``.
        factors: 4 floats in LABELS order, or None for no change.
        seed: int.

    Returns:
        DataFrame (new index).

    Raises:
        DataError: not 4 factors, or a negative one.
    """
    if not factors:
        return frame
    if len(factors) != 4 or any(f < 0 for f in factors):
        raise DataError(f'--upsample takes 4 factors >= 0 ({" ".join(LABELS)}), got {factors}')
    rng = np.random.default_rng(seed)
    parts = []
    for label, f in zip(LABELS, factors):
        rows = frame[frame['label'] == label]
        whole, frac = int(f), f - int(f)
        parts += [rows] * whole
        if frac > 0 and len(rows):
            parts.append(rows.iloc[np.sort(rng.choice(len(rows), int(round(frac * len(rows))), replace=False))])
    out = pd.concat(parts + [frame[~frame['label'].isin(LABELS)]], ignore_index=True)
    log.info(f'upsample {factors}: train counts {label_counts(frame)} -> {label_counts(out)}')
    return out


def balanced_label_weights(frame):
    """Per-label loss weights n / (k * n_label) (scikit-learn ``compute_class_weight('balanced')``).

    Returns:
        float32 tensor [4] in LABELS order; labels absent from ``frame`` get weight 1.
    """
    present = np.array([k for k in LABELS if (frame['label'] == k).any()])
    weights = compute_class_weight('balanced', classes=present, y=frame['label'].to_numpy())
    out = torch.ones(len(LABELS))
    for k, w in zip(present, weights):
        out[LABEL_INDEX[k]] = float(w)
    return out


__all__ = ['DefectDataset', 'ImageCache', 'LocalContrast', 'PerImageStandardize', 'RandomRot90',
           'apply_fixed_steps', 'balanced_label_weights', 'build_transform', 'cache_fits', 'cache_side',
           'check_files_exist', 'collate_skip', 'is_split_folder', 'label_counts', 'load_eval_frame', 'load_splits',
           'split_fixed_steps', 'to_pil', 'to_tensor', 'upsample']
