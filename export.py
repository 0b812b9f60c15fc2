"""Export a trained checkpoint to ONNX, and run such a file through onnxruntime for prediction mode.

    python export.py --resume output/elpv/checkpoint-best.pth --output output/elpv/model.onnx --check_data data/elpv
    python main.py --pred True --resume output/elpv/model.onnx --eval_data_path new_images/ --pred_save_path report

The ONNX graph maps float32 images [batch, in_chans, input_size, input_size] (dynamic batch, normalised as in
training) to class probabilities [batch, C] with the checkpoint's ``--calibrate`` temperature applied. The
checkpoint's architecture and preprocessing flags and its operating threshold travel in the file's metadata
(``convnext_softlabel`` key, JSON), so prediction mode reads the images exactly as for the checkpoint.
``--check_data`` compares onnxruntime's P(defect) with PyTorch's on real images and prints the largest difference.
"""
import argparse
import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from checkpoint import CHECKPOINT_FLAGS, load_for_inference
from predict import METADATA_KEY, predict_checkpoint
from utils import DataError, atomic_write_bytes, run_cli


class ProbabilityHead(torch.nn.Module):
    """A classifier followed by its temperature and softmax: [B, C, H, W] images -> [B, K] probabilities."""

    def __init__(self, model, temperature=1.0):
        super().__init__()
        self.model, self.temperature = model, float(temperature)

    def forward(self, x):
        """float32 [B, C, H, W] -> float32 [B, K] class probabilities."""
        return torch.softmax(self.model(x).float() / self.temperature, dim=-1)


def main_args(argv=()):
    """main.py's flags (defaults, or parsed from ``argv``), the base that checkpoints' saved flags complete."""
    from flags import get_args_parser
    return get_args_parser().parse_args(list(argv))


def export_onnx(checkpoint, output, opset=17):
    """Write ``checkpoint`` as an ONNX file (dynamic batch) with its flags in the metadata.

    Returns:
        argparse.Namespace of the checkpoint's effective flags.
    Raises:
        DataError: unreadable checkpoint, or an export failure (one line).
    """
    import onnx
    model, run_args = load_for_inference(checkpoint, main_args(), set())
    wrapped = ProbabilityHead(model, run_args.temperature).eval()
    x = torch.zeros(1, run_args.in_chans, run_args.input_size, run_args.input_size)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # the TorchScript exporter announces its deprecation
            torch.onnx.export(wrapped, (x,), buffer, input_names=['image'], output_names=['probs'],
                              opset_version=opset,
                              dynamic_axes={'image': {0: 'batch'}, 'probs': {0: 'batch'}}, dynamo=False)
    except Exception as e:  # the exporter raises many kinds of errors
        raise DataError(f'{checkpoint}: ONNX export failed ({e.__class__.__name__}: {str(e).splitlines()[0][:200]})') \
            from None
    proto = onnx.load_from_string(buffer.getvalue())
    meta = {k: getattr(run_args, k) for k in CHECKPOINT_FLAGS if hasattr(run_args, k)}
    meta.update(threshold=run_args.threshold, temperature_applied=run_args.temperature)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta, default=str)
    atomic_write_bytes(proto.SerializeToString(), output)
    return run_args


def check(checkpoint, output, data, limit=32):
    """Largest |P(defect) difference| between PyTorch and onnxruntime on up to ``limit`` images of ``data``."""
    from datasets import load_eval_frame
    from labels import defect_probability
    args = main_args(['--eval_split', 'all', '--num_workers', '0', '--use_amp', 'False', '--channels_last',
                      'False', '--device', 'cpu'])
    explicit = {'use_amp', 'channels_last'}
    frame = load_eval_frame(data, 'all', args.test_val_ratio, 0, None).head(limit)
    p_torch, idx_t, _, _ = predict_checkpoint(checkpoint, data, args, explicit, torch.device('cpu'), frame)
    p_onnx, idx_o, _, _ = predict_checkpoint(output, data, args, explicit, torch.device('cpu'), frame)
    if not np.array_equal(idx_t, idx_o):
        raise DataError(f'{data}: PyTorch and onnxruntime read different images')
    return float(np.abs(defect_probability(p_torch) - defect_probability(p_onnx)).max()), len(idx_t)


def get_args_parser():
    """The argparse parser of export.py's command-line flags."""
    p = argparse.ArgumentParser('Export a checkpoint to ONNX')
    p.add_argument('--resume', required=True, help='checkpoint to export (checkpoint-best.pth)')
    p.add_argument('--output', required=True, help='ONNX file to write')
    p.add_argument('--opset', type=int, default=17)
    p.add_argument('--check_data', default=None, help='data folder: compare onnxruntime with PyTorch on its images')
    return p


def main(argv=None):
    """Entry point; returns the largest P(defect) difference found by --check_data (None without it)."""
    args = get_args_parser().parse_args(argv)
    if Path(args.output).suffix != '.onnx':
        raise DataError(f'{args.output}: --output must end in .onnx')
    run_args = export_onnx(args.resume, args.output, args.opset)
    print(f'wrote {args.output} ({run_args.model}, {run_args.in_chans}x{run_args.input_size}x{run_args.input_size} '
          f'-> {run_args.nb_classes} probabilities, dynamic batch)')
    if args.check_data:
        diff, n = check(args.resume, args.output, args.check_data)
        print(f'onnxruntime vs PyTorch on {n} images of {args.check_data}: max |P(defect) difference| {diff:.2e}')
        return diff
    return None


if __name__ == '__main__':
    run_cli(main)
