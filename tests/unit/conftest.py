"""Fixtures the unit tests share."""

from __future__ import annotations

import pytest

from mmserve import tls


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """A development CA with server and client certificates, in `mmserve certs`' layout (read, never written)."""
    return tls.make_dev_certs(tmp_path_factory.mktemp("tls"))
