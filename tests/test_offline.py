"""No network: a dataset that TFDS would download fails within seconds with a one-line fix, instead of
TFDS's minutes of download retries."""

from __future__ import annotations

import importlib.util
import socket
import threading
import time

import pytest

from shared.config_schema import DataConfig
from shared.data import sources
from shared.errors import UserError

# Skipped without tensorflow-datasets; not imported here, where every xdist worker would pay for it
pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorflow_datasets") is None,
                                reason="tensorflow-datasets not installed")


@pytest.fixture
def no_debian_package(tmp_path, monkeypatch):
    """Fashion-MNIST absent: data.path an empty folder, the Debian package's folder missing."""
    monkeypatch.setattr(sources, "FASHION_MNIST_DIRS", (str(tmp_path / "no-debian-package"),))
    empty = tmp_path / "empty"
    empty.mkdir()
    return DataConfig(source="fashion_mnist", path=str(empty), data_dir=str(tmp_path / "tfds"))


def _raise_no_name(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def _timed_load(config: DataConfig) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(UserError) as caught:
        sources.load(config)
    return str(caught.value), time.monotonic() - start


def test_fashion_mnist_without_name_resolution_fails_fast(no_debian_package, monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", _raise_no_name)  # what urllib3 calls too
    message, seconds = _timed_load(no_debian_package)
    assert seconds < 15, f"took {seconds:.0f} s"
    assert "dataset-fashion-mnist" in message and "data.path" in message and "no network" in message
    assert "\n" not in message


def test_fashion_mnist_with_a_silent_resolver_fails_fast(no_debian_package, monkeypatch):
    """A resolver that never answers (a blackholed DNS server): the probe gives up after PROBE_SECONDS."""
    released = threading.Event()
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: released.wait(60) and _raise_no_name())
    monkeypatch.setattr(sources, "PROBE_SECONDS", 0.5)
    try:
        message, seconds = _timed_load(no_debian_package)
    finally:
        released.set()
    assert seconds < 15, f"took {seconds:.0f} s"
    assert "did not answer within 0.5 s" in message and "dataset-fashion-mnist" in message


def test_tfds_download_without_network_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", _raise_no_name)
    config = DataConfig(source="tfds", name="mnist", data_dir=str(tmp_path / "tfds"))
    message, seconds = _timed_load(config)
    assert seconds < 15, f"took {seconds:.0f} s"
    assert "TFDS cannot download 'mnist'" in message and "data.data_dir" in message and "\n" not in message


def test_probe_goes_through_the_configured_proxy(monkeypatch):
    """Behind a proxy only the proxy is reachable: the probe asks it, not the download host."""
    asked = []
    monkeypatch.setenv("https_proxy", "http://proxy.invalid:3128")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: asked.append(address) or _raise_no_name())
    assert "proxy.invalid:3128" in sources.unreachable("https://storage.googleapis.com")
    assert asked == [("proxy.invalid", 3128)]
