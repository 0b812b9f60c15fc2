"""The ResNet-50 to ConvNeXt-T roadmap as a table: per step its parameters, GFLOPs, training speed on this machine
and, from a finished ``configs/modernize.yaml`` sweep, the test accuracy and AUROC on ELPV.

    python run.py --config configs/modernize.yaml                 # the 14 trainings (sweeps/modernize)
    python scripts/modernize_table.py --runs sweeps/modernize/runs --out csv/modernize_table.csv

Parameters are counted at 1,000 classes and GFLOPs (multiply-adds, as the paper counts them; torch's
FlopCounterMode / 2) at 224 px, so both compare with Liu et al. 2022 (ResNet-50: 25.6M, 4.1G; ConvNeXt-T: 28.6M,
4.5G). Training images/s: fp32 forward, backward and AdamW step at the sweep's input size and batch, timed over
``--steps`` steps after two warm-up steps, in this process (the machine's figures, not comparable across machines).
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from models.resnet_roadmap import ROADMAP_STEPS, ResNetRoadmap, options_from_args  # noqa: E402
import results_table  # noqa: E402
from utils import DataError, run_cli  # noqa: E402

STEP_NAMES = ['ResNet-50'] + [name for name, _, _ in ROADMAP_STEPS]


def step_options(k):
    """ResNetRoadmap options of roadmap step ``k`` (0: ResNet-50 ... 13: ConvNeXt-T)."""
    import main
    argv = [t for _, flag, value in ROADMAP_STEPS[:k] for t in (f'--{flag}', str(value))]
    return options_from_args(main.get_args_parser().parse_args(['--model', 'resnet', *argv]))


def gmacs(model, size=224):
    """Forward multiply-adds of one image in billions (FlopCounterMode's FLOPs / 2)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 2 / 1e9


def train_speed(model, size, batch, steps):
    """Training images/s of a model: fp32 forward + backward + AdamW step on random data, after 2 warm-up steps."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 2, (batch,))
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def test_metrics(runs):
    """{step number: test metrics dict with 'minutes'} of the finished sweep runs below ``runs`` (run folders named
    ``stepNN_...`` as configs/modernize.yaml's zip_names give them)."""
    out = {}
    for record in results_table.collect([runs]):
        name = record['dir'].name
        if name.startswith('step') and name[4:6].isdigit():
            out[int(name[4:6])] = {**record['metrics'], 'minutes': record['seconds'] / 60}
    return out


def table(runs, size, batch, steps):
    """One row per roadmap step: step, flag, params_M, gflops, train_img_s and, when run, test acc/AUROC/minutes."""
    metrics = test_metrics(runs) if runs else {}
    rows = []
    for k, name in enumerate(STEP_NAMES):
        model = ResNetRoadmap(num_classes=1000, **step_options(k))
        flag = '' if k == 0 else f'--{ROADMAP_STEPS[k - 1][1]} {ROADMAP_STEPS[k - 1][2]}'
        row = {'step': k, 'name': name, 'flag': flag, 'params_M': sum(p.numel() for p in model.parameters()) / 1e6,
               'gflops': gmacs(model)}
        row['train_img_s'] = train_speed(ResNetRoadmap(num_classes=2, **step_options(k)), size, batch, steps)
        m = metrics.get(k, {})
        row.update({'test_acc': m.get('acc'), 'test_auroc': m.get('auroc'), 'minutes': m.get('minutes')})
        rows.append(row)
        print(f'{k:2d} {name:38s} {row["params_M"]:6.2f}M {row["gflops"]:5.2f}G {row["train_img_s"]:6.1f} img/s',
              flush=True)
    return pd.DataFrame(rows)


def markdown(df, size, batch):
    """The table as markdown."""
    fmt = lambda v, spec: '-' if v is None or pd.isna(v) else format(v, spec)  # noqa: E731
    lines = [f'| step | flag added | params (M) | GFLOPs (224 px) | training img/s ({size} px, batch {batch}) | '
             'test acc | test AUROC | minutes |', '|---|---|---|---|---|---|---|---|']
    for _, r in df.iterrows():
        lines.append(f'| {r["step"]}. {r["name"]} | {r["flag"] and "`" + r["flag"] + "`"} | {r["params_M"]:.2f} | '
                     f'{r["gflops"]:.2f} | {r["train_img_s"]:.1f} | {fmt(r["test_acc"], ".3f")} | '
                     f'{fmt(r["test_auroc"], ".3f")} | {fmt(r["minutes"], ".1f")} |')
    return '\n'.join(lines) + '\n'


def get_args_parser():
    p = argparse.ArgumentParser('The ResNet-to-ConvNeXt roadmap table')
    p.add_argument('--runs', default=None, help='the modernize sweep\'s runs folder (optional)')
    p.add_argument('--input_size', type=int, default=64, help='pixels, for the training speed (the sweep\'s size)')
    p.add_argument('--batch_size', type=int, default=32)
    p.add_argument('--steps', type=int, default=5, help='timed training steps per model')
    p.add_argument('--out', default='csv/modernize_table.csv', help='CSV written here; the markdown beside it (.md)')
    return p


def main(argv=None):
    """Entry point: print the markdown table and write it with the CSV; returns the DataFrame."""
    args = get_args_parser().parse_args(argv)
    if args.runs and not Path(args.runs).is_dir():
        raise DataError(f'{args.runs}: no such folder')
    torch.manual_seed(0)
    df = table(args.runs, args.input_size, args.batch_size, args.steps)
    results_table.publish(df, markdown(df, args.input_size, args.batch_size), args.out)
    return df


if __name__ == '__main__':
    run_cli(main)
