"""A periodic 2-D grid split into blocks over a device mesh, and stencil operators on
it whose matvec exchanges halos between neighbouring devices (`jax.shard_map` and
`jax.lax.ppermute`), so that a Krylov sweep on a sharded state never gathers it.

The state lives in *block layout*: shape `(Dx, Dy, bx, by)` for a grid of `(Dx bx,
Dy by)` points, sharded `P(ax, ay, None, None)` so that each device holds one whole
block. krylovexp flattens a state (`jax.flatten_util.ravel_pytree`); a row-major
flattening of the block layout keeps every device's points contiguous, so the flat
vector is sharded as the state is. (A field of shape `(Nx, Ny)` split over both axes
is not: its flattening interleaves the devices' rows, and XLA gathers it.)
"""

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import lineax as lx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, ArrayLike, Float, Inexact


AxisName = str | tuple[str, ...] | None


def _names(axis: AxisName) -> tuple[str, ...]:
    if axis is None:
        return ()
    return (axis,) if isinstance(axis, str) else tuple(axis)


class ShardedGrid(eqx.Module):
    """A periodic 2-D grid of `shape` points, split into `Dx × Dy` blocks over the
    axes of a device mesh, with each device holding one block.

    **Arguments:**

    - `shape`: grid points `(Nx, Ny)`.
    - `mesh`: a `jax.sharding.Mesh` whose axes are of type `AxisType.Auto` (as
        `jax.make_mesh(..., axis_types=(jax.sharding.AxisType.Auto,) * k)` makes
        them; XLA then propagates the state's sharding through the Krylov loops).
    - `axes`: the mesh axis (a name, a tuple of names, or `None`) that splits the
        first grid axis, and the one that splits the second. `Dx` is the product of
        the sizes of the first axis's mesh axes (1 for `None`), likewise `Dy`; `Nx`
        must be divisible by `Dx` and `Ny` by `Dy`.

    States are arrays in block layout, of shape `(Dx, Dy, Nx/Dx, Ny/Dy)`
    ([`krylovexp.ShardedGrid.to_blocks`][] and
    [`krylovexp.ShardedGrid.from_blocks`][] convert), sharded as
    [`krylovexp.ShardedGrid.sharding`][] says.

    ```python
    mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(AxisType.Auto,) * 2)
    grid = kx.ShardedGrid((64, 64), mesh, ("x", "y"))
    u0 = grid.to_blocks(field)             # (2, 4, 32, 16), one block per device
    A = grid.laplacian(kappa_blocks, spacing=1 / 64)
    u = kx.expmv(A, u0, 0.01)              # sharded as u0
    ```
    """

    shape: tuple[int, int] = eqx.field(static=True, converter=tuple)
    mesh: Mesh = eqx.field(static=True)
    axes: tuple[AxisName, AxisName] = eqx.field(static=True, converter=tuple)

    def __check_init__(self):
        if len(self.shape) != 2 or len(self.axes) != 2:
            raise ValueError(
                f"`shape` and `axes` must have two entries each (a 2-D grid); got "
                f"shape {self.shape} and axes {self.axes}."
            )
        used = _names(self.axes[0]) + _names(self.axes[1])
        for name in used:
            if name not in self.mesh.shape:
                raise ValueError(
                    f"Mesh axis {name!r} is not an axis of the mesh "
                    f"{dict(self.mesh.shape)}."
                )
        if len(set(used)) != len(used):
            raise ValueError(f"A mesh axis is used twice in `axes` {self.axes}.")
        for name, kind in zip(self.mesh.axis_names, self.mesh.axis_types, strict=True):
            if name in used and kind != jax.sharding.AxisType.Auto:
                raise ValueError(
                    f"Mesh axis {name!r} is of type {kind}; ShardedGrid needs "
                    "AxisType.Auto axes, e.g. jax.make_mesh(shape, names, "
                    "axis_types=(jax.sharding.AxisType.Auto,) * len(names))."
                )
        for size, blocks, name in zip(self.shape, self.blocks, "xy", strict=True):
            if size % blocks:
                raise ValueError(
                    f"The grid's {name}-size {size} is not divisible by the "
                    f"{blocks} blocks of the mesh axes {self.axes} along it."
                )

    @property
    def blocks(self) -> tuple[int, int]:
        """Blocks `(Dx, Dy)` along the two grid axes."""
        return tuple(
            math.prod(self.mesh.shape[n] for n in _names(a)) for a in self.axes
        )

    @property
    def block_shape(self) -> tuple[int, int]:
        """Points `(bx, by)` per block."""
        return tuple(s // d for s, d in zip(self.shape, self.blocks, strict=True))

    @property
    def spec(self) -> P:
        return P(*self.axes, None, None)

    @property
    def sharding(self) -> NamedSharding:
        """The sharding of a state in block layout: `P(ax, ay, None, None)`."""
        return NamedSharding(self.mesh, self.spec)

    def structure(self, dtype=None) -> jax.ShapeDtypeStruct:
        """The shape and dtype of a state in block layout (default dtype: JAX's
        default float)."""
        dtype = jnp.result_type(float) if dtype is None else dtype
        return jax.ShapeDtypeStruct(self.blocks + self.block_shape, dtype)

    def to_blocks(self, field: ArrayLike) -> Array:
        """`(Nx, Ny)` → block layout `(Dx, Dy, bx, by)`, sharded as `sharding` (under
        `jit` a sharding constraint; outside, the array is put on the mesh). Local
        reshapes only: no communication when `field` is already split over the same
        axes."""
        field = jnp.asarray(field)
        if field.shape != self.shape:
            raise ValueError(
                f"Expected a field of shape {self.shape}, got {field.shape}."
            )
        (dx, dy), (bx, by) = self.blocks, self.block_shape
        blocks = field.reshape(dx, bx, dy, by).transpose(0, 2, 1, 3)
        return lax.with_sharding_constraint(blocks, self.sharding)

    def from_blocks(self, blocks: Array) -> Array:
        """Block layout `(Dx, Dy, bx, by)` → the field `(Nx, Ny)`, split over the mesh
        as the blocks were."""
        (dx, dy), (bx, by) = self.blocks, self.block_shape
        field = blocks.reshape(dx, dy, bx, by).transpose(0, 2, 1, 3)
        field = field.reshape(self.shape)
        return lax.with_sharding_constraint(
            field, NamedSharding(self.mesh, P(*self.axes))
        )

    # -----------------------------------------------------------------------------
    # Halo exchange.

    def _halo(self, block: Array, width: int) -> Array:
        """Inside `shard_map`: the local block `(bx, by)` padded by `width` points on
        each side with the neighbours' edges (periodic). Rows first, then columns of
        the padded rows, so the corners come from the diagonal neighbours."""
        for axis, name in enumerate(self.axes):
            names = _names(name)
            size = math.prod(self.mesh.shape[n] for n in names)
            n = block.shape[axis]
            first = lax.slice_in_dim(block, 0, width, axis=axis)
            last = lax.slice_in_dim(block, n - width, n, axis=axis)
            if size == 1:
                before, after = last, first
            else:
                # Device i sends its last rows on to i + 1 (they are the rows before
                # that device's block) and its first rows back to i - 1.
                forward = [(i, (i + 1) % size) for i in range(size)]
                backward = [(i, (i - 1) % size) for i in range(size)]
                before = lax.ppermute(last, names, forward)
                after = lax.ppermute(first, names, backward)
            block = jnp.concatenate([before, block, after], axis=axis)
        return block

    def _local(self, fn: Callable, num_fields: int, width: int) -> Callable:
        """`fn(u_padded, *fields)` on every device's block, as a function of global
        block-layout arrays."""
        if not 1 <= width <= min(self.block_shape):
            raise ValueError(
                f"The halo width must be between 1 and the smaller side of a block "
                f"{self.block_shape}; got {width}."
            )

        def local(u, *fields):
            squeeze = lambda a: a.reshape(a.shape[2:])  # noqa: E731
            out = fn(self._halo(squeeze(u), width), *map(squeeze, fields))
            return out.reshape((1, 1) + out.shape)

        specs = (self.spec,) * (1 + num_fields)
        return jax.shard_map(local, mesh=self.mesh, in_specs=specs, out_specs=self.spec)

    def pad(self, blocks: Array, width: int = 1) -> Array:
        """Every block padded by `width` points on each side with its neighbours'
        edges (periodic): block layout `(Dx, Dy, bx + 2 width, by + 2 width)`, one
        halo exchange."""
        return self._local(lambda u: u, 0, width)(blocks)

    def stencil(
        self,
        fn: Callable[..., Array],
        *fields: Inexact[Array, "dx dy bx by"],
        width: int = 1,
        dtype=None,
        tags: Any = (),
    ) -> lx.FunctionLinearOperator:
        """A linear stencil operator on block-layout states, its matvec one halo
        exchange and `fn` on each device's block.

        **Arguments:**

        - `fn`: `fn(u, *fields) -> out` on one device: `u` the local block padded by
            `width` points on each side (shape `(bx + 2 width, by + 2 width)`, see
            [`krylovexp.ShardedGrid.pad`][]), `fields` the local blocks `(bx, by)` of
            `fields`, `out` of shape `(bx, by)`. Linear in `u`.
        - `fields`: coefficient fields in block layout, closed over by the operator:
            they are its parameters, so gradients reach them.
        - `width`: halo width (1 for 5- and 9-point stencils).
        - `dtype`: the state's dtype (default: that of the first field, else JAX's
            default float).
        - `tags`: Lineax tags (e.g. `lineax.symmetric_tag`).

        **Returns:** a `lineax.FunctionLinearOperator` on block-layout states.
        """
        if dtype is None:
            dtype = fields[0].dtype if fields else jnp.result_type(float)
        matvec = self._local(fn, len(fields), width)
        return lx.FunctionLinearOperator(
            lambda u: matvec(u, *fields), self.structure(dtype), tags
        )

    def laplacian(
        self,
        coefficient: Float[Array, "dx dy bx by"] | None = None,
        spacing: float | tuple[float, float] = 1.0,
        dtype=None,
    ) -> lx.FunctionLinearOperator:
        """The periodic 5-point diffusion operator `∇·(κ∇u)`: on every face the
        flux `κ_f (u_neighbour − u) / h²` with `κ_f` the mean of the two points'
        coefficients (`κ ≡ 1`, the Laplacian, when `coefficient` is `None`).
        Symmetric (negative semidefinite for `κ ≥ 0`), tagged
        `lineax.symmetric_tag`, so krylovexp uses Lanczos.

        **Arguments:**

        - `coefficient`: κ in block layout, or `None`. The operator's parameters are
            the face coefficients computed from it (one halo exchange, here), so
            gradients reach κ.
        - `spacing`: grid spacing `h`, or `(hx, hy)`.
        - `dtype`: the state's dtype when `coefficient` is `None`.

        **Returns:** a `lineax.FunctionLinearOperator`; one matvec exchanges one
        halo row (column) with each neighbour along each split axis.
        """
        hx, hy = spacing if isinstance(spacing, (tuple, list)) else (spacing, spacing)
        scales = (1 / hx**2, 1 / hy**2)
        interior = (slice(1, -1), slice(1, -1))

        def shifted(a, axis, by):
            index = list(interior)
            index[axis] = slice(1 + by, a.shape[axis] - 1 + by)
            return a[tuple(index)]

        if coefficient is None:

            def local(u):
                centre = u[interior]
                out = 0
                for axis, scale in enumerate(scales):
                    neighbours = shifted(u, axis, 1) + shifted(u, axis, -1)
                    out = out + scale * (neighbours - 2 * centre)
                return out.astype(u.dtype)

            return self.stencil(local, dtype=dtype, tags=lx.symmetric_tag)

        # Face coefficients, per point: the face after it and the face before it
        # along each axis, times 1/h².
        padded = self.pad(coefficient)
        centre = padded[..., 1:-1, 1:-1]
        faces = []
        for axis, scale in enumerate(scales):
            for by in (1, -1):
                index = [slice(1, -1), slice(1, -1)]
                n = padded.shape[2 + axis]
                index[axis] = slice(1 + by, n - 1 + by)
                neighbour = padded[(Ellipsis, *index)]
                faces.append(0.5 * scale * (centre + neighbour))

        def local_variable(u, after_x, before_x, after_y, before_y):
            centre = u[interior]
            out = 0
            for axis, (after, before) in enumerate(
                ((after_x, before_x), (after_y, before_y))
            ):
                out = out + after * (shifted(u, axis, 1) - centre)
                out = out - before * (centre - shifted(u, axis, -1))
            return out

        return self.stencil(local_variable, *faces, dtype=dtype, tags=lx.symmetric_tag)
