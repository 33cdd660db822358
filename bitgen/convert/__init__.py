"""Official checkpoints -> bitgen parameters, one module per model family.

`checkpoint_io.load_state_dict(path)` reads .npz / .safetensors / .pt files into `{name: array}`;
each family module (e.g. `bsq_vit`) maps those official names onto its model's `nnx.State`.
"""

from bitgen.convert.checkpoint_io import CheckpointError, load_state_dict
