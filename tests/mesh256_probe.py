"""Run by tests/test_mesh_256.py with 256 fake devices: one train step on a 16 x 16 mesh.

Prints one JSON line: the losses (and a 1-device run's) and, per parameter, its PartitionSpec
and shard fraction.
"""

import json
import sys

import jax

from tests.test_parallelism import make_config, run_losses


def main() -> None:
  assert jax.device_count() == 256, jax.device_count()
  cfg = make_config("tiny_gemma1_mha", ici_fsdp=16, ici_tensor=16)
  for key, value in dict(num_heads=16, num_kv_heads=16, head_dim=16, d_model=256, ffn_dim=512,
                         vocab_size=512).items():
    cfg.model[key] = value
  losses, state = run_losses(cfg, jax.devices(), steps=2)
  cfg.mesh.ici_fsdp, cfg.mesh.ici_tensor = 1, 1
  single, _ = run_losses(cfg, jax.devices()[:1], steps=2)
  leaves = {}
  for path, x in jax.tree_util.tree_leaves_with_path(state["params"]):
    shard = x.addressable_shards[0].data
    leaves[jax.tree_util.keystr(path)] = {"spec": [s if s is None or isinstance(s, str)
                                                   else list(s) for s in x.sharding.spec],
                                          "fraction": shard.size / x.size}
  print(json.dumps({"losses": losses.tolist(), "single_device": single.tolist(),
                    "leaves": leaves}))
  sys.stdout.flush()


if __name__ == "__main__":
  main()
