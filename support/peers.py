"""Peer implementations used for comparisons."""

from matfree import decomp, funm


def matfree_hessenberg(k: int):
    """matfree's k-step Arnoldi (Hessenberg) decomposition with full
    reorthogonalisation."""
    return decomp.hessenberg(k, reortho="full")


def matfree_expm(k: int):
    """matfree's Krylov exponential at fixed depth k: `funm_arnoldi` with a Padé
    exponential of the Hessenberg matrix and matfree's own custom adjoint (the
    algorithm of Krämer et al., NeurIPS 2024).

    **Returns:** `expm(matvec, v, *params) ≈ exp(M) v`, where `matvec(v, *params)`
    applies `M` (scale it by t to get `exp(tA) v`).
    """
    return funm.funm_arnoldi(funm.dense_funm_pade_exp(), matfree_hessenberg(k))
