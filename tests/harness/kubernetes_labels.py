"""Label keys and values the Kubernetes API server accepts and refuses: one table for every test.

The cases are those of apimachinery's own tests (`pkg/util/validation/validation_test.go`:
`TestIsQualifiedName`, `TestIsValidLabelValue`, and prefixes from `TestIsDNS1123Subdomain`),
plus the ones this project met (`example..com/team`, a trailing newline). Both the runtime's
check (gpu_runners.label_syntax) and the fake API server (tests/fakes/kube_api.py) are held to
them, each implemented on its own, so neither can drift from Kubernetes unnoticed.
"""

from __future__ import annotations

VALID_KEYS = (
    "simple",
    "now-with-dashes",
    "1-starts-with-num",
    "1234",
    "simple/simple",
    "now-with-dashes/simple",
    "now-with-dashes/now-with-dashes",
    "now.with.dots/simple",
    "now-with.dashes-and.dots/simple",
    "1-num.2-num/3-num",
    "1234/5678",
    "1.2.3.4/5678",
    "Uppercase_Is_OK_123",
    "example.com/Uppercase_Is_OK_123",
    "requests.storage-foo",
    "a" * 63,
    "a" * 253 + "/" + "b" * 63,
    # The API server limits a subdomain's length as a whole, not each dot-separated part.
    "a" * 64 + ".example.com/team",
    # Reserved for Kubernetes by convention, yet accepted on pods.
    "kubernetes.io/team",
    "k8s.io/team",
    "example.com/team",
)

INVALID_KEYS = (
    "nospecialchars%^=@",
    "cantendwithadash-",
    "-cantstartwithadash-",
    "only/one/slash",
    "Example.com/abc",
    "example_com/abc",
    "example.com/",
    "/simple",
    "a" * 64,
    "a" * 254 + "/abc",
    "",
    "example..com/team",
    ".example.com/team",
    "example.com./team",
    "-example.com/team",
    "example-.com/team",
    "aB.a/team",
    "a:b/team",
    "a@b/team",
    "a b/team",
    "team\n",
    "example.com/team\n",
)

VALID_VALUES = (
    "simple",
    "now-with-dashes",
    "1-starts-with-num",
    "end-with-num-1",
    "1234",
    "a" * 63,
    "",
    "Uppercase_Is_OK_123",
    "now.with.dots",
)

INVALID_VALUES = (
    "nospecialchars%^=@",
    "Tama-nui-te-rā.is.Māori.sun",
    "\\backslashes\\are\\bad",
    "-starts-with-dash",
    "ends-with-dash-",
    ".starts.with.dot",
    "ends.with.dot.",
    "a" * 64,
    "no spaces",
    "ml\n",
    "a/b",
)
