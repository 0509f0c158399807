"""scripts/bump_runner.py against a fake GitHub releases API over real HTTP.

GitHub refuses jobs to a runner more than 30 days behind the newest release when it does not
update itself; the weekly workflow runs this script to move the image's pin forward. The fake
serves `GET /repos/actions/runner/releases/latest` as GitHub does (tag, notes with one
checksum per platform between markers, assets with digests) and records each request.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from components.container_image import runner_version
from scripts import bump_runner
from tests.harness.mock_stack import REPO_ROOT

PLATFORMS = ("osx-x64", "linux-x64", "linux-arm64", "linux-arm", "win-x64")
LATEST = "2.340.1"
LATEST_SHA = "3c" * 32


def release_answer(version: str = LATEST, linux_sha: str = LATEST_SHA, *,
                   asset_digest: str | None = None) -> dict[str, Any]:
    """A release as the API returns it: other platforms' checksums around the linux-x64 one."""
    lines = []
    for index, platform in enumerate(PLATFORMS):
        sha = linux_sha if platform == "linux-x64" else f"{index:x}" * 64
        lines.append(f"- actions-runner-{platform}-{version}.tar.gz "
                     f"<!-- BEGIN SHA {platform} -->{sha}<!-- END SHA {platform} -->")
    body = "## What's Changed\n* Fixes (#4012)\n\n" + "\n".join(lines)
    tarball = f"actions-runner-linux-x64-{version}.tar.gz"
    return {"tag_name": f"v{version}", "name": f"v{version}", "body": body,
            "assets": [{"name": tarball, "digest": asset_digest or f"sha256:{linux_sha}",
                        "browser_download_url": f"https://github.com/actions/runner/releases/"
                                                f"download/v{version}/{tarball}"}]}


class FakeReleasesApi:
    """GitHub's releases endpoint for actions/runner, answering what the test sets."""

    def __init__(self) -> None:
        self.answer: Any = release_answer()
        self.requests: list[tuple[str, dict[str, str]]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.requests.append((self.path, dict(self.headers)))
                if self.path != bump_runner.RELEASE_PATH:
                    self.send_error(404)
                    return
                payload = json.dumps(fake.answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeReleasesApi:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api() -> Iterator[FakeReleasesApi]:
    with FakeReleasesApi() as fake:
        yield fake


@pytest.fixture
def dockerfile(tmp_path: Path) -> Path:
    """A copy of the runner image's Dockerfile, as the workflow's checkout has it."""
    copy = tmp_path / "Dockerfile"
    copy.write_text((REPO_ROOT / "docker" / "Dockerfile").read_text())
    return copy


def run_bump(api: FakeReleasesApi, dockerfile: Path, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch, token: str | None = None) -> tuple[int, str]:
    output = tmp_path / "github_output"
    monkeypatch.setenv("GITHUB_OUTPUT", str(output))
    if token is None:
        monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    else:
        monkeypatch.setenv("GITHUB_TOKEN", token)
    code = bump_runner.main(["--dockerfile", str(dockerfile), "--api-url", api.url])
    return code, output.read_text() if output.exists() else ""


def test_a_newer_release_is_pinned_with_its_linux_x64_checksum_and_nothing_else_changes(
        api: FakeReleasesApi, dockerfile: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    before = dockerfile.read_text()
    code, outputs = run_bump(api, dockerfile, tmp_path, monkeypatch)
    assert code == 0
    assert outputs == f"changed=true\nversion={LATEST}\n"
    after = dockerfile.read_text()
    assert bump_runner.pinned_release(after) == bump_runner.RunnerRelease(LATEST, LATEST_SHA)
    changed = [(old, new) for old, new in zip(before.splitlines(), after.splitlines(),
                                              strict=True) if old != new]
    assert [new for _, new in changed] == [f"ARG RUNNER_VERSION={LATEST}",
                                           f"ARG RUNNER_SHA256={LATEST_SHA}"]


def test_the_pinned_release_is_left_alone(api: FakeReleasesApi, dockerfile: Path,
                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    pinned = bump_runner.pinned_release(dockerfile.read_text())
    api.answer = release_answer(pinned.version, pinned.sha256)
    before = dockerfile.read_text()
    code, outputs = run_bump(api, dockerfile, tmp_path, monkeypatch)
    assert (code, outputs) == (0, f"changed=false\nversion={pinned.version}\n")
    assert dockerfile.read_text() == before


def test_an_older_release_never_downgrades_the_pin(api: FakeReleasesApi, dockerfile: Path,
                                                   tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    api.answer = release_answer("2.300.0")
    before = dockerfile.read_text()
    assert run_bump(api, dockerfile, tmp_path, monkeypatch)[1].startswith("changed=false")
    assert dockerfile.read_text() == before


@pytest.mark.parametrize(("answer", "reason"), [
    ({**release_answer(), "body": "## What's Changed\n* Fixes"}, "0 linux-x64 checksums"),
    (release_answer(asset_digest="sha256:" + "ee" * 32), "refusing to pin either"),
    ({**release_answer(), "tag_name": "latest"}, "is not vX.Y.Z"),
])
def test_a_release_that_cannot_be_verified_changes_nothing(
        api: FakeReleasesApi, dockerfile: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        answer: dict[str, Any], reason: str) -> None:
    api.answer = answer
    before = dockerfile.read_text()
    code, outputs = run_bump(api, dockerfile, tmp_path, monkeypatch)
    assert (code, outputs) == (1, "")
    assert reason in capsys.readouterr().err
    assert dockerfile.read_text() == before


def test_the_token_travels_in_the_authorization_header_only(
        api: FakeReleasesApi, dockerfile: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    token = "ghs_workflow_token_0123456789"
    run_bump(api, dockerfile, tmp_path, monkeypatch, token=token)
    ((path, headers),) = api.requests
    assert path == "/repos/actions/runner/releases/latest"
    assert headers["Authorization"] == f"Bearer {token}"
    assert token not in capsys.readouterr().out


def test_the_script_keeps_the_line_format_the_image_component_reads(dockerfile: Path) -> None:
    # The image's version tag is read from the same ARG line the bump writes.
    pinned = bump_runner.pinned_release(dockerfile.read_text())
    assert runner_version(REPO_ROOT / "docker" / "Dockerfile") == pinned.version
