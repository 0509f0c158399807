"""The doctor's command line: the human table, options refused before anything is created,
and a cluster it cannot reach."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpu_runners.doctor.cli import main
from tests.doctor.conftest import doctor_environ
from tests.doctor.installation import Installation


def test_the_table_shows_every_check_and_each_pools_cold_start(
    installation: Installation, capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["--timeout", "30"], doctor_environ(installation))
    out, err = capsys.readouterr()

    assert code == 0
    assert out.splitlines()[0].split() == ["STATUS", "CHECK", "DETAIL"]
    assert "PASS    GPU smoke: nvidia-l4" in out
    assert "Cold start of the nvidia-l4 smoke pod: passed" in out
    assert "  nvidia-smi: NVIDIA L4, 550.54.15, 23034 MiB" in out
    assert out.endswith("Every check passed.\n")
    assert "To fix:" not in out
    # Progress goes to stderr, stage by stage, so stdout stays the report.
    assert "scale-up decision after" in err


def test_a_token_file_is_read_and_named_never_printed(
    installation: Installation, capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(installation.github.token + "\n")
    environ = doctor_environ(installation)
    del environ["GITHUB_TOKEN"]

    code = main(["--skip-smoke", "--token-file", str(token_file)], environ)
    out, err = capsys.readouterr()

    assert code == 0
    assert f"file {token_file}" in out
    assert installation.github.token not in out + err


@pytest.mark.parametrize(("options", "environ", "message"), [
    ([], {}, "no GitHub token: give --token-file or set GITHUB_TOKEN"),
    (["--timeout", "0"], {"GITHUB_TOKEN": "t"}, "--timeout: 0.0 is not allowed"),
    (["--repository", "models"], {"GITHUB_TOKEN": "t"}, "--repository: 'models' is not "
                                                         "owner/name"),
])
def test_bad_options_exit_2_naming_the_option_before_any_request(
    installation: Installation, capsys: pytest.CaptureFixture[str],
    options: list[str], environ: dict[str, str], message: str,
) -> None:
    full = {**environ, "KUBECONFIG": str(installation.kube.kubeconfig_path)}

    code = main(options, full)

    assert code == 2
    assert message in capsys.readouterr().err
    assert installation.kube.requests == []
    assert installation.github.requests == []


def test_a_cluster_that_refuses_the_credentials_fails_with_the_kubeconfig_fix(
    installation: Installation, capsys: pytest.CaptureFixture[str],
) -> None:
    installation.kube.inject("GET", "/api/v1/nodes", 401, times=5)

    code = main(["--json"], doctor_environ(installation))
    out = capsys.readouterr().out

    assert code == 1
    assert '"check": "cluster: reachable"' in out
    assert "--kubeconfig/--context" in out
    assert installation.doctor_pods() == []
