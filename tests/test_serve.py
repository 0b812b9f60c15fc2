"""serve.py: the HTTP service answers with prediction mode's numbers and survives bad uploads."""
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest

import main
from conftest import ROOT, train_argv
from predict import Predictor

fastapi = pytest.importorskip('fastapi')
httpx = pytest.importorskip('httpx')


@pytest.fixture(scope='module')
def trained(elpv_small, tmp_path_factory):
    out = tmp_path_factory.mktemp('serve') / 'run'
    main.main(train_argv(elpv_small, out, '--epochs', '1', '--use_amp', 'False', '--channels_last', 'False'))
    return out / 'checkpoint-best.pth'


@pytest.fixture(scope='module')
def client(trained):
    from fastapi.testclient import TestClient

    import serve
    args = main.get_args_parser().parse_args(['--use_amp', 'False', '--channels_last', 'False'])
    predictor = Predictor([str(trained)], args, {'use_amp', 'channels_last'})
    return TestClient(serve.create_app(predictor, max_files=3, max_bytes=200_000)), predictor


def cells(elpv_small, n):
    return sorted((elpv_small / 'pos').glob('*.png'))[:n]


def test_predict_returns_the_predictor_numbers(client, elpv_small):
    http, predictor = client
    assert http.get('/health').json()['status'] == 'ok'
    files = cells(elpv_small, 2)
    answer = http.post('/predict', files=[('files', (p.name, p.read_bytes(), 'image/png')) for p in files])
    assert answer.status_code == 200
    body = answer.json()
    expected = predictor.predict([str(p) for p in files])
    assert [b['filename'] for b in body] == [p.name for p in files]
    for b, (_, row) in zip(body, expected.iterrows()):
        assert b['p_defect'] == pytest.approx(row['p_defect'], abs=1e-6)
        assert b['label'] == row['label'] and b['threshold'] == 0.5
        assert sum(b['probs'].values()) == pytest.approx(1, abs=1e-5) and set(b['probs']) == {'neg', 'pos'}


@pytest.mark.parametrize('files,status,match', [
    ([('notes.txt', b'not an image', 'text/plain')], 415, 'notes.txt'),
    ([('empty.png', b'', 'image/png')], 415, 'empty.png: empty file'),
    ([('big.png', b'0' * 200_001, 'image/png')], 413, 'big.png: larger than'),
])
def test_bad_uploads_are_4xx_and_the_service_goes_on(client, elpv_small, files, status, match):
    http, _ = client
    answer = http.post('/predict', files=[('files', f) for f in files])
    assert answer.status_code == status and match in answer.json()['detail']
    good = cells(elpv_small, 1)[0]
    assert http.post('/predict', files=[('files', (good.name, good.read_bytes(), 'image/png'))]).status_code == 200


def test_heatmaps_on_request(client, elpv_small):
    import base64

    import cv2
    import numpy as np
    http, _ = client
    cell = cells(elpv_small, 1)[0]
    plain = http.post('/predict', files=[('files', (cell.name, cell.read_bytes(), 'image/png'))]).json()[0]
    assert 'cam_png' not in plain
    body = http.post('/predict?cam=true', files=[('files', (cell.name, cell.read_bytes(), 'image/png'))]).json()[0]
    overlay = cv2.imdecode(np.frombuffer(base64.b64decode(body['cam_png']), np.uint8), cv2.IMREAD_COLOR)
    assert overlay.shape == (64, 64, 3) and overlay.std() > 1  # the model's input size, not a blank image
    assert body['p_defect'] == pytest.approx(plain['p_defect'], abs=1e-6)


def test_too_many_files(client, elpv_small):
    http, _ = client
    files = [('files', (p.name, p.read_bytes(), 'image/png')) for p in cells(elpv_small, 4)]
    answer = http.post('/predict', files=files)
    assert answer.status_code == 413 and 'at most 3' in answer.json()['detail']


@pytest.fixture(scope='module')
def server(trained):
    """``python serve.py`` as a user starts it, on a free port; yields its URL."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / 'serve.py'), '--resume', str(trained), '--port', str(port),
                             '--device', 'cpu'], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f'http://127.0.0.1:{port}'
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f'{url}/health', timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_command_line_serves(server, elpv_small):
    cell = cells(elpv_small, 1)[0]
    answer = httpx.post(f'{server}/predict', timeout=60, files=[('files', (cell.name, cell.read_bytes(), 'image/png'))])
    assert answer.status_code == 200 and 0 <= answer.json()[0]['p_defect'] <= 1
    page = httpx.get(server, timeout=10)
    assert page.status_code == 200 and 'id="threshold"' in page.text
    assert 'http' not in page.text.split('<script>')[1]  # no CDN: nothing loaded from elsewhere


def chromium_path():
    """The system Chromium, or None."""
    import shutil
    return shutil.which('chromium') or shutil.which('chromium-browser')


def test_page_in_a_real_browser(server, elpv_small, tmp_path):
    sync_api = pytest.importorskip('playwright.sync_api', reason='playwright is not installed')
    browser_path = chromium_path()
    if browser_path is None:
        print('skipped: no Chromium on this machine (apt-get install chromium)')
        pytest.skip('no Chromium on this machine (apt-get install chromium)')
    cell = cells(elpv_small, 1)[0]
    expected = httpx.post(f'{server}/predict', timeout=60,
                          files=[('files', (cell.name, cell.read_bytes(), 'image/png'))]).json()[0]
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=['--no-sandbox'])
        page = browser.new_page()
        page.goto(server)
        page.set_input_files('#files', str(cell))
        page.wait_for_selector('.card .label', timeout=60_000)
        assert cell.name in page.inner_text('.card')
        assert page.get_attribute('.card img.cam', 'src').startswith('data:image/png;base64,')  # the heatmap
        assert f'{expected["p_defect"]:.3f}' in page.inner_text('.card')
        page.fill('#threshold', '0')  # every image a defect at threshold 0
        page.dispatch_event('#threshold', 'input')
        assert page.inner_text('.card .label') == 'pos'
        page.fill('#threshold', '1')
        page.dispatch_event('#threshold', 'input')
        assert page.inner_text('.card .label') == ('pos' if expected['p_defect'] >= 1 else 'neg')
        page.screenshot(path=str(tmp_path / 'page.png'))
        browser.close()
    assert (tmp_path / 'page.png').stat().st_size > 1000


def test_report_viewer_in_a_real_browser(server, trained, elpv_small, tmp_path):
    sync_api = pytest.importorskip('playwright.sync_api', reason='playwright is not installed')
    if chromium_path() is None:
        print('skipped: no Chromium on this machine (apt-get install chromium)')
        pytest.skip('no Chromium on this machine (apt-get install chromium)')
    report = tmp_path / 'report'
    main.main(['--pred', 'True', '--resume', str(trained), '--eval_data_path', str(elpv_small), '--num_workers', '0',
               '--pred_save_path', str(report)])
    table = pd.read_csv(report / 'predictions.csv')
    assert httpx.get(f'{server}/report/data', params={'path': str(tmp_path)}).status_code == 404
    assert httpx.get(f'{server}/report/image', params={'path': str(report), 'row': 99}).status_code == 404
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=['--no-sandbox'])
        page = browser.new_page()
        page.goto(f'{server}/report?path={report}')
        page.wait_for_selector('.card', timeout=60_000)
        shown = [float(x) for x in page.locator('.card .p').all_inner_texts()]
        assert len(shown) == len(table) and shown == sorted(shown, reverse=True)  # by P(defect)
        page.fill('#threshold', '0.5')
        page.dispatch_event('#threshold', 'input')
        defect = table['label'].isin(['pos', 'amb_pos'])
        called = table['p_defect'] >= 0.5
        assert int(page.inner_text('#tp')) == int((defect & called).sum())
        assert int(page.inner_text('#fn')) == int((defect & ~called).sum())
        page.select_option('#true', 'neg')
        assert len(page.locator('.card').all()) == int((table['label'] == 'neg').sum())
        # the first card's image arrives from /report/image (it may still be loading right after the filter)
        page.wait_for_function("() => { const i = document.querySelector('.card img');"
                               " return i !== null && i.complete && i.naturalWidth > 0; }", timeout=30_000)
        page.screenshot(path=str(tmp_path / 'report.png'))
        browser.close()


def test_concurrent_requests_are_batched(client, elpv_small):
    from concurrent.futures import ThreadPoolExecutor
    http, predictor = client
    batcher = http.app.state.batcher
    files = cells(elpv_small, 3)
    before_calls, before_requests = batcher.calls, batcher.requests

    def ask(p):
        return http.post('/predict', files=[('files', (p.name, p.read_bytes(), 'image/png'))]).json()[0]

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(ask, files * 4))
    expected = predictor.predict([str(p) for p in files])['p_defect'].tolist() * 4
    assert [a['filename'] for a in answers] == [p.name for p in files] * 4
    assert [a['p_defect'] for a in answers] == pytest.approx(expected, abs=1e-6)
    assert batcher.requests - before_requests == 12
    assert batcher.calls - before_calls < 12  # some requests shared a model call
