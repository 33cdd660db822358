"""Training: the generic loop over tasks, optimizer, EMA, sharded state, checkpoints, metrics.

`run(config, workdir)` is the entry point (see `bitgen.train.config` for the config layout).
"""

from bitgen.train.trainer import TrainResult, build_task, restore, run
