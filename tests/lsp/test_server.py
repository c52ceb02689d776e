"""The server object in-process: settings reload the engine only when they should, CLI
overrides win, the editor-process check. The probe loader only records what was loaded."""

import os
import subprocess
import sys
import time

from engine.api import EngineInfo
from lsp_server.server import create_server, pid_alive


class LoadProbe:
    def __init__(self, spec):
        self.spec = spec

    def info(self):
        return EngineInfo(
            model="probe",
            path="probe",
            family="dream",
            device=self.spec.device,
            dtype="float32",
            quant=self.spec.quant,
            weight_bytes=0,
            parameters=0,
            max_context=256,
            load_ms=0.0,
        )

    def complete(self, request, cancel=None):  # never called here
        raise AssertionError("no completion in these tests")

    def close(self):
        pass


def started_server(**kwargs):
    loads = []

    def loader(spec):
        loads.append(spec)
        return LoadProbe(spec)

    server = create_server(loader=loader, **kwargs)
    server.initialized = True
    server.start_loading()
    deadline = time.monotonic() + 5
    while not server.worker.ready:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return server, loads


def wait_loads(loads, count):
    deadline = time.monotonic() + 5
    while len(loads) < count:
        assert time.monotonic() < deadline, loads
        time.sleep(0.005)


def test_engine_settings_reload_the_model_and_others_do_not():
    server, loads = started_server()
    try:
        server.apply_settings({"maxTokens": 8, "stopMode": "line"})
        assert server.worker.state == "ready"  # load() would have set "loading" at once
        assert len(loads) == 1
        server.apply_settings({"device": "cuda", "quant": "int8"})
        wait_loads(loads, 2)
        assert (loads[-1].device, loads[-1].quant) == ("cuda", "int8")
        assert server.settings.max_tokens == 8  # earlier values kept
    finally:
        server.free()


def test_command_line_overrides_win_over_client_settings():
    server, loads = started_server(overrides={"model": "/models/m", "device": "cpu"})
    try:
        server.apply_settings({"model": "/other", "device": "cuda"})
        assert (server.settings.model, server.settings.device) == ("/models/m", "cpu")
        assert [spec.model for spec in loads] == ["/models/m"]
    finally:
        server.free()


def test_status_reports_the_loaded_model():
    server, _ = started_server()
    try:
        status = server.status()
        assert status["loadState"] == "ready" and status["device"] == "cpu"
        assert status["modelRuns"] == 0 and status["latencyMsP50"] is None
    finally:
        server.free()
        assert server.worker.state == "closed"


def test_pid_alive():
    assert pid_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not pid_alive(child.pid)
