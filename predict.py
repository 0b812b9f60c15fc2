"""Predictions of trained checkpoints on a data folder: one checkpoint, or several averaged (an ensemble).

    from predict import predict_ensemble
    probs, indices, frame, run_args = predict_ensemble(['output/elpv/checkpoint-best.pth'], 'data/elpv', args,
                                                       explicit=set(), device=torch.device('cpu'))

Each checkpoint is rebuilt with the architecture and preprocessing flags it was trained with
(``checkpoint.load_for_inference``); the images go through the same Dataset and transforms as in training.
"""
import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from calibration import apply_temperature
from checkpoint import effective_args, load_for_inference
from datasets import build_transform, load_eval_frame, to_tensor
from distributed import main_first
from engine import DeviceSettings, predict_probs, tta_mode
from flags import get_args_parser
from imaging import ImageReadError, read_image
from labels import defect_probability, head_classes
from runtime import (device_settings, eval_cache, make_dataset, make_loader, prepare_model, resolve_device,
                     split_seed)
from utils import DataError

METADATA_KEY = 'convnext_softlabel'  # the ONNX metadata entry export.py writes: the checkpoint's flags as JSON


class OnnxClassifier(torch.nn.Module):
    """An exported file run by onnxruntime behind the module interface prediction mode calls.

    Its forward returns log-probabilities, so that the softmax prediction mode applies gives back the file's
    probabilities. Input float32 [B, C, H, W]; output float32 [B, K].
    """

    def __init__(self, path):
        super().__init__()
        import onnxruntime
        self.session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])

    def forward(self, x):
        """[B, C, H, W] images -> [B, K] log-probabilities (CPU tensor)."""
        probs = self.session.run(None, {'image': x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(np.log(np.clip(probs, 1e-12, 1.0)))


def load_onnx(path, args, explicit):
    """An exported file as (OnnxClassifier, effective flags), like ``checkpoint.load_for_inference``.

    The file's saved flags complete ``args`` unless given on the command line; ``temperature`` is 1.0 (already in
    the graph) and ``threshold`` the exported checkpoint's; precision is fp32, contiguous, on CPU.

    Raises:
        DataError: onnxruntime missing, or a file that is not an export of this tool.
    """
    try:
        import onnx
        model = OnnxClassifier(path)
    except ImportError:
        raise DataError('--resume FILE.onnx needs onnx and onnxruntime: pip install onnx onnxruntime') from None
    except Exception as e:  # onnxruntime raises its own exception types for unreadable files
        raise DataError(f'{path}: unreadable ONNX file ({e.__class__.__name__})') from None
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if METADATA_KEY not in props:
        raise DataError(f'{path}: not an export of export.py (no {METADATA_KEY} metadata)')
    saved = json.loads(props[METADATA_KEY])
    run_args = effective_args(args, saved, explicit)
    run_args.temperature, run_args.threshold = 1.0, saved.get('threshold')
    run_args.use_amp, run_args.channels_last, run_args.compile, run_args.device = False, False, False, 'cpu'
    return model.eval(), run_args


@dataclass
class Member:
    """A loaded model of a Predictor: its file, effective flags (with ``temperature`` and ``threshold``), device
    settings and the module to call."""
    path: str
    run_args: argparse.Namespace
    dev: DeviceSettings
    model: torch.nn.Module


def load_member(path, args, explicit, device):
    """One model of a Predictor: a checkpoint (``checkpoint.load_for_inference``, precision chosen for the machine)
    or an ONNX file (``load_onnx``, fp32 on CPU).

    Returns:
        Member.
    """
    if Path(path).suffix == '.onnx':
        model, run_args = load_onnx(path, args, explicit)
        dev = DeviceSettings(torch.device('cpu'), False, 'bfloat16', False)
        return Member(str(path), run_args, dev, model)
    model, run_args = load_for_inference(path, args, explicit)
    dev = device_settings(run_args, device, inference=True)
    return Member(str(path), run_args, dev, prepare_model(model, run_args, dev))


class Predictor:
    """One or several checkpoints (or ONNX files of export.py) loaded once; class probabilities and P(defect) of
    image files, arrays or a data folder. Several files are an ensemble: their probabilities are averaged.

        from predict import Predictor
        predictor = Predictor(['output/elpv/checkpoint-best.pth'])
        table = predictor.predict(['cells/a.png', 'cells/b.png', array])   # file paths or uint8 arrays
        table[['name', 'p_defect', 'label']]

    Each file is rebuilt with the architecture and preprocessing flags it was trained with, and its ``--calibrate``
    temperature is applied. Prediction mode (``main.py --pred``/``--eval``) goes through ``predict_frame``.

    Args:
        paths: list of checkpoint or .onnx files.
        args: argparse.Namespace of main.py's flags (default: their defaults); ``explicit``: names of flags that win
            over the files' own (the ones a user typed). device: torch.device (default ``--device``).
        conf: threshold on P(defect) (default: the file's ``--target_recall`` threshold when there is one file and
            it has one, else ``args.conf``).
    Raises:
        DataError: an unreadable file, or files with different head sizes.
    """

    def __init__(self, paths, args=None, explicit=(), device=None, conf=None):
        self.args = args if args is not None else get_args_parser().parse_args([])
        device = device if device is not None else resolve_device(self.args.device)
        self.members = [load_member(p, self.args, set(explicit), device) for p in paths]
        for m in self.members[1:]:
            if m.run_args.nb_classes != self.members[0].run_args.nb_classes:
                raise DataError(f'{m.path}: an ensemble needs files with the same --nb_classes')
        self.run_args = self.members[-1].run_args
        own = self.members[0].run_args.threshold if len(self.members) == 1 else None  # a member's is its own
        self.threshold = conf if conf is not None else (own if own is not None else self.args.conf)
        self.classes = head_classes(self.run_args.nb_classes)

    def predict_frame(self, data, frame=None):
        """Class probabilities over a data folder's images through DataLoaders (prediction mode).

        Args:
            data: data folder (prepared root, split folder, class folders or plain images).
            frame: optional sample list (default: ``--eval_split`` of ``data``, split as the first file's run was).
        Returns:
            (mean probs float32 [N', C], indices int64 [N'] into the sample list, the sample list (DataFrame)).
        Raises:
            DataError: a bad data folder, or members that read different images (an unreadable one).
        """
        total, indices = None, None
        for m in self.members:
            args = m.run_args
            if frame is None:
                frame = main_first(lambda: load_eval_frame(data, self.args.eval_split, args.test_val_ratio,
                                                           split_seed(args), args.label_list))
            dataset = main_first(lambda: make_dataset(frame, args, False, eval_cache(data, args, len(frame))))
            probs, idx = predict_probs(m.model, make_loader(dataset, args, m.dev.device, False), m.dev,
                                       f'predict {Path(m.path).name}', tta=tta_mode(self.args.tta, args.rot90))
            if indices is not None and not np.array_equal(idx, indices):
                raise DataError(f'{m.path}: models saw different images (a corrupt image?); predict them one by one')
            indices, frame = idx, dataset.frame
            probs = apply_temperature(probs, args.temperature)
            total = probs if total is None else total + probs
        return total / len(self.members), indices, frame

    def predict(self, images, names=None, batch_size=32):
        """P(defect), label at the threshold and class probabilities of images in memory or on disk.

        Args:
            images: list of image file paths and/or uint8 arrays [H, W] or [H, W, 3] (RGB).
            names: optional names for the table (default: the paths, ``image_<i>`` for arrays).
        Returns:
            pandas.DataFrame, one row per image: name, p_<class> per head class, p_defect, label ('pos' when
            P(defect) >= threshold, else 'neg'), threshold.
        Raises:
            DataError: an unreadable image file (naming it) or an array that is not an image.
        """
        names = list(names) if names is not None else \
            [str(x) if isinstance(x, (str, Path)) else f'image_{i}' for i, x in enumerate(images)]
        arrays = [self._read(x) for x in images]
        total = 0
        for m in self.members:
            args, transform = m.run_args, build_transform(False, m.run_args)
            batches = ((torch.stack([to_tensor(a, args.in_chans, transform) for a in arrays[s:s + batch_size]]),
                        None, torch.arange(s, min(s + batch_size, len(arrays))))
                       for s in range(0, len(arrays), batch_size))  # what a DataLoader yields, for predict_probs
            probs, _ = predict_probs(m.model, batches, m.dev, 'predict', tta=tta_mode(self.args.tta, args.rot90))
            probs = probs if len(arrays) else np.zeros((0, len(self.classes)), np.float32)
            total = total + apply_temperature(probs, args.temperature)
        probs = total / len(self.members)
        table = pd.DataFrame({'name': names})
        for i, c in enumerate(self.classes):
            table[f'p_{c}'] = probs[:, i] if len(probs) else []
        table['p_defect'] = defect_probability(probs) if len(probs) else []
        table['label'] = np.where(table['p_defect'] >= self.threshold, 'pos', 'neg')
        table['threshold'] = self.threshold
        return table

    def cams(self, images):
        """Grad-CAM overlays of P(defect) (``cam.overlays``) of the first model, on its input size.

        Args:
            images: list of image file paths and/or uint8 arrays, as ``predict`` takes.
        Returns:
            list of uint8 RGB arrays [S, S, 3].
        Raises:
            DataError: the first model is an ONNX file (no gradients), or an unreadable image.
        """
        from cam import overlays
        m = self.members[0]
        if isinstance(m.model, OnnxClassifier):
            raise DataError(f'{m.path}: Grad-CAM needs a PyTorch checkpoint, not an ONNX file')
        model = getattr(m.model, '_orig_mod', m.model)  # the eager module under torch.compile
        transform, out = build_transform(False, m.run_args), []
        for start in range(0, len(images), 16):
            arrays = [self._read(x) for x in images[start:start + 16]]
            batch = torch.stack([to_tensor(a, m.run_args.in_chans, transform) for a in arrays])
            out += overlays(model, m.dev.inputs(batch), arrays, m.run_args.nb_classes, m.dev.device)
        return out

    @staticmethod
    def _read(image):
        """A path -> uint8 array (``imaging.read_image``, keeping grayscale); an array is checked and passed on."""
        if isinstance(image, (str, Path)):
            try:
                return read_image(image, None)
            except ImageReadError as e:
                raise DataError(str(e)) from None
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
            raise DataError(f'an image array must be uint8 [H, W] or [H, W, 3], got {array.dtype} {array.shape}')
        return array


def predict_checkpoint(path, data, args, explicit, device, frame=None):
    """Class probabilities of one checkpoint (or ONNX file) on a data folder: ``Predictor([path]).predict_frame``.

    Returns:
        (probs float32 [N', C], indices int64 [N'], the sample list, the checkpoint's effective flags with its
        ``temperature`` and ``threshold``).
    """
    predictor = Predictor([path], args, explicit, device)
    return (*predictor.predict_frame(data, frame), predictor.run_args)
