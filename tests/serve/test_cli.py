"""`loracli serve` refuses bad arguments with exit 2 and one line, before loading any model."""

from __future__ import annotations

import socket

import pytest

from tests.helpers_text import cli


@pytest.mark.parametrize(("args", "message"), [
    (["--port", "70000"], "--port 70000: give 0 to 65535"),
    (["--max-batch", "0"], "--max-batch 0: give at least 1"),
    (["--max-wait-ms", "-1"], "--max-wait-ms -1.0: give 0 to 10000"),
    (["--api-key", "short"], "--api-key: use at least 8 characters"),
])
def test_bad_options(monkeypatch, capsys, serve_runs, args, message):
    code, _, err = cli(monkeypatch, capsys, "serve", str(serve_runs["img-a"]), *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_bad_run_arguments(monkeypatch, capsys, serve_runs, tmp_path):
    code, _, err = cli(monkeypatch, capsys, "serve", str(tmp_path / "missing"))
    assert code == 2 and "is not a folder" in err
    a = str(serve_runs["img-a"])
    code, _, err = cli(monkeypatch, capsys, "serve", a, a)
    assert code == 2 and "two runs are called 'img-a'" in err and "NAME=RUN_DIR" in err
    odd = tmp_path / "odd name!"
    odd.mkdir()
    code, _, err = cli(monkeypatch, capsys, "serve", str(odd))
    assert code == 2 and "pass NAME=RUN_DIR" in err


def test_a_port_in_use_is_reported_before_loading(monkeypatch, capsys, serve_runs):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, _, err = cli(monkeypatch, capsys, "serve", str(serve_runs["img-a"]), "--port", str(port))
    assert code == 2 and f"port {port} on 127.0.0.1 is in use" in err and "--port 0" in err
    assert "loading" not in err


def test_a_folder_that_is_no_run_is_refused(monkeypatch, capsys, tmp_path):
    code, _, err = cli(monkeypatch, capsys, "serve", "--port", "0", str(tmp_path))
    assert code == 2 and "is not a run directory" in err
