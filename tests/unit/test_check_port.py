"""check_port refuses a port another process listens on and accepts one whose last connection is in
TIME_WAIT (a `make up` right after the previous one ended), as the servers that bind it do."""

from __future__ import annotations

import socket

import pytest

from triphase.common.process.net import check_port


def test_a_port_in_use_is_refused_and_one_in_time_wait_is_not():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    with pytest.raises(ValueError, match=f"--port {port}: cannot listen on 127.0.0.1:{port}"):
        check_port("--port", port)
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    server.close()
    accepted.close()  # the server's side closes first: its end of the connection waits in TIME_WAIT
    client.recv(1)
    client.close()
    check_port("--port", port)
