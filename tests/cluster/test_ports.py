"""free_port: a port a server can listen on, picked outside the kernel's ephemeral range where it can."""

from __future__ import annotations

import socket

from bark_serve.cluster import ports


def _listen(port: int) -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


def test_the_port_is_free_and_outside_the_ephemeral_range_and_rays_worker_ports():
    low, high = ports.ephemeral_range()
    assert 1024 <= low < high <= 65535
    picked = {ports.free_port() for _ in range(20)}
    assert len(picked) >= 15  # random picks, not one port over and over
    for port in picked:
        assert ports.LOW <= port < low  # no outgoing connection can be given it meanwhile
        _listen(port).close()


def test_a_port_someone_listens_on_is_never_returned(monkeypatch):
    held = _listen(ports.free_port())
    try:
        port = held.getsockname()[1]

        class Always:
            def randrange(self, a, b):
                return port

        monkeypatch.setattr(ports.random, "SystemRandom", Always)
        other = ports.free_port()  # every candidate is the held port: the OS picks one
        assert other != port
        _listen(other).close()
    finally:
        held.close()


def test_a_narrow_or_unreadable_range_falls_back_to_the_os(monkeypatch, tmp_path):
    narrow = tmp_path / "range"
    narrow.write_text("20100\t60999\n")  # under 1000 ports below it: not worth searching
    monkeypatch.setattr(ports, "RANGE_FILE", narrow)
    assert ports.ephemeral_range() == (20100, 60999)
    _listen(ports.free_port()).close()
    monkeypatch.setattr(ports, "RANGE_FILE", tmp_path / "missing")
    assert ports.ephemeral_range() == (32768, 60999)
    narrow.write_text("garbage")
    monkeypatch.setattr(ports, "RANGE_FILE", narrow)
    assert ports.ephemeral_range() == (32768, 60999)
