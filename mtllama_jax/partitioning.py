"""Device meshes, logical axis rules, and the shardings built from them.

The model names every parameter and key activation axis logically (`batch`,
`length`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`, `layers`);
this module alone decides how those names map onto the mesh axes `data`,
`fsdp` and `tensor`. A rule maps a logical name to mesh axes; earlier rules win,
and a mesh axis is used once per array, so activations [batch, length, embed]
put `fsdp` on batch while weights [embed, mlp] put it on embed.

A `Layout` is one mesh with one rule set: the context traced model code runs
in, and the shardings of params, optimizer state and batches. Functions that
need the model take the flax module (or its abstract params), so this module
does not depend on any model family.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("batch", "length")

_BATCH_RULE = ("batch", ("data", "fsdp"))
RULE_SETS: dict[str, tuple[tuple[str, Any], ...]] = {
    # Pure data parallelism: weights replicated, batch split over every device.
    "data": (_BATCH_RULE,),
    # ZeRO-3 style: weights split along `embed` over `fsdp`, gathered per layer.
    "fsdp": (_BATCH_RULE, ("embed", "fsdp")),
    # FSDP plus Megatron-style tensor parallelism over heads, MLP and vocabulary.
    "fsdp_tp": (
        _BATCH_RULE,
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
    ),
}


def logical_axis_rules(name: str = "fsdp_tp") -> tuple[tuple[str, Any], ...]:
    """The named rule set; `fsdp_tp` degrades gracefully on meshes with size-1 axes."""
    if name not in RULE_SETS:
        raise ValueError(f"unknown logical axis rules {name!r}; choose one of {tuple(RULE_SETS)}")
    return RULE_SETS[name]


def make_mesh(
    data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default all); one size may be -1 (the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(
            f"mesh sizes (data={data}, fsdp={fsdp}, tensor={tensor}): at most one may be -1"
        )
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if known <= 0 or len(devices) % known:
            raise ValueError(
                f"mesh sizes (data={data}, fsdp={fsdp}, tensor={tensor}) do not "
                f"divide the {len(devices)} devices"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh sizes (data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}) "
            f"multiply to {math.prod(sizes)}, but there are {len(devices)} devices; "
            "set one size to -1 to use the rest"
        )
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A device mesh and the logical axis rules that map the model's axis names onto it."""

    mesh: Mesh
    rules: tuple[tuple[str, Any], ...]

    @classmethod
    def create(
        cls,
        data: int = 1,
        fsdp: int = -1,
        tensor: int = 1,
        rules: str = "fsdp",
        devices: Sequence[jax.Device] | None = None,
    ) -> Layout:
        """`make_mesh(data, fsdp, tensor, devices)` under the rule set named `rules`."""
        return cls(make_mesh(data, fsdp, tensor, devices), logical_axis_rules(rules))

    @classmethod
    def one_device(cls) -> Layout:
        """The first device alone, nothing sharded (rules `data`)."""
        return cls.create(1, 1, 1, "data", jax.devices()[:1])

    @contextlib.contextmanager
    def context(self):
        """The mesh and the rules in force, as traced model code needs them."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def logical_sharding(self, logical_axes: Sequence[str | None]) -> NamedSharding:
        """The NamedSharding of an array whose axes carry these logical names."""
        return NamedSharding(self.mesh, nn.logical_to_mesh_axes(tuple(logical_axes), self.rules))

    def batch_sharding(self) -> NamedSharding:
        """Sharding of every [batch, length] array of a batch."""
        return self.logical_sharding(BATCH_AXES)

    def replicated(self) -> NamedSharding:
        """A whole copy on every device."""
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch_axes(self) -> tuple[str, ...]:
        """The mesh axes the batch axis is split over."""
        spec = self.batch_sharding().spec
        entry = spec[0] if spec else None
        if entry is None:
            return ()
        return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)

    @property
    def batch_shards(self) -> int:
        """How many pieces the batch axis is split into (batch sizes must be multiples)."""
        return math.prod(self.mesh.shape[a] for a in self.batch_axes)

    def param_shardings(self, abstract_params):
        """NamedShardings of the (unboxed) params, from the boxed params' logical axes.

        Any boxed tree works the same way (the KV cache, say).
        """
        return nn.logical_to_mesh_sharding(
            nn.get_partition_spec(abstract_params), self.mesh, self.rules
        )

    def shardings_like_params(self, abstract_tree, abstract_params):
        """Shardings for a tree that embeds param-shaped leaves (optimizer state, say).

        A leaf whose key path ends with a param's path and has that param's shape
        takes the param's sharding; every other leaf (step counts, scalars) is
        replicated.
        """
        flat = jax.tree_util.tree_flatten_with_path
        shapes = {_path_names(p): leaf.shape for p, leaf in flat(nn.unbox(abstract_params))[0]}
        by_path = {_path_names(p): s for p, s in flat(self.param_shardings(abstract_params))[0]}
        replicated = self.replicated()

        def pick(path, leaf):
            names = _path_names(path)
            for start in range(len(names)):
                suffix = names[start:]
                if suffix in by_path and shapes[suffix] == getattr(leaf, "shape", None):
                    return by_path[suffix]
            return replicated

        return jax.tree_util.tree_map_with_path(pick, abstract_tree)


def abstract_params(module: nn.Module, batch: int = 1, length: int = 8):
    """Shapes, dtypes and logical axes (boxed) of a language model's params; builds nothing."""
    tokens = jnp.zeros((batch, length), jnp.int32)
    return jax.eval_shape(lambda rng: module.init(rng, tokens)["params"], jax.random.key(0))


def init_params(module: nn.Module, layout: Layout, rng: jax.Array):
    """Random params created directly in their sharded layout (no full copy on any device)."""
    shardings = layout.param_shardings(abstract_params(module))
    tokens = jnp.zeros((1, 8), jnp.int32)

    def init(rng):
        return nn.unbox(module.init(rng, tokens)["params"])

    return jax.jit(init, out_shardings=shardings)(rng)


def _path_names(path) -> tuple[str, ...]:
    """('mu', 'layers', 'mlp', ...) from a jax key path of dict keys, attributes or indices."""
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
    return tuple(names)
