"""Mesh construction, logical-axis rules and batch sharding on 8 CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from bitgen.nn.linear import linear
from bitgen.parallel import (
    DEFAULT_RULES, batch_sharding, global_batch, logical_to_spec, make_mesh, resolve_shape,
    rules_from_config, state_shardings)


def test_resolve_shape_fills_one_axis():
  assert resolve_shape((1, -1, 2), 8) == (1, 4, 2)
  assert resolve_shape((2, 2, 2), 8) == (2, 2, 2)


@pytest.mark.parametrize("shape, match", [
    ((2, 2), "one size per axis"),
    ((-1, -1, 1), "at most one -1"),
    ((3, -1, 1), "not divisible"),
    ((2, 2, 1), "needs 4 devices"),
])
def test_resolve_shape_errors(shape, match):
  with pytest.raises(ValueError, match=match):
    resolve_shape(shape, 8)


def test_make_mesh_axes_and_types():
  mesh = make_mesh({"shape": (2, -1, 2)})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == AxisType.Explicit for t in mesh.axis_types)
  auto = make_mesh({"shape": (1, -1, 1), "axis_types": "auto"})
  assert all(t == AxisType.Auto for t in auto.axis_types)
  with pytest.raises(ValueError, match="axis_types"):
    make_mesh({"shape": (1, -1, 1), "axis_types": "manual"})


def test_logical_to_spec_rules_and_fallbacks():
  mesh = make_mesh({"shape": (2, 2, 2)})
  assert logical_to_spec(("embed", "mlp"), (8, 16), mesh, DEFAULT_RULES) == P("fsdp", "tensor")
  # 3 is not divisible by fsdp=2: replicated on that dimension.
  assert logical_to_spec(("embed", "mlp"), (3, 16), mesh, DEFAULT_RULES) == P(None, "tensor")
  # A mesh axis is used once per array: the second `mlp` dimension stays replicated.
  assert logical_to_spec(("mlp", "mlp"), (4, 4), mesh, DEFAULT_RULES) == P("tensor", None)
  assert logical_to_spec((None, "norm"), (4, 4), mesh, DEFAULT_RULES) == P(None, None)
  assert logical_to_spec(("batch",), (8,), mesh, DEFAULT_RULES) == P(("data", "fsdp"))
  with pytest.raises(ValueError, match="name 1 dimensions"):
    logical_to_spec(("embed",), (4, 4), mesh, DEFAULT_RULES)
  with pytest.raises(ValueError, match="not in mesh"):
    logical_to_spec(("embed",), (4,), mesh, {"embed": "model"})


def test_state_shardings_follow_parameter_metadata():
  mesh = make_mesh({"shape": (2, 2, 2)})
  model = nnx.eval_shape(lambda: linear(8, 6, rngs=nnx.Rngs(0), axes=("embed", "mlp")))
  shardings = nnx.to_pure_dict(state_shardings(nnx.state(model), mesh, DEFAULT_RULES))
  assert shardings["kernel"].spec == P("fsdp", "tensor")
  assert shardings["bias"].spec == P("tensor")
  # Rules come from the config: remap embed to tensor, mlp unmapped.
  rules = rules_from_config({"embed": ["tensor"], "batch": ["data", "fsdp"]})
  shardings = nnx.to_pure_dict(state_shardings(nnx.state(model), mesh, rules))
  assert shardings["kernel"].spec == P("tensor", None)


def test_global_batch_is_sharded_over_data_and_fsdp():
  mesh = make_mesh({"shape": (2, 2, 2)})
  sharding = batch_sharding(mesh, DEFAULT_RULES)
  local = {"image": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "label": np.arange(8)}
  batch = global_batch(local, sharding)
  assert batch["image"].sharding.spec == P(("data", "fsdp"))
  assert len(batch["image"].addressable_shards) == 8
  assert batch["image"].addressable_shards[0].data.shape == (2, 3)
  np.testing.assert_array_equal(np.asarray(batch["label"]), local["label"])
  with pytest.raises(ValueError):
    global_batch({"image": np.zeros((6, 3))}, sharding)


def test_sharded_matmul_on_explicit_mesh_matches_unsharded():
  mesh = make_mesh({"shape": (2, 2, 2)})
  x = np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)
  model = linear(8, 6, rngs=nnx.Rngs(0), axes=("embed", "mlp"))
  expected = model(jnp.asarray(x))
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, state_shardings(state, mesh, DEFAULT_RULES))
  xs = global_batch({"x": x}, batch_sharding(mesh, DEFAULT_RULES))["x"]
  out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, xs)
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_make_mesh_on_a_subset_of_devices():
  mesh = make_mesh({"shape": (1, -1, 1), "devices": 2})
  assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 1}
  with pytest.raises(ValueError, match="devices=9"):
    make_mesh({"shape": (1, -1, 1), "devices": 9})
