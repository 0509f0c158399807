"""Kubernetes' own syntax of label keys and values, checked before a pod is sent.

The rules are those of the API server (k8s.io/apimachinery, `pkg/util/validation`:
`IsQualifiedName` for keys, `IsValidLabelValue` for values), so that a label the API server
would refuse with a 422 after the run has waited for it is refused at once, naming the option:

- a key is `[prefix/]name`, with at most one `/`;
- the prefix, when there is a `/`, is a non-empty lowercase RFC 1123 subdomain: at most 253
  characters, dot-separated parts of lowercase letters, digits and `-`, each part starting and
  ending with a letter or digit (so `example..com` and `Example.com` are refused);
- the name, and a non-empty value, are at most 63 characters of letters, digits, `-`, `_` and
  `.`, starting and ending with a letter or digit.

Prefixes such as `kubernetes.io/` are not refused: the API server accepts them on pods (only
the node authorizer restricts them, on nodes). The keys gpu_runners sets itself are refused by
`pod_options`, which knows them.

Standard library only: the CLI checks labels without importing the Kubernetes client.
"""

from __future__ import annotations

import re

MAX_NAME_LENGTH = 63
MAX_PREFIX_LENGTH = 253

# fullmatch everywhere: with `re.match` and `$`, a trailing newline would pass.
_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

_NAME_RULE = (
    f"at most {MAX_NAME_LENGTH} letters, digits, '-', '_' or '.', starting and ending with a "
    "letter or digit"
)
_PREFIX_RULE = (
    f"a DNS subdomain: at most {MAX_PREFIX_LENGTH} characters, dot-separated parts of lowercase "
    "letters, digits and '-', each starting and ending with a letter or digit"
)


def label_key_problem(key: str) -> str | None:
    """Why the API server would refuse `key` as a label key, or None if it would accept it.

    Args:
        key: A label key, `[prefix/]name`.

    Returns:
        One line saying what is wrong, or None.
    """
    parts = key.split("/")
    if len(parts) > 2:
        return f"a label key has at most one '/' ([prefix/]name), {key!r} has {len(parts) - 1}"
    if len(parts) == 2:
        prefix, name = parts
        if not prefix:
            return f"the prefix of {key!r} is empty; drop the '/' or name a prefix"
        if len(prefix) > MAX_PREFIX_LENGTH or not _DNS1123_SUBDOMAIN.fullmatch(prefix):
            return f"the prefix {prefix!r} of {key!r} is not {_PREFIX_RULE}"
    else:
        (name,) = parts
    if not name:
        return f"the name part of {key!r} is empty"
    if len(name) > MAX_NAME_LENGTH or not _NAME.fullmatch(name):
        return f"the name part {name!r} of {key!r} is not {_NAME_RULE}"
    return None


def label_value_problem(value: str) -> str | None:
    """Why the API server would refuse `value` as a label value, or None (empty is allowed).

    Args:
        value: A label value.

    Returns:
        One line saying what is wrong, or None.
    """
    if value and (len(value) > MAX_NAME_LENGTH or not _NAME.fullmatch(value)):
        return f"the value {value!r} is neither empty nor {_NAME_RULE}"
    return None
