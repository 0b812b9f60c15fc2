"""HTTP service for inspection lines: P(defect) of uploaded images from trained checkpoints (FastAPI + uvicorn).

    python serve.py --resume output/elpv/checkpoint-best.pth --host 127.0.0.1 --port 8000
    curl -F files=@cell1.png -F files=@cell2.png http://127.0.0.1:8000/predict

``GET /`` is the inspection page (static/index.html, served from here: no CDN): drop images, a card each with
P(defect), label and the Grad-CAM heatmap, a threshold slider that relabels the cards live. ``GET /report?path=FOLDER``
opens a prediction report folder (main.py --pred): its cells sorted by P(defect), filters by true and predicted
label and a borderline band around the threshold, confusion counts and precision/recall at the slider's threshold. ``GET /health`` says the service is up and what it serves. ``POST /predict`` takes one or more images in the
multipart field ``files`` and returns a JSON list, one object per image: ``filename``, ``p_defect``, ``label``
('pos' when P(defect) >= threshold), ``probs`` (per head class) and ``threshold``, and with ``?cam=true`` ``cam_png``, the Grad-CAM overlay of P(defect)
(base64 PNG). The numbers are those of
``predict.Predictor``, the object prediction mode runs on. A bad upload (not an image, an empty or too large file,
too many files) gets a 4xx JSON error ``{"detail": ...}`` naming the file, and the service keeps running; the limits
are flags. Concurrent requests are batched: those that arrive while the model is busy are predicted together in
one model call (``Batcher``); /health counts requests and model calls.
"""
import argparse
import base64
import concurrent.futures
import queue
import threading
import time
from pathlib import Path

import cv2

from imaging import ImageReadError, decode_image
from predict import Predictor
from utils import DataError, read_csv, run_cli

STATIC = Path(__file__).resolve().parent / 'static'


class Batcher:
    """Runs the model calls of concurrent requests together: requests that arrive while the model is busy (or within
    ``wait`` seconds of each other) are predicted in one ``Predictor.predict`` call of up to ``max_images`` images,
    and each request gets its own rows back. One worker thread owns the model, so calls never compete for cores.

    Args:
        predictor: predict.Predictor. max_images: int, images per model call. wait: float seconds to gather.
    """

    def __init__(self, predictor, max_images=64, wait=0.005):
        self.predictor, self.max_images, self.wait = predictor, max_images, wait
        self.queue = queue.Queue()
        self.calls = self.requests = 0
        self.lock = threading.Lock()  # Grad-CAM runs outside the batches, one at a time on the same model
        threading.Thread(target=self._work, daemon=True, name='batcher').start()

    def predict(self, images, names):
        """The rows of ``predictor.predict(images, names)`` (a DataFrame), computed in a shared batch."""
        done = concurrent.futures.Future()
        self.queue.put((images, names, done))
        return done.result()

    def _work(self):
        while True:
            jobs = [self.queue.get()]
            deadline = time.monotonic() + self.wait
            while sum(len(j[0]) for j in jobs) < self.max_images:
                try:
                    jobs.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            try:
                with self.lock:
                    table = self.predictor.predict([x for j in jobs for x in j[0]], [n for j in jobs for n in j[1]])
                self.calls, self.requests = self.calls + 1, self.requests + len(jobs)
                start = 0
                for images, _, done in jobs:
                    done.set_result(table.iloc[start:start + len(images)].reset_index(drop=True))
                    start += len(images)
            except Exception as e:  # handed to the waiting requests, the worker goes on
                for _, _, done in jobs:
                    done.set_exception(e)


def encode_png(rgb):
    """uint8 RGB array [H, W, 3] -> PNG file bytes."""
    return cv2.imencode('.png', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def create_app(predictor, max_files=16, max_bytes=20_000_000):
    """The FastAPI application around a loaded ``predict.Predictor``.

    Args:
        predictor: Predictor. max_files: int, images per request. max_bytes: int, bytes per image file.
    Returns:
        fastapi.FastAPI.
    """
    from fastapi import FastAPI, File, HTTPException, UploadFile

    from fastapi.responses import FileResponse

    app = FastAPI(title='ConvNeXt defect classifier')
    batcher = Batcher(predictor)
    app.state.batcher = batcher

    @app.get('/')
    def page():
        """The inspection page: drop images, a card each with P(defect) and label, a live threshold slider."""
        return FileResponse(STATIC / 'index.html')

    def report_table(path):
        """The predictions.csv of a prediction report folder; 404 when ``path`` is not one."""
        csv = Path(path) / 'predictions.csv'
        if not csv.is_file():
            raise HTTPException(404, f'{path}: not a prediction report folder (no predictions.csv)')
        try:
            return read_csv(csv, 'prediction report')
        except DataError as e:
            raise HTTPException(422, str(e)) from None

    @app.get('/report')
    def report_page():
        """The report viewer (``/report?path=FOLDER``): cells by P(defect), filters, confusion counts."""
        return FileResponse(STATIC / 'report.html')

    @app.get('/report/data')
    def report_data(path: str):
        """Rows of a prediction report: row, name, label (when known), p_defect; and the service's threshold."""
        table = report_table(path)
        labels = table['label'] if 'label' in table.columns else [None] * len(table)
        rows = [{'row': i, 'name': Path(p).name, 'label': lab if isinstance(lab, str) else None,
                 'p_defect': float(q)} for i, (p, lab, q) in enumerate(zip(table['path'], labels, table['p_defect']))]
        return {'path': str(path), 'threshold': predictor.threshold, 'rows': rows}

    @app.get('/report/image')
    def report_image(path: str, row: int):
        """The image of one row of a prediction report (only files the report lists are served)."""
        table = report_table(path)
        if not 0 <= row < len(table) or not Path(table['path'][row]).is_file():
            raise HTTPException(404, f'{path}: no image at row {row}')
        return FileResponse(table['path'][row])

    @app.get('/health')
    def health():
        """Liveness and what is served: model files, classes, threshold, limits."""
        return {'status': 'ok', 'models': [m.path for m in predictor.members], 'classes': predictor.classes,
                'threshold': predictor.threshold, 'max_files': max_files, 'max_bytes': max_bytes,
                'requests': batcher.requests, 'model_calls': batcher.calls}

    @app.post('/predict')
    def predict(files: list[UploadFile] = File(...), cam: bool = False):
        """P(defect), label, class probabilities and threshold of each uploaded image; with ``?cam=true`` also its
        Grad-CAM overlay of P(defect) as a base64 PNG (``cam_png``)."""
        if len(files) > max_files:
            raise HTTPException(413, f'{len(files)} files in one request; at most {max_files} (--max_files)')
        images = []
        for f in files:
            data = f.file.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise HTTPException(413, f'{f.filename}: larger than {max_bytes} bytes (--max_bytes)')
            try:
                images.append(decode_image(data, f.filename, None))
            except ImageReadError as e:
                raise HTTPException(415, f'not an image: {e}') from None
        table = batcher.predict(images, [f.filename for f in files])
        overlays = [None] * len(images)
        if cam:
            with batcher.lock:
                overlays = predictor.cams(images)
        prob_columns = [f'p_{c}' for c in predictor.classes]
        answer = [{'filename': row['name'], 'p_defect': float(row['p_defect']), 'label': row['label'],
                   'probs': {c[2:]: float(row[c]) for c in prob_columns}, 'threshold': float(row['threshold'])}
                  for _, row in table.iterrows()]
        for item, overlay in zip(answer, overlays):
            if overlay is not None:
                item['cam_png'] = base64.b64encode(encode_png(overlay)).decode('ascii')
        return answer

    return app


def get_args_parser():
    """The argparse parser of serve.py's command-line flags."""
    p = argparse.ArgumentParser('HTTP service: P(defect) of uploaded images')
    p.add_argument('--resume', nargs='+', required=True, help='checkpoint(s) or .onnx file (several: an ensemble)')
    p.add_argument('--host', default='127.0.0.1')
    p.add_argument('--port', type=int, default=8000)
    p.add_argument('--device', default='auto', help='auto, cpu, cuda, cuda:N')
    p.add_argument('--conf', type=float, default=None,
                   help="threshold on P(defect) (default: the checkpoint's --target_recall threshold, else 0.5)")
    p.add_argument('--max_files', type=int, default=16, help='images per request')
    p.add_argument('--max_bytes', type=int, default=20_000_000, help='bytes per image file')
    return p


def main(argv=None):
    """Entry point: load the models once, then serve until Ctrl-C."""
    args = get_args_parser().parse_args(argv)
    if args.conf is not None and not 0 <= args.conf <= 1:
        raise DataError(f'--conf must lie in [0, 1], got {args.conf}')
    try:
        import uvicorn
    except ImportError:
        raise DataError('serve.py needs fastapi, uvicorn and python-multipart: pip install -r requirements.txt') \
            from None
    from flags import get_args_parser as main_flags
    flags = main_flags().parse_args(['--device', args.device])
    predictor = Predictor(args.resume, flags, {'device'}, conf=args.conf)
    print(f'serving {", ".join(args.resume)} on http://{args.host}:{args.port} (threshold {predictor.threshold:.4f})',
          flush=True)
    uvicorn.run(create_app(predictor, args.max_files, args.max_bytes), host=args.host, port=args.port,
                log_level='warning')


if __name__ == '__main__':
    run_cli(main)
