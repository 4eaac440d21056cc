"""Recognising the user's Diffrax terms: which problem a step integrates (linear,
semilinear or general), seen through Diffrax's wrappers, with errors that name the
expected structure; and the vector field of a term."""

import diffrax
import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu

from ._diffrax_private import AdjointTerm, WrapTerm
from ._terms import LinearTerm


_SEMILINEAR = "MultiTerm(LinearTerm(...), ODETerm(...))"


def _unwrap(term):
    while isinstance(term, WrapTerm):
        term = term.term
    return term


def _scalar_control(term) -> bool:
    try:
        control = eqx.filter_eval_shape(term.contr, 0.0, 1.0)
    except Exception:  # noqa: BLE001
        return False
    leaves = jtu.tree_leaves(control)
    # A bare term's control may be a Python float (Diffrax wraps terms into arrays).
    return len(leaves) == 1 and jnp.ndim(leaves[0]) == 0


def _describe(terms) -> str:
    if isinstance(terms, diffrax.MultiTerm):
        inner = ", ".join(_describe(t) for t in terms.terms)
        return f"MultiTerm({inner})"
    term = _unwrap(terms)
    if isinstance(term, diffrax.AbstractTerm):
        return f"{type(term).__name__}(...)"
    return type(term).__name__


class _Problem:
    """The validated terms of a step: `kind` is "linear", "semilinear" or "general"."""

    def __init__(self, kind, linear=None, nonlinear=None, general=None):
        self.kind = kind
        self.linear = linear  # unwrapped LinearTerm
        self.nonlinear = nonlinear  # (wrapped) term of N
        self.general = general  # (wrapped) term of f


def _has_adjoint_term(terms) -> bool:
    leaves = jtu.tree_leaves(
        terms, is_leaf=lambda x: isinstance(x, diffrax.AbstractTerm)
    )
    for leaf in leaves:
        if isinstance(leaf, diffrax.MultiTerm):
            if _has_adjoint_term(leaf.terms):
                return True
        elif isinstance(_unwrap(leaf), AdjointTerm):
            return True
    return False


def _classify(name: str, terms, kinds: tuple[str, ...]) -> _Problem:
    if _has_adjoint_term(terms):
        raise ValueError(
            f"`{name}` cannot integrate the adjoint system that "
            "`diffrax.BacksolveAdjoint` builds (it is not of the form "
            f"`{_SEMILINEAR}`). Use the default "
            "`adjoint=diffrax.RecursiveCheckpointAdjoint()`, or "
            "`diffrax.ForwardMode()` with "
            "`krylov=krylovexp.KrylovExpm(adjoint=krylovexp.DirectAdjoint())`, or give "
            "the backward pass a Diffrax solver: "
            "`adjoint=diffrax.BacksolveAdjoint(solver=diffrax.Kvaerno5())`."
        )
    if isinstance(terms, diffrax.MultiTerm):
        if (
            "semilinear" in kinds
            and len(terms.terms) == 2
            and isinstance(_unwrap(terms.terms[0]), LinearTerm)
            and not isinstance(terms.terms[1], diffrax.MultiTerm)
            and not isinstance(_unwrap(terms.terms[1]), LinearTerm)
            and _scalar_control(terms.terms[1])
        ):
            return _Problem(
                "semilinear", linear=_unwrap(terms.terms[0]), nonlinear=terms.terms[1]
            )
    elif isinstance(terms, diffrax.AbstractTerm):
        term = _unwrap(terms)
        if isinstance(term, LinearTerm):
            if "linear" in kinds:
                return _Problem("linear", linear=term)
        elif "general" in kinds and _scalar_control(terms):
            return _Problem("general", general=terms)
    expected = []
    if "semilinear" in kinds:
        expected.append(
            f"`terms=diffrax.{_SEMILINEAR}` for a semilinear problem "
            "y' = L y + N(t, y, args) (the linear term first; "
            "`MultiTerm(LinearTerm(...), ODETerm(...))`)"
        )
    if "linear" in kinds:
        expected.append("`terms=krylovexp.LinearTerm(...)` for y' = L y")
    if "general" in kinds:
        expected.append("`terms=diffrax.ODETerm(...)` for y' = f(t, y, args)")
    hint = ""
    if (
        isinstance(terms, diffrax.MultiTerm)
        and len(terms.terms) == 2
        and isinstance(_unwrap(terms.terms[1]), LinearTerm)
    ):
        hint = (
            " (The linear term comes first: Diffrax's IMEX solvers take "
            "`MultiTerm(explicit, implicit)`, krylovexp takes "
            "`MultiTerm(LinearTerm(L), ODETerm(N))`.)"
        )
    raise ValueError(
        f"`{name}` expects "
        + ", or ".join(expected)
        + f"; got `{_describe(terms)}`."
        + hint
    )


def _vf(term, t, y, args):
    """The vector field of an ODE-like (scalar-control) term, through Diffrax's
    wrappers: `term.vf_prod` with a unit control."""
    one = jnp.ones((), dtype=jnp.result_type(t))
    return term.vf_prod(t, y, args, one)
