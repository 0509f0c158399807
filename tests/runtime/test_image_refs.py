"""Image references normalized as the container runtimes read them, and allowedImages patterns."""

from __future__ import annotations

import fnmatch

import pytest

from gpu_runners.errors import UsageError
from gpu_runners.image_refs import ImageReference, normalize_pattern, parse_image_reference

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(("text", "expected"), [
    ("python:3.12-slim", ImageReference("docker.io", "library/python", "3.12-slim")),
    ("pytorch/pytorch:2.4.0-cuda12.4-cudnn9-runtime",
     ImageReference("docker.io", "pytorch/pytorch", "2.4.0-cuda12.4-cudnn9-runtime")),
    ("nvcr.io/nvidia/pytorch:24.08-py3", ImageReference("nvcr.io", "nvidia/pytorch", "24.08-py3")),
    ("nvidia/cuda:12.4.1-runtime-ubuntu22.04",
     ImageReference("docker.io", "nvidia/cuda", "12.4.1-runtime-ubuntu22.04")),
    (f"ghcr.io/acme/train@{DIGEST}", ImageReference("ghcr.io", "acme/train", None, DIGEST)),
    (f"localhost:5000/train:1@{DIGEST}", ImageReference("localhost:5000", "train", "1", DIGEST)),
    ("index.docker.io/library/ubuntu", ImageReference("docker.io", "library/ubuntu")),
])
def test_references_are_normalized_to_registry_repository_tag_and_digest(
    text: str, expected: ImageReference,
) -> None:
    assert parse_image_reference(text) == expected


def test_a_reference_without_tag_or_digest_asks_for_latest_and_pins_to_a_digest() -> None:
    image = parse_image_reference("ghcr.io/acme/train")

    assert image.reference == "latest"
    assert image.pinned(DIGEST) == f"ghcr.io/acme/train@{DIGEST}"


@pytest.mark.parametrize(("text", "problem"), [
    ("ghcr.io/Acme/train:1", "repository part 'Acme'"),
    ("ghcr.io/acme/train@sha256:abc", "a digest is sha256:<64 lowercase hex digits>"),
    ("ghcr.io/acme/train:-bad", "tag '-bad'"),
    ("", "is not an image reference"),
    ("ghcr.io/acme/train :1", "is not an image reference"),
])
def test_malformed_references_are_refused_naming_the_part(text: str, problem: str) -> None:
    with pytest.raises(UsageError, match="image: .*" + problem.replace("(", r"\(").replace(
            ")", r"\)").replace("[", r"\[").replace("*", r"\*")):
        parse_image_reference(text)


@pytest.mark.parametrize(("pattern", "image", "allowed"), [
    ("pytorch/pytorch:*", "pytorch/pytorch:2.4.0-cuda12.4-cudnn9-runtime", True),
    ("pytorch/pytorch:*", "ghcr.io/pytorch/pytorch:2.4", False),
    ("python:3.*-slim", "python:3.12-slim", True),
    ("ghcr.io/acme/*", "ghcr.io/acme/train:1", True),
    ("ghcr.io/acme/*", "acme/train:1", False),  # Docker Hub's acme, not GHCR's
    ("*", "anything/at:all", True),
])
def test_patterns_match_the_full_form_of_what_is_asked(pattern: str, image: str,
                                                       allowed: bool) -> None:
    full = str(parse_image_reference(image))

    assert fnmatch.fnmatchcase(full, normalize_pattern(pattern)) is allowed
