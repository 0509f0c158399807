"""Python dependencies install from hashed locks, at the versions the tests ran with.

People edit the pins in `*.in`; scripts/lock_requirements.sh compiles each into a lock listing
every dependency with the SHA-256 of its files, and every installer (scripts/check.sh, the
README's scripts/pulumi.sh, preview.yaml) installs the lock with `--require-hashes`, so a file
replaced on the index, or a dependency nobody pinned, stops the install.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.harness.mock_stack import REPO_ROOT

#: Pins people edit -> the lock compiled from them.
LOCKS = {
    REPO_ROOT / "requirements.in": REPO_ROOT / "requirements.txt",
    REPO_ROOT / "requirements-dev.in": REPO_ROOT / "requirements-dev.txt",
    REPO_ROOT / "policy" / "requirements.in": REPO_ROOT / "policy" / "requirements.txt",
}
_LOCK_ENTRY = re.compile(r"^(\S+?)==(\S+)(?: ; [^\\\n]+)? \\\n((?:    --hash=sha256:[0-9a-f]{64}"
                         r"(?: \\)?\n)+)", re.MULTILINE)


def pins(path: Path) -> dict[str, str]:
    """name -> version of a pin file, following its `-r` includes."""
    found: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("-r "):
            found |= pins(path.parent / line[3:].strip())
        elif line:
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", f"{path.name}: {line} is not pinned exactly"
            found[canonicalize_name(requirement.name)] = specifier.version
    return found


def lock_entries(path: Path) -> dict[str, str]:
    """name -> version of every entry of a lock; each entry must carry its hashes."""
    text = path.read_text()
    entries: dict[str, str] = {canonicalize_name(name): version
               for name, version, _hashes in _LOCK_ENTRY.findall(text)}
    every_pin = re.findall(r"^(\S+?)==", text, re.MULTILINE)
    assert len(entries) == len(every_pin), f"{path.name}: an entry without hashes"
    return entries


def constraints() -> dict[str, str]:
    return {canonicalize_name(name): version for name, version in re.findall(
        r"^(\S+)==(\S+)$", (REPO_ROOT / "constraints.txt").read_text(), re.MULTILINE)}


@pytest.mark.parametrize(("pin_file", "lock"), sorted(LOCKS.items()),
                         ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_pin_is_locked_at_its_version_with_hashes(pin_file: Path, lock: Path) -> None:
    locked = lock_entries(lock)
    assert {name: locked.get(name) for name in pins(pin_file)} == pins(pin_file)
    assert f"--output-file {lock.relative_to(REPO_ROOT)} {pin_file.relative_to(REPO_ROOT)}" in (
        lock.read_text().splitlines()[1]), "the lock names the command that made it"


@pytest.mark.parametrize("lock", sorted(LOCKS.values()),
                         ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_locks_install_the_versions_the_tests_ran_with(lock: Path) -> None:
    tested = constraints()
    differing = {name: (version, tested[name]) for name, version in lock_entries(lock).items()
                 if name in tested and tested[name] != version}
    assert differing == {}


def test_the_program_and_the_policy_pack_are_locked_as_the_tests_run_them() -> None:
    dev = lock_entries(REPO_ROOT / "requirements-dev.txt")
    for lock in (REPO_ROOT / "requirements.txt", REPO_ROOT / "policy" / "requirements.txt"):
        entries = lock_entries(lock)
        assert {name: dev.get(name) for name in entries} == entries, lock.name


@pytest.mark.parametrize(("installer", "command"), [
    ("scripts/check.sh", "--require-hashes -r requirements-dev.txt"),
    ("scripts/pulumi.sh", "--require-hashes -r requirements.txt"),
    (".github/workflows/preview.yaml", "--require-hashes -r requirements.txt"),
    (".github/workflows/preview.yaml", "--require-hashes -r policy/requirements.txt"),
])
def test_every_installer_installs_a_lock_with_hashes_required(installer: str,
                                                              command: str) -> None:
    text = re.sub(r"\\\n\s*", "", (REPO_ROOT / installer).read_text())
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs
    assert any(command in line for line in installs)
    assert not [line for line in installs if "--require-hashes" not in line]
