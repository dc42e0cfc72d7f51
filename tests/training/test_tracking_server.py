"""An MLflow tracking server that does not answer (issue 23): refused before training, exit 2
naming MLFLOW_TRACKING_URI, nothing written; a server that answers passes the check."""

from __future__ import annotations

import http.server
import socket
import threading

import pytest

from lora_cli.errors import UserInputError
from lora_cli.recipe import load_recipe
from lora_cli.training import tracking
from tests.helpers import message_lines
from tests.training._util import loracli, write_recipe


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_recipe(tmp_path, imagefolder):
    return write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "run", training={"report_to": "mlflow"})


def test_a_server_that_refuses_stops_training_before_anything_is_written(mlflow_recipe, tmp_path, monkeypatch,
                                                                        capsys):
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # without the check: fail fast, not in minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    assert loracli(monkeypatch, "train", mlflow_recipe) == 2
    err = capsys.readouterr().err
    lines = message_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"MLFLOW_TRACKING_URI={uri}" in lines[0], err
    assert "does not answer" in lines[0] and "remove mlflow from training.report_to" in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_server_that_never_replies_is_refused_after_the_timeout(mlflow_recipe, monkeypatch):
    with socket.socket() as server:  # accepts connections (the kernel's backlog) and never answers
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        uri = f"http://127.0.0.1:{server.getsockname()[1]}/"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setattr(tracking, "MLFLOW_ANSWER_SECONDS", 0.5)
        with pytest.raises(UserInputError, match="does not answer .*timed out"):
            tracking.check_tracking_server(load_recipe(mlflow_recipe))


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the handler's API
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


def test_a_server_that_answers_and_other_stores_pass(mlflow_recipe, monkeypatch):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        recipe = load_recipe(mlflow_recipe)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_address[1]}")
        tracking.check_tracking_server(recipe)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_address[1]}/prefix")
        tracking.check_tracking_server(recipe)  # a 404 is still a server answering
    finally:
        server.shutdown()
        thread.join()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///somewhere.db")  # not a server: nothing to ask
    tracking.check_tracking_server(recipe)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    tracking.check_tracking_server(load_recipe(mlflow_recipe, ["training.report_to=tensorboard"]))  # not mlflow
