"""AWS in tests: moto's server mode on loopback (a real HTTP server that boto3 talks to, not in-process patching)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest


@contextmanager
def moto_server(endpoint_var: str = "AWS_ENDPOINT_URL") -> Iterator[str]:
    """Start moto's server on 127.0.0.1, put test credentials, the region and its address (in ``endpoint_var``) in
    the environment (engine processes started meanwhile inherit them), and yield the address; all undone on exit."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in {
                "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test",
                "AWS_DEFAULT_REGION": "us-east-1",
                endpoint_var: endpoint,
            }.items():
                mp.setenv(k, v)
            yield endpoint
    finally:
        server.stop()
