"""The private Diffrax API krylovexp relies on, imported in this one place.

`AdjointTerm` and `WrapTerm` are how Diffrax wraps terms for `BacksolveAdjoint` and
for a solver's `step`; the integrators must see through them to find the linear part.
They are not public, so the `diffrax` version bounds in pyproject.toml pin them, and
an upgrade that moves them fails here with a message that names the version.
"""

import diffrax


try:
    from diffrax._term import AdjointTerm, WrapTerm
except ImportError as error:  # pragma: no cover - only with an unsupported Diffrax
    raise ImportError(
        f"krylovexp needs `AdjointTerm` and `WrapTerm` from `diffrax._term`, which "
        f"diffrax {diffrax.__version__} does not provide; install a version within "
        "the bounds of krylovexp's pyproject.toml."
    ) from error


__all__ = ["AdjointTerm", "WrapTerm"]
