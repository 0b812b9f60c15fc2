"""Reading images and cutting windows out of them: the one place where image files become uint8 arrays.

Boxes and windows are (x1, y1, x2, y2) int pixels, x2/y2 exclusive. Both the sample-list builder
(``preprocess_data.py``) and the Dataset (``datasets.py``) use these functions, so a crop written to disk with
``--imsave`` and a crop taken at training time are the same pixels.
"""
from pathlib import Path

import cv2
import numpy as np

from utils import atomic_write_bytes

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
PADDING_MODES = ('PIXEL', 'FIX', 'FIX2')
BOX_COLUMNS = ['x1', 'y1', 'x2', 'y2']


def is_image(path):
    """True if ``path`` has an image extension we read (png, jpg, jpeg, bmp, tif, tiff, any case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


class ImageReadError(Exception):
    """An image file is missing, unreadable or corrupt."""


MAX_IMAGE_PIXELS = 100_000_000  # 10000 x 10000; larger files are refused before decoding (bounded memory)


def header_size(data):
    """(width, height) from an encoded image's header without decoding its pixels (Pillow), or None if unknown."""
    import io
    import warnings

    from PIL import Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            with Image.open(io.BytesIO(data)) as im:
                return im.size
    except Image.DecompressionBombError:
        return (MAX_IMAGE_PIXELS, 2)  # beyond Pillow's own limit, so beyond ours
    except Exception:  # a format Pillow does not know (OpenCV may): no size known before decoding
        return None


def read_image(path, channels=3):
    """Read an image file with OpenCV as uint8, whatever its depth and channels, turned upright by its EXIF orientation.

    The file is read as bytes and decoded by ``decode_image``, so any file name works (spaces, names that are not
    UTF-8).

    Args:
        path: image file.
        channels: 3 for RGB [H, W, 3], 1 for grayscale [H, W], None to keep a grayscale image [H, W] and give a
            colour one as RGB.

    Returns:
        uint8 numpy array.

    Raises:
        ImageReadError: missing, empty, too large, unreadable or corrupt file (message names the file).
    """
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except (OSError, ValueError) as e:
        reason = 'file not found' if not Path(path).is_file() else f'unreadable ({e.__class__.__name__})'
        raise ImageReadError(f'{path}: {reason}') from None
    return decode_image(data, path, channels)


def decode_image(data, name, channels=3):
    """Decode an encoded image (the bytes of a PNG, JPEG, BMP or TIFF file) as uint8, turned upright by its EXIF
    orientation.

    Grayscale, BGR, BGRA (alpha dropped), palette and CMYK images are converted; 16-bit images are scaled to 8 bits
    (value / 257, so 65535 -> 255, never clipped); float images in [0, 1] are scaled by 255. An image of more than
    ``MAX_IMAGE_PIXELS`` pixels is refused from its header, before decoding (bounded memory).

    Args:
        data: bytes or uint8 numpy array [N] of the encoded file. name: the file's name for messages.
        channels: as ``read_image``.
    Returns:
        uint8 numpy array [H, W] or [H, W, 3] (RGB).
    Raises:
        ImageReadError: empty, too large or undecodable data (message names ``name``).
    """
    data = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray)) else data
    if data.size == 0:
        raise ImageReadError(f'{name}: empty file (0 bytes)')
    size = header_size(data)
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise ImageReadError(f'{name}: {size[0]}x{size[1]} pixels, more than the {MAX_IMAGE_PIXELS:,} read')
    img = cv2.imdecode(data, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if img is None or img.size == 0:
        raise ImageReadError(f'{name}: cannot be decoded (corrupt or unsupported)')
    if img.dtype == np.uint16:
        img = np.round(img.astype(np.float32) / 257.0).astype(np.uint8)
    elif img.dtype in (np.float32, np.float64):
        img = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ImageReadError(f'{name}: unsupported pixel type {img.dtype}')
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        return img if channels in (1, None) else cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    channels = channels or 3
    code = {(3, 3): cv2.COLOR_BGR2RGB, (4, 3): cv2.COLOR_BGRA2RGB,
            (3, 1): cv2.COLOR_BGR2GRAY, (4, 1): cv2.COLOR_BGRA2GRAY}[(img.shape[2], channels)]
    return cv2.cvtColor(img, code)


def crop_window(box, mode, padding_size):
    """Window (x1, y1, x2, y2) around a box for a padding mode; it may reach past the image border.

    Modes: PIXEL grows the box by ``padding_size`` px per side; FIX takes a padding_size x padding_size window centred
    on the box, grown to the box in a dimension where the box is larger; FIX2 a square of side
    max(w, h) + 2 * padding_size centred on the box.

    Args:
        box: (x1, y1, x2, y2) int pixels, x2/y2 exclusive.
        mode: one of ``PADDING_MODES``.
        padding_size: pixels >= 0, int or float (the original scripts pass 100.0); rounded to whole pixels.

    Returns:
        tuple of 4 ints.

    Raises:
        ValueError: unknown mode or negative padding_size.
    """
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    if not padding_size >= 0:
        raise ValueError(f'--padding_size must be >= 0, got {padding_size}')
    p = int(round(padding_size))
    if mode == 'PIXEL':
        return x1 - p, y1 - p, x2 + p, y2 + p
    w, h = x2 - x1, y2 - y1
    if mode == 'FIX':
        ww, wh = max(p, w), max(p, h)
    elif mode == 'FIX2':
        ww = wh = max(w, h) + 2 * p
    else:
        raise ValueError(f'--padding must be one of {", ".join(PADDING_MODES)}, got {mode}')
    # centre the window; the odd pixel left over goes to the right/bottom side
    wx1, wy1 = x1 - (ww - w) // 2, y1 - (wh - h) // 2
    return wx1, wy1, wx1 + ww, wy1 + wh


def shift_window(window, box, rng):
    """Move a window at random so that it still contains the whole box (train-time ``--use_shift``).

    Args:
        window, box: (x1, y1, x2, y2) int pixels, the window containing the box.
        rng: ``numpy.random.Generator``.

    Returns:
        the shifted window, same size.
    """
    wx1, wy1, wx2, wy2 = window
    bx1, by1, bx2, by2 = (int(round(v)) for v in box)
    dx = int(rng.integers(min(0, bx2 - wx2), max(0, bx1 - wx1) + 1))
    dy = int(rng.integers(min(0, by2 - wy2), max(0, by1 - wy1) + 1))
    return wx1 + dx, wy1 + dy, wx2 + dx, wy2 + dy


def crop_with_padding(img, window):
    """Cut a window out of an image, padding with zeros where it passes the border (never shifting it).

    Args:
        img: uint8 array [H, W] or [H, W, C].
        window: (x1, y1, x2, y2) int pixels; may reach outside the image.

    Returns:
        uint8 array [y2 - y1, x2 - x1(, C)].
    """
    h, w = img.shape[:2]
    x1, y1, x2, y2 = window
    inner = img[max(y1, 0):min(y2, h), max(x1, 0):min(x2, w)]
    top, left = max(0, -y1), max(0, -x1)
    bottom, right = (y2 - y1) - top - inner.shape[0], (x2 - x1) - left - inner.shape[1]
    if inner.size == 0:  # window wholly outside the image
        return np.zeros((y2 - y1, x2 - x1) + img.shape[2:], dtype=img.dtype)
    return cv2.copyMakeBorder(inner, top, bottom, left, right, cv2.BORDER_CONSTANT, value=0)


def sample_window(box, padding, padding_size):
    """Crop window of a sample's box (None for a sample without one)."""
    if box is None or np.isnan(box).any():
        return None
    return crop_window(box, padding, padding_size)


def decode_resized(path, side, window=None):
    """Decode an image once for the cache: crop it to ``window`` and shrink it so its shorter side is ``side``.

    Grayscale images stay single-channel (uint8 [h, w]) to save memory, colour ones are RGB [h, w, 3]. Shrinking
    uses OpenCV's area interpolation; smaller images are kept as they are.

    Raises:
        ImageReadError.
    """
    img = read_image(path, channels=None)
    if window is not None:
        img = crop_with_padding(img, window)
    h, w = img.shape[:2]
    scale = side / min(h, w)
    if scale < 1:
        img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return img


def write_image(img, path):
    """Write a uint8 image (RGB [H, W, 3] or grayscale [H, W]) as a file, atomically; the format follows the suffix.

    Raises:
        ImageReadError: OpenCV cannot encode the image in that format (message names the file).
    """
    bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 else img
    ok, buf = cv2.imencode(Path(path).suffix or '.png', bgr)
    if not ok:
        raise ImageReadError(f'{path}: cannot encode the image as {Path(path).suffix}')
    atomic_write_bytes(buf.tobytes(), path)


