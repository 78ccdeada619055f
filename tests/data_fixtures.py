"""Fixtures shared by the data tests: one small synthetic dataset per session and a local
HTTP server. Import the fixtures into a test module to use them."""
import functools
import http.server
import threading

import pytest

from data.synthetic import make_synthetic

# Small enough to generate in well under a second; every split non-empty.
SYNTHETIC_KW = dict(seed=0, num_images=40, image_size=32, num_videos=4, video_frames=10)
IMAGE_SIZE = 32

_CACHE = {}


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """Config paths of the session's synthetic dataset (make_synthetic's return value)."""
    if "paths" not in _CACHE:  # shared by every module that imports this fixture
        root = tmp_path_factory.mktemp("synthetic")
        _CACHE["paths"] = make_synthetic(root, **SYNTHETIC_KW)
    return _CACHE["paths"]


def data_config(paths, **extra):
    """A config dict as the task scripts pass to create_dataset."""
    config = dict(paths, image_size=IMAGE_SIZE, prompt="a picture of ", num_frm_test=4)
    config.update(extra)
    return config


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_server(tmp_path):
    """(served folder, base URL, list of requested paths) of a server on 127.0.0.1."""
    folder = tmp_path / "served"
    folder.mkdir()
    requests = []

    class Handler(_QuietHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
