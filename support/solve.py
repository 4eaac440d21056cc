"""Jitted `KrylovExpm` calls that return the whole `Solution` (value, result and
stats), shared by the tests: one compiled program per solver configuration and shape."""

import equinox as eqx


@eqx.filter_jit
def expmv_solution(solver, operator, vector, t):
    return solver.expmv(operator, vector, t)


@eqx.filter_jit
def phimv_solution(solver, operator, vectors, t):
    return solver.phimv(operator, vectors, t)
