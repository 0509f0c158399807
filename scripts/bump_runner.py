"""Pin the runner image to the newest GitHub Actions runner release, with its checksum.

GitHub refuses to give jobs to a runner more than 30 days behind the newest runner release
when the runner does not update itself, and ours cannot: the image runs it with
`--disableupdate` (an ephemeral runner that updated itself would exit instead of taking its
one job). So the pin in docker/Dockerfile (ARG RUNNER_VERSION and ARG RUNNER_SHA256) has to
move forward; .github/workflows/runner-version.yaml runs this weekly and opens a pull request.

    python3 -m scripts.bump_runner --dockerfile docker/Dockerfile

The checksum comes from the release itself: the notes carry each tarball's SHA-256 between
`<!-- BEGIN SHA linux-x64 -->` markers, and the API reports each asset's digest; when both are
there they must agree. Nothing but the two ARG lines changes, and never to an older release.
Standard library only: it runs on a bare GitHub-hosted runner.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DEFAULT_API_URL = "https://api.github.com"
RELEASE_PATH = "/repos/actions/runner/releases/latest"
TIMEOUT_SECONDS = 30.0

_VERSION_ARG = re.compile(r"^ARG RUNNER_VERSION=(\d+\.\d+\.\d+)$", re.MULTILINE)
_SHA_ARG = re.compile(r"^ARG RUNNER_SHA256=([0-9a-f]{64})$", re.MULTILINE)
_NOTES_SHA = re.compile(r"<!-- BEGIN SHA linux-x64 -->([0-9a-f]{64})<!-- END SHA linux-x64 -->")


class ReleaseError(RuntimeError):
    """The release, or the Dockerfile, is not what a safe bump needs; nothing was written."""


@dataclass(frozen=True)
class RunnerRelease:
    """One actions/runner release: its version and its linux-x64 tarball's SHA-256."""

    version: str
    sha256: str

    @property
    def version_key(self) -> tuple[int, ...]:
        """The version as numbers, for comparing releases."""
        return tuple(int(part) for part in self.version.split("."))


def parse_release(release: object) -> RunnerRelease:
    """The version and the linux-x64 checksum of a releases API answer.

    Raises:
        ReleaseError: without a x.y.z tag, without the checksum in the notes, or when the
            asset digest the API reports disagrees with the notes.
    """
    if not isinstance(release, dict):
        raise ReleaseError(f"the releases API answered {type(release).__name__}, not an object")
    version = str(release.get("tag_name", "")).removeprefix("v")
    if not re.fullmatch(r"\d+\.\d+\.\d+", version):
        raise ReleaseError(f"release tag {release.get('tag_name')!r} is not vX.Y.Z")
    # Markers, not any 64-hex string: the notes hold one checksum per platform.
    notes = _NOTES_SHA.findall(str(release.get("body") or ""))
    if len(notes) != 1:
        raise ReleaseError(f"the notes of v{version} hold {len(notes)} linux-x64 checksums, "
                           "not one: refusing to pin an unverified tarball")
    tarball = f"actions-runner-linux-x64-{version}.tar.gz"
    for asset in release.get("assets") or []:
        digest = str(asset.get("digest") or "") if isinstance(asset, dict) else ""
        if asset.get("name") == tarball and digest and digest != f"sha256:{notes[0]}":
            raise ReleaseError(f"{tarball}: the API reports {digest}, the notes sha256:"
                               f"{notes[0]}: refusing to pin either")
    return RunnerRelease(version=version, sha256=notes[0])


def fetch_latest_release(api_url: str, token: str | None) -> RunnerRelease:
    """The newest actions/runner release, from the GitHub REST API at `api_url`."""
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", api_url):
        raise ReleaseError(f"--api-url {api_url!r} is not an http(s) URL")
    request = urllib.request.Request(f"{api_url.rstrip('/')}{RELEASE_PATH}", headers={
        "Accept": "application/vnd.github+json",
        "User-Agent": "gpu-runners-bump-runner",
        # The token only raises the rate limit; it travels in a header, never an argument.
        **({"Authorization": f"Bearer {token}"} if token else {}),
    })
    with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
        return parse_release(json.loads(response.read()))


def pinned_release(dockerfile_text: str) -> RunnerRelease:
    """The release the Dockerfile pins now."""
    version, sha = _VERSION_ARG.search(dockerfile_text), _SHA_ARG.search(dockerfile_text)
    if version is None or sha is None:
        raise ReleaseError("the Dockerfile must pin ARG RUNNER_VERSION=x.y.z and "
                           "ARG RUNNER_SHA256=<64 hex digits>")
    return RunnerRelease(version=version.group(1), sha256=sha.group(1))


def pin(dockerfile_text: str, release: RunnerRelease) -> str:
    """The Dockerfile with its two runner ARGs set to `release`; nothing else changes."""
    pinned_release(dockerfile_text)  # both lines are there
    text = _VERSION_ARG.sub(f"ARG RUNNER_VERSION={release.version}", dockerfile_text, count=1)
    return _SHA_ARG.sub(f"ARG RUNNER_SHA256={release.sha256}", text, count=1)


def bump(dockerfile: Path, latest: RunnerRelease) -> bool:
    """Pin `latest` in `dockerfile` if it is newer than the pinned release.

    Returns:
        Whether the file changed.
    """
    text = dockerfile.read_text()
    current = pinned_release(text)
    if latest.version_key <= current.version_key:
        return False
    dockerfile.write_text(pin(text, latest))
    return True


def main(argv: list[str] | None = None) -> int:
    """Command line: bump the Dockerfile; write `changed` and `version` to $GITHUB_OUTPUT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dockerfile", type=Path, default=Path("docker/Dockerfile"))
    parser.add_argument("--api-url", default=os.environ.get("GITHUB_API_URL", DEFAULT_API_URL))
    args = parser.parse_args(argv)
    try:
        latest = fetch_latest_release(args.api_url, os.environ.get("GITHUB_TOKEN"))
        changed = bump(args.dockerfile, latest)
    except (ReleaseError, OSError, ValueError) as error:
        print(f"bump_runner: {error}", file=sys.stderr)
        return 1
    print(f"actions/runner {latest.version}: "
          + ("pinned" if changed else "the Dockerfile is already at or past it"))
    output = os.environ.get("GITHUB_OUTPUT")
    if output:
        with open(output, "a", encoding="utf-8") as outputs:
            outputs.write(f"changed={str(changed).lower()}\nversion={latest.version}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
