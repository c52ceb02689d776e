"""The command line: loopback-only TCP, and a server module that does not import torch."""

import subprocess
import sys

import pytest

from lsp_server.__main__ import loopback_address, main


def test_loopback_addresses_are_accepted():
    assert loopback_address("127.0.0.1:2087") == ("127.0.0.1", 2087)
    assert loopback_address("localhost:9000") == ("localhost", 9000)
    assert loopback_address("[::1]:9000") == ("::1", 9000)


@pytest.mark.parametrize("value", ["0.0.0.0:2087", "192.168.1.5:80", "example.com:80", "x", ":0"])
def test_non_loopback_or_malformed_addresses_are_refused(value):
    with pytest.raises(ValueError):
        loopback_address(value)


def test_main_refuses_a_public_tcp_host(capsys):
    assert main(["--tcp", "0.0.0.0:2087"]) == 2
    assert "loopback" in capsys.readouterr().err


def test_server_import_keeps_torch_out():
    code = (
        "import sys, lsp_server.server, lsp_server.__main__; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
