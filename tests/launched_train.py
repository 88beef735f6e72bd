"""``kangpt train`` as every launched process runs it, with what tests/test_distributed.py checks.

    torchrun ... tests/launched_train.py TRAIN-ARGS
    accelerate launch --config_file configs/accelerate/fsdp.yaml ... tests/launched_train.py TRAIN-ARGS

- FSDP and DeepSpeed on CPU. accelerate forms them on GPUs only: asked for them
  (``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED``, as ``accelerate launch`` sets them from a
  config) with ``ACCELERATE_USE_CPU=1``, it forms plain data parallel over gloo. Here the Accelerator
  switches its state to what was asked once the group has formed, as accelerate's ``state.py`` does
  for GPU backends; everything after (``prepare``, ``save_state``, ``load_state``,
  ``get_state_dict``) is accelerate's own FSDP2 or DeepSpeed path.
- ``DUMP_DIR``: the logits of a fixed batch after every ``save_state`` and ``load_state``
  (``logits-{saved,loaded}-<step>-rank<r>.pt``), and with ``DUMP_RANK_WEIGHTS=1`` every rank's weights
  when the model is saved (``rank<r>.pt``).
- ``STUCK_AFTER=S``: a process still running after S seconds prints its threads' stacks and exits.
- Every process checks that ``model/`` is there when ``train`` returns.
"""

import faulthandler
import os
import re
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

import kangpt.training.launch as launch
import kangpt.training.loop as training
from kangpt.commands import main
from kangpt.training.launch import requested_sharding

DUMP = Path(os.environ.get("DUMP_DIR", "."))


def switch_to_requested_sharding(state) -> None:
    """Make accelerate's state run the FSDP or DeepSpeed that the environment asks for."""
    sharding = requested_sharding()
    if sharding == "FSDP":
        state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables of the config
        kind = DistributedType.FSDP
    elif sharding == "DeepSpeed":
        import deepspeed
        import deepspeed.comm.torch

        # DeepSpeed's shared-memory all-reduce serves inference only; building it compiles C++ for a minute.
        deepspeed.comm.torch.build_shm_op = lambda: None
        deepspeed.comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        plugin = DeepSpeedPlugin()  # from the ACCELERATE_DEEPSPEED_* variables of the config
        plugin.set_mixed_precision(state.mixed_precision)
        plugin.select(_from_accelerator_state=True)
        state.deepspeed_plugins = plugin
        state._mixed_precision = "no"  # DeepSpeed's config holds the precision (as in state.py)
        kind = DistributedType.DEEPSPEED
    else:
        return
    state.distributed_type = PartialState._shared_state["distributed_type"] = kind


class LaunchedAccelerator(Accelerator):
    """The Accelerator of ``kangpt.training.launch``, sharded as asked, dumping logits around checkpoints."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        switch_to_requested_sharding(self.state)

    def prepare(self, *args, **kwargs):
        prepared = super().prepare(*args, **kwargs)
        objects = prepared if isinstance(prepared, (tuple, list)) else (prepared,)  # FSDP2: a list
        models = [obj for obj in objects if isinstance(obj, torch.nn.Module)]
        if models:
            self.the_model = models[0]
        return prepared

    def save_state(self, output_dir=None, **kwargs):
        saved = super().save_state(output_dir, **kwargs)
        self.dump_logits("saved", output_dir)
        return saved

    def load_state(self, input_dir=None, **kwargs):
        loaded = super().load_state(input_dir, **kwargs)
        self.dump_logits("loaded", input_dir)
        return loaded

    @torch.no_grad()
    def dump_logits(self, event: str, checkpoint) -> None:
        """The logits of a fixed batch (every process takes part: the parameters may be sharded)."""
        model = self.the_model
        vocab = self.unwrap_model(model).config.vocab_size
        ids = torch.arange(32, device=self.device).remainder(vocab).view(2, 16)
        model.eval()
        logits = model(input_ids=ids).logits
        model.train()
        step = re.search(r"step-(\d+)", str(checkpoint)).group(1)
        torch.save(logits, DUMP / f"logits-{event}-{int(step)}-rank{self.process_index}.pt")


def save_model_and_dump_weights(accelerator, model, *args):
    weights = accelerator.unwrap_model(model).state_dict()
    torch.save(weights, DUMP / f"rank{accelerator.process_index}.pt")
    return save_model(accelerator, model, *args)


if __name__ == "__main__":
    if "STUCK_AFTER" in os.environ:
        faulthandler.dump_traceback_later(int(os.environ["STUCK_AFTER"]), exit=True)
    launch.Accelerator = LaunchedAccelerator
    save_model = training.save_model
    if os.environ.get("DUMP_RANK_WEIGHTS") == "1":
        training.save_model = save_model_and_dump_weights
    code = main(["train", *sys.argv[1:]])
    out_dir = next(arg.split("=", 1)[1] for arg in sys.argv if arg.startswith("--train.out_dir="))
    if code == 0 and not os.path.isdir(os.path.join(out_dir, "model")):
        sys.exit(f"rank {os.environ['RANK']}: train returned before model/ was written")
    sys.exit(code)
