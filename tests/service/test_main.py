"""``python -m service``'s command line: overrides of SATSEG_* settings, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.__main__ import settings_from_args


def test_the_options_override_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SATSEG_PORT", "9000")
    monkeypatch.setenv("SATSEG_MAX_QUEUE", "7")
    settings = settings_from_args(["--port", "8765", "--checkpoint", str(tmp_path / "m.pt")])
    assert settings.port == 8765 and settings.checkpoint == tmp_path / "m.pt"
    assert settings.max_queue == 7  # the environment still sets everything else
    assert settings_from_args([]).port == 9000


def test_an_unknown_argument_is_an_error_not_ignored(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stopped:
        settings_from_args(["--bogus", "1"])
    assert stopped.value.code == 2
    assert "unrecognized arguments: --bogus 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["--port", "70000"], {}, "SATSEG_PORT: Input should be less than or equal to 65535"),
        ([], {"SATSEG_MAX_QUEUE": "-3"}, "SATSEG_MAX_QUEUE: Input should be greater than 0"),
    ],
)
def test_an_invalid_setting_exits_2_naming_its_variable_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    argv: list[str],
    env: dict[str, str],
    named: str,
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as stopped:
        settings_from_args(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert named in err and "Traceback" not in err
