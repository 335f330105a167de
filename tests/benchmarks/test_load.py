from __future__ import annotations

import pytest

from benchmarks.load import is_loopback, main, percentile


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8000", True),
        ("http://127.5.0.9:80", True),
        ("http://localhost:8000", True),
        ("http://[::1]:8000", True),
        ("http://10.0.0.1:8000", False),
        ("http://192.168.1.2", False),
        ("http://example.com", False),
    ],
)
def test_only_loopback_targets_are_accepted(url: str, expected: bool) -> None:
    assert is_loopback(url) is expected


def test_percentile_interpolates() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 95) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0


def test_refuses_a_remote_target(tmp_path, capsys) -> None:
    image = tmp_path / "x.jpg"
    image.write_bytes(b"x")
    assert main(["--url", "http://10.1.2.3:8000", "--image", str(image)]) == 2
    assert "not a loopback" in capsys.readouterr().err
