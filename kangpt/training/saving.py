"""What a run writes to last: checkpoints (accelerate's ``save_state``, renamed into place when whole,
with a manifest) and the final model folder (``save_pretrained`` with the tokenizer, card and chart)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from transformers import GenerationConfig

from ..io.folders import atomic_folder, publish, remove, temporary_name
from ..io.manifest import folder_problem, write_manifest
from ..modeling_kangpt import KANGPT2LMHeadModel
from .report import plot_losses, write_model_card
from .run_config import RunConfig
from .run_dir import RunDir, read_metrics, writing

NO_MATPLOTLIB = "loss.png not written: matplotlib is not installed (pip install 'kangpt[plot]')"


def save_checkpoint(accelerator: Accelerator, run: RunDir, step: int, keep: int) -> None:
    """``save_state`` into a temporary folder, renamed ``checkpoints/step-N`` when whole (all processes).

    Its manifest (sizes and sha256 of every file, of all processes) is written last, so resuming can
    tell a complete checkpoint from a damaged one. A damaged ``step-N`` already there is replaced.
    """
    final = run.checkpoint(step)
    # This very state may be saved already (resumed and stopped at once); a damaged one is written again.
    if final.is_dir() and folder_problem(final) is None:
        return
    tmp = temporary_name(final)
    with writing(tmp):
        if accelerator.is_main_process:
            remove(tmp)  # left over by a process that died while saving
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(tmp))
        except Exception:
            remove(tmp)  # the part written: on a full disk, room for what comes next
            raise
        accelerator.wait_for_everyone()  # every process has written its files (random_states_<rank>.pkl)
        if accelerator.is_main_process:
            write_manifest(tmp)
            publish(tmp, final)
            run.prune_checkpoints(keep)
    accelerator.wait_for_everyone()


def save_model(
    accelerator: Accelerator, model, tokenizer, run: RunDir, config: RunConfig, metrics: dict
) -> str | None:
    """Write ``model/``: weights, config, tokenizer, generation config, model card, loss curve, atomically.

    Returns the line to print when loss.png could not be written (matplotlib missing), else None.
    """
    state_dict = accelerator.get_state_dict(model)  # gathers sharded weights (FSDP, DeepSpeed): all processes
    if not accelerator.is_main_process:
        return None
    # What is saved is the model the folder describes, empty, with the gathered weights: the prepared one
    # may be of another class (FSDP2 swaps in a subclass from torch, whose files save_pretrained would
    # copy as the folder's remote code) or hold empty shards (ZeRO-3), which the model card counts.
    with torch.device("meta"):
        saved = KANGPT2LMHeadModel(accelerator.unwrap_model(model).config)
    context = saved.config.n_positions
    # No length: generate() then asks for transformers' defaults (or the caller's), and the model stops
    # at its context (KANGPT2LMHeadModel._prepare_generated_length); a saved max_length would make every
    # generate(max_new_tokens=...) warn that both are set. use_cache as GPT-2 saves it (transformers'
    # export for decoder LMs refuses a config without it).
    saved.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=0.8,
        top_k=50,
        use_cache=True,
    )
    tokenizer.model_max_length = context  # truncation=True then fits the model; the cached BPE is untouched
    with writing(temporary_name(run.model)), atomic_folder(run.model) as tmp:
        saved.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        try:
            has_plot = plot_losses(read_metrics(run.metrics), tmp / "loss.png", metrics["unigram_baseline"])
            missing = None
        except ModuleNotFoundError:
            has_plot, missing = False, NO_MATPLOTLIB
        write_model_card(tmp, saved, config, metrics, has_plot)
    return missing


@contextmanager
def outside_zero3(accelerator: Accelerator):
    """Where the main process loads a model alone: while DeepSpeed is configured, transformers builds a
    loaded model under ZeRO-3's ``zero.Init``, a collective that the other processes would never join."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        yield
        return
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(accelerator.state.deepspeed_plugin.dschf)  # accelerate's, kept alive there
