"""The launch checks of ``kangpt.training.launch`` that need no launch: settings that cannot run
under the sharding that formed. (The checks of what formed run multi-process, in test_distributed.py.)"""

import pytest
from accelerate.utils import DistributedType

from kangpt.training.launch import check_deepspeed_config, check_grid_levers
from kangpt.training.run_config import ConfigError, TrainConfig

GRID_LEVERS = [{"kan_grid_schedule": [[4, 10]]}, {"kan_grid_update_steps": [2]}]


@pytest.mark.parametrize("lever", GRID_LEVERS)
@pytest.mark.parametrize(
    "kind, processes, named",
    [(DistributedType.MULTI_CPU, 2, "data parallel"), (DistributedType.FSDP, 1, "FSDP"),
     (DistributedType.DEEPSPEED, 1, "DeepSpeed"), (DistributedType.FSDP, 4, "FSDP")],
)
def test_grid_levers_are_refused_where_parameters_are_replicated_or_sharded(lever, kind, processes, named):
    with pytest.raises(ConfigError) as refused:
        check_grid_levers(TrainConfig(**lever), kind, processes)
    assert str(refused.value) == (
        "train.kan_grid_schedule and train.kan_grid_update_steps replace parameters during training, which "
        f"{named} cannot follow (this launch: {processes} process(es)); train on one process without "
        "sharding, or leave them empty"
    )


@pytest.mark.parametrize("lever", GRID_LEVERS)
def test_grid_levers_run_on_one_unsharded_process(lever):
    check_grid_levers(TrainConfig(**lever), DistributedType.NO, 1)
    check_grid_levers(TrainConfig(), DistributedType.FSDP, 8)  # without levers, anything goes


ZERO2 = {"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}


@pytest.mark.parametrize(
    "ds_config, train, message",
    [
        (ZERO2, {"grad_clip": 0.5}, "DeepSpeed clips gradients at 1.0 (gradient_clipping in the accelerate "
                                    "config) but train.grad_clip is 0.5; make them equal"),
        ({**ZERO2, "gradient_clipping": "auto"}, {"grad_clip": 0.0},  # accelerate fills in 1.0
         "DeepSpeed clips gradients at 1.0 (gradient_clipping in the accelerate config) but train.grad_clip "
         "is 0.0; make them equal"),
        ({"zero_optimization": {"stage": 2}}, {"grad_clip": 1.0},  # DeepSpeed's default: no clipping
         "DeepSpeed clips gradients at 0.0 (gradient_clipping in the accelerate config) but train.grad_clip "
         "is 1.0; make them equal"),
        ({**ZERO2, "gradient_accumulation_steps": 1}, {"gradient_accumulation_steps": 4},
         "DeepSpeed accumulates gradients over 1 micro-batches (gradient_accumulation_steps in the "
         "accelerate config) but train.gradient_accumulation_steps is 4; remove it from the accelerate "
         "config or make them equal"),
        ({"zero_optimization": {"stage": 3}, "gradient_clipping": 1.0}, {},
         "DeepSpeed ZeRO-3 cannot write the final model/ unless it gathers the sharded weights: set "
         "zero3_save_16bit_model: true in the accelerate config (configs/accelerate/deepspeed-zero3.yaml)"),
    ],
)
def test_deepspeed_settings_that_differ_from_the_run_are_refused(ds_config, train, message):
    with pytest.raises(ConfigError) as refused:
        check_deepspeed_config(ds_config, TrainConfig(**train))
    assert str(refused.value) == message


def test_deepspeed_settings_that_agree_with_the_run_pass():
    check_deepspeed_config({**ZERO2, "gradient_accumulation_steps": "auto"}, TrainConfig(grad_clip=1.0))
    check_deepspeed_config({**ZERO2, "gradient_accumulation_steps": 4},
                           TrainConfig(grad_clip=1.0, gradient_accumulation_steps=4))
    zero3 = {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    check_deepspeed_config({"zero_optimization": zero3, "gradient_clipping": 1.0}, TrainConfig())
