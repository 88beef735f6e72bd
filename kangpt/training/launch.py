"""The run's Accelerator, and the launch checks: a run starts only where accelerate formed what the
launcher asked for.

``accelerate launch`` and ``torchrun`` tell every process how many were started (``WORLD_SIZE``)
and, for FSDP and DeepSpeed, which to use (``ACCELERATE_USE_FSDP``, ``ACCELERATE_USE_DEEPSPEED``).
accelerate forms FSDP and DeepSpeed only on accelerators (GPUs and the like). Elsewhere it falls
back without a word: to plain data parallel where the processes form a group, to one lone process
each where they do not (several runs then write one ``out_dir``). :func:`check_launch` refuses both,
and the settings that would fail only later in the run, before anything is loaded or written.
"""

from __future__ import annotations

import logging

import datasets
import torch
from accelerate import Accelerator
from accelerate.tracking import get_available_trackers
from accelerate.utils import (
    DistributedType,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    get_int_from_env,
    parse_flag_from_env,
)

from .run_config import ConfigError, TrainConfig
from .run_dir import RunDir

# The variables a launcher sets to the number of processes it started (torchrun's, then MPI's).
WORLD_SIZE_VARIABLES = ["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"]
SHARDED = {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed"}
NO_SHARDING_ON_CPU = "accelerate runs FSDP and DeepSpeed on GPUs only"
CPU_DATA_PARALLEL = "ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N train.py ..."


def check_launch(accelerator: Accelerator, cfg: TrainConfig) -> None:
    """Raise ConfigError when the processes, or their sharding, are not what the launcher asked for, or
    when a setting of ``cfg`` cannot run under the sharding that formed."""
    _check_processes(accelerator)
    _check_sharding(accelerator)
    check_grid_levers(cfg, accelerator.distributed_type, accelerator.num_processes)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        check_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, cfg)


def requested_sharding() -> str | None:
    """"FSDP" or "DeepSpeed" where the environment asks for it (``accelerate launch`` sets it), or None."""
    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return "FSDP"
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return "DeepSpeed"
    return None


def running(accelerator: Accelerator) -> str:
    """What accelerate runs, in words: ``FSDP``, ``DeepSpeed``, ``data parallel (MULTI_CPU)`` or
    ``a single process``, where, and whether without the process group it needs."""
    kind = accelerator.distributed_type
    if kind in SHARDED:
        what = SHARDED[kind]
    elif kind == DistributedType.NO:
        return f"a single process on {accelerator.device.type}"
    else:
        what = f"data parallel ({kind.value})"
    group = "" if torch.distributed.is_initialized() else " without a process group (no launcher started it)"
    return f"{what} on {accelerator.device.type}{group}"


def _check_processes(accelerator: Accelerator) -> None:
    launched = get_int_from_env(WORLD_SIZE_VARIABLES, 1)
    if launched <= 1 or launched == accelerator.num_processes:
        return
    sharding = requested_sharding()
    if sharding and accelerator.device.type == "cpu":
        cause = f"{sharding} asked for on a machine without GPUs ({NO_SHARDING_ON_CPU})"
    elif accelerator.device.type == "cpu":
        cause = f"processes on CPU without ACCELERATE_USE_CPU=1, which forms their group: {CPU_DATA_PARALLEL}"
    else:
        cause = "a launcher and an accelerate config that disagree on the number of processes"
    raise ConfigError(
        f"the launcher started {launched} processes but accelerate formed a group of "
        f"{accelerator.num_processes}: each would train alone into the same out_dir; likely cause: {cause}"
    )


def _check_sharding(accelerator: Accelerator) -> None:
    sharding = requested_sharding()
    formed = SHARDED.get(accelerator.distributed_type) == sharding and torch.distributed.is_initialized()
    if sharding is None or formed:
        return
    if accelerator.device.type == "cpu":
        advice = f"{NO_SHARDING_ON_CPU}; on CPU train data parallel: {CPU_DATA_PARALLEL}"
    else:
        advice = "start the run with accelerate launch and a config of configs/accelerate/"
    raise ConfigError(
        f"the environment asks for {sharding} (ACCELERATE_USE_{sharding.upper()}=true) but accelerate runs "
        f"{running(accelerator)}; {advice}"
    )


def check_grid_levers(cfg: TrainConfig, distributed_type: DistributedType, num_processes: int) -> None:
    """Refuse the KAN grid levers where parameters are replicated or sharded: they replace parameters
    mid-run, which DDP, FSDP and DeepSpeed (even on one process) cannot follow."""
    if not (cfg.kan_grid_schedule or cfg.kan_grid_update_steps):
        return
    if num_processes == 1 and distributed_type not in SHARDED:
        return
    what = SHARDED.get(distributed_type, "data parallel")
    raise ConfigError(
        "train.kan_grid_schedule and train.kan_grid_update_steps replace parameters during training, "
        f"which {what} cannot follow (this launch: {num_processes} process(es)); train on one process "
        "without sharding, or leave them empty"
    )


def check_deepspeed_config(ds_config: dict, cfg: TrainConfig) -> None:
    """Refuse a DeepSpeed config (DeepSpeed's JSON layout) whose gradient clipping or accumulation
    differs from the run's (DeepSpeed's would be applied), or that cannot write the final model
    (ZeRO-3 without gathering the weights to save)."""
    clip = ds_config.get("gradient_clipping", 0.0)  # DeepSpeed's default: no clipping
    clip = 1.0 if clip == "auto" else clip  # what accelerate fills in for "auto"
    if float(clip) != cfg.grad_clip:
        raise ConfigError(
            f"DeepSpeed clips gradients at {clip} (gradient_clipping in the accelerate config) but "
            f"train.grad_clip is {cfg.grad_clip}; make them equal"
        )
    accumulation = ds_config.get("gradient_accumulation_steps", "auto")  # "auto": the run's
    if accumulation != "auto" and accumulation != cfg.gradient_accumulation_steps:
        raise ConfigError(
            f"DeepSpeed accumulates gradients over {accumulation} micro-batches (gradient_accumulation_steps "
            f"in the accelerate config) but train.gradient_accumulation_steps is "
            f"{cfg.gradient_accumulation_steps}; remove it from the accelerate config or make them equal"
        )
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        raise ConfigError(
            "DeepSpeed ZeRO-3 cannot write the final model/ unless it gathers the sharded weights: set "
            "zero3_save_16bit_model: true in the accelerate config (configs/accelerate/deepspeed-zero3.yaml)"
        )


def make_accelerator(cfg: TrainConfig, run: RunDir) -> Accelerator:
    """The run's Accelerator: mixed precision, gradient accumulation, trackers logging into ``run``."""
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        log_with=installed_trackers(cfg.trackers) or None,
        project_config=ProjectConfiguration(project_dir=str(run.path), logging_dir=str(run.logs)),
    )
    check_launch(accelerator, cfg)  # before anything is loaded or written
    check_mixed_precision(accelerator, cfg)
    if not accelerator.is_main_process:
        datasets.disable_progress_bars()
    # save_state warns at every checkpoint that it drops the LM head tied to the embeddings (reloads fine).
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    return accelerator


def check_mixed_precision(accelerator: Accelerator, cfg: TrainConfig) -> None:
    """Refuse fp16 on CPU: accelerate then neither autocasts nor scales, and trains in float32 unannounced.

    bf16 on CPU is real (accelerate autocasts to bfloat16), so it is kept.
    """
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        source = "train.mixed_precision" if cfg.mixed_precision else "mixed precision (accelerate's config)"
        raise ConfigError(f"{source} 'fp16' needs a GPU: on CPU accelerate ignores it and trains in float32; "
                          "use 'bf16' or 'no'")


def installed_trackers(names: list[str]) -> list[str]:
    """The trackers among ``names`` whose package is installed (metrics.jsonl is written in any case)."""
    available = {tracker.value for tracker in get_available_trackers()}
    return [name for name in names if name in available]
