#!/usr/bin/env python
"""The reference trainer: hybrid next-token + SMLMT-MAML pretraining of a PicoDecoder on Lightning Fabric.

    python examples/train_smlmt.py                                   # = picomaml train (tiny-cpu)
    python examples/train_smlmt.py --config pico-maml-tiny --devices 8
    python examples/train_smlmt.py --set hybrid.ratio=0.25 --max-steps 500 --resume auto

The loop lives in the installed package, `picomaml/train/recipe.py` (setup, train step, log and
evaluate, save, summary: about 300 lines that use the public pieces), so that `picomaml train` runs it
from a plain `pip install`, and this script runs exactly the same recipe. To change the loop, copy it:

    picomaml cp recipe my_run/          # -> my_run/train_smlmt.py, a standalone script to edit
    picomaml cp tiny-cpu my_run/        # -> my_run/tiny-cpu.yaml
    python my_run/train_smlmt.py --config my_run/tiny-cpu.yaml --run-dir runs/mine

Shipped configs: tiny-cpu (the default), lm-only, meta-only, pico-maml-{tiny,small,medium,large}
(`picomaml/train/configs/`); `--config` takes one of these names or any YAML path.
"""

import sys

from picomaml.train import recipe

if __name__ == "__main__":
    sys.exit(recipe.run(sys.argv[1:], prog="train_smlmt.py"))
