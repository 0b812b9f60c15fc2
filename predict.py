"""Predictions of trained checkpoints on a data folder: one checkpoint, or several averaged (an ensemble).

    from predict import predict_ensemble
    probs, indices, frame, run_args = predict_ensemble(['output/elpv/checkpoint-best.pth'], 'data/elpv', args,
                                                       explicit=set(), device=torch.device('cpu'))

Each checkpoint is rebuilt with the architecture and preprocessing flags it was trained with
(``checkpoint.load_for_inference``); the images go through the same Dataset and transforms as in training.
"""
from pathlib import Path

import numpy as np

from checkpoint import load_for_inference
from datasets import load_eval_frame
from distributed import main_first
from engine import predict_probs
from runtime import device_settings, eval_cache, make_dataset, make_loader, prepare_model, split_seed
from utils import DataError


def predict_checkpoint(path, data, args, explicit, device, frame=None):
    """Class probabilities of one checkpoint on the images of ``frame`` (default: the --eval_split of ``data``).

    Args:
        path: checkpoint file. data: data folder (prepared root, split folder, class folders or plain images).
        args: argparse.Namespace of main.py. explicit: set of flag names the user gave (they win over the
            checkpoint's). device: torch.device (precision and memory format are chosen for the checkpoint's
            model, ``runtime.device_settings``). frame: optional sample list already loaded.

    Returns:
        (probs float32 [N', C], indices int64 [N'] into the returned frame, the sample list as predicted
        (DataFrame), argparse.Namespace of the checkpoint's effective flags).

    Raises:
        DataError: unreadable checkpoint, bad data folder.
    """
    model, run_args = load_for_inference(path, args, explicit)
    dev = device_settings(run_args, device)
    if frame is None:
        frame = main_first(lambda: load_eval_frame(data, args.eval_split, run_args.test_val_ratio,
                                                   split_seed(run_args), run_args.label_list))
    dataset = main_first(lambda: make_dataset(frame, run_args, False, eval_cache(data, run_args, len(frame))))
    run_model = prepare_model(model, run_args, dev)
    probs, indices = predict_probs(run_model, make_loader(dataset, run_args, dev.device, False), dev,
                                   f'predict {Path(path).name}', tta=args.tta)
    return probs, indices, dataset.frame, run_args


def predict_ensemble(paths, data, args, explicit, device):
    """Mean class probabilities of several checkpoints (one: its own) on the same images.

    Returns:
        (mean probs float32 [N', C], indices int64 [N'], sample list, effective flags of the last checkpoint).

    Raises:
        DataError: checkpoints with different head sizes, or that saw different images (an unreadable one).
    """
    total, indices, frame, nb_classes = None, None, None, None
    for path in paths:
        probs, idx, frame, run_args = predict_checkpoint(path, data, args, explicit, device, frame)
        if nb_classes is not None and run_args.nb_classes != nb_classes:
            raise DataError(f'{path}: --several_models needs checkpoints with the same --nb_classes')
        if indices is not None and not np.array_equal(idx, indices):
            raise DataError(f'{path}: models saw different images (a corrupt image?); predict them one by one')
        nb_classes, indices = run_args.nb_classes, idx
        total = probs if total is None else total + probs
    return total / len(paths), indices, frame, run_args
