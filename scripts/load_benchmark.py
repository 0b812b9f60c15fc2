"""Load benchmark of serve.py (figures, not a test): N concurrent clients post one image each, again and again, for
a fixed time on 127.0.0.1.

    python scripts/load_benchmark.py --resume output/elpv/checkpoint-best.pth --clients 8 --seconds 30
    python scripts/load_benchmark.py --url http://127.0.0.1:8000 --clients 8 --seconds 30

With ``--resume`` the script starts ``python serve.py`` itself on a free port (and stops it at the end). The image
is a real ELPV cell of the installed elpv-dataset package unless ``--image`` names one. Prints requests/s, the 50th
and 95th percentile latency, errors (any answer but 200, or a failed connection), and the model calls the service
made for the requests (its /health counters): fewer calls than requests means requests were batched.
"""
import argparse
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from utils import DataError, run_cli  # noqa: E402


def default_image():
    """A real ELPV cell from the installed elpv-dataset package."""
    import elpv_dataset
    return sorted((Path(elpv_dataset.__file__).parent / 'data' / 'images').glob('*.png'))[0]


def start_service(checkpoint, device):
    """Start serve.py on a free port; returns (process, URL) once /health answers (DataError after 3 minutes)."""
    import httpx
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / 'serve.py'), '--resume', str(checkpoint), '--port', str(port),
                             '--device', device], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, deadline = f'http://127.0.0.1:{port}', time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f'{url}/health', timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise DataError(f'{checkpoint}: serve.py did not start (exit status {proc.poll()})')


def client(url, image, stop_at, latencies, errors):
    """One client: post the image until ``stop_at``; appends latencies (s) and counts errors (list of one int)."""
    import httpx
    data = image.read_bytes()
    with httpx.Client(timeout=120) as http:
        while time.time() < stop_at:
            t0 = time.perf_counter()
            try:
                ok = http.post(f'{url}/predict', files=[('files', (image.name, data, 'image/png'))]).status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                errors[0] += 1


def benchmark(url, image, clients, seconds):
    """Run the clients against ``url``; returns a dict of the figures."""
    import httpx
    before = httpx.get(f'{url}/health', timeout=10).json()
    latencies, errors, stop_at = [], [0], time.time() + seconds
    threads = [threading.Thread(target=client, args=(url, image, stop_at, latencies, errors)) for _ in range(clients)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - t0
    after = httpx.get(f'{url}/health', timeout=10).json()
    lat = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {'clients': clients, 'seconds': round(elapsed, 1), 'requests': len(latencies), 'errors': errors[0],
            'requests_per_s': round(len(latencies) / elapsed, 2), 'p50_ms': round(float(np.percentile(lat, 50)), 1),
            'p95_ms': round(float(np.percentile(lat, 95)), 1),
            'model_calls': after.get('model_calls', 0) - before.get('model_calls', 0)}


def get_args_parser():
    p = argparse.ArgumentParser('Load benchmark of serve.py')
    p.add_argument('--resume', default=None, help='checkpoint: start serve.py with it')
    p.add_argument('--url', default=None, help='or a running service')
    p.add_argument('--device', default='cpu')
    p.add_argument('--image', default=None, help='image to post (default: a real ELPV cell)')
    p.add_argument('--clients', type=int, nargs='+', default=[1, 8], help='concurrent clients (one run each)')
    p.add_argument('--seconds', type=float, default=20.0, help='per run')
    return p


def main(argv=None):
    """Entry point; prints a markdown table and returns the list of figures."""
    args = get_args_parser().parse_args(argv)
    if bool(args.resume) == bool(args.url):
        raise DataError('give --resume CHECKPOINT (the script starts serve.py) or --url of a running service')
    image = Path(args.image) if args.image else default_image()
    proc, url = start_service(args.resume, args.device) if args.resume else (None, args.url.rstrip('/'))
    try:
        rows = [benchmark(url, image, n, args.seconds) for n in args.clients]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    print('| clients | requests/s | p50 latency (ms) | p95 latency (ms) | errors | requests | model calls |')
    print('|---|---|---|---|---|---|---|')
    for r in rows:
        print(f'| {r["clients"]} | {r["requests_per_s"]} | {r["p50_ms"]} | {r["p95_ms"]} | {r["errors"]} | '
              f'{r["requests"]} | {r["model_calls"]} |')
    return rows


if __name__ == '__main__':
    run_cli(main)
