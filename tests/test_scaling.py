"""eval/scaling.py: the quality protocol on a size ladder, its budgets and its fits."""

import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kangpt.training.run_config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def scaling(eval_script):
    return eval_script("scaling")


def protocol_base(quality, *extra):
    flat = [f"--{s}.{k}={json.dumps(v)}" for s, values in quality.PROTOCOL.items() for k, v in values.items()]
    return load_config(ROOT / "configs" / "default.yaml", [*flat, *extra])


def test_sizes_are_parsed_ordered_and_checked(scaling):
    assert scaling.parse_sizes("4x128,2x64x2,4x96", 4) == [(2, 64, 2), (4, 96, 4), (4, 128, 4)]
    for text, message in (
        ("4x", "LAYERSxWIDTH"),
        ("4x128x4x2", "LAYERSxWIDTH"),
        ("4x0", "LAYERSxWIDTH"),
        ("4x130", "not a multiple of 4 heads"),
        ("4x64,4x64", "twice"),
    ):
        with pytest.raises(ConfigError, match=message):
            scaling.parse_sizes(text, 4)


def test_every_size_trains_on_the_same_tokens_per_parameter(scaling):
    quality = scaling.quality
    base = protocol_base(quality)
    tokens_per_step = base.train.batch_size * base.data.block_size
    # At the one-size protocol's shape its ratio gives back its own schedule.
    reference = scaling.size_config(base, (4, 128, 4), 614_400 / 1_334_016)
    same = ("max_steps", "warmup_steps", "log_interval")
    assert {k: getattr(reference.train, k) for k in same} == {k: quality.PROTOCOL["train"][k] for k in same}
    for size in ((4, 32, 4), (4, 72, 4), (2, 192, 6)):
        config = scaling.size_config(base, size, 0.46)
        assert (config.model["n_layer"], config.model["n_embd"], config.model["n_head"]) == size
        gpt2 = scaling.gpt2_parameters(base, size)
        assert abs(config.train.max_steps * tokens_per_step - 0.46 * gpt2) <= tokens_per_step / 2
        assert config.train.warmup_steps == round(config.train.max_steps / 10)
        assert config.train.eval_interval == config.train.max_steps  # the final validation loss only
        # Every model of the size is parameter-matched to its GPT-2.
        variants = quality.parse_variants("mlp,kan,rational", [])
        configs = {n: quality.run_config(config, "code", v, 1e-3, 1, ROOT) for n, v in variants.items()}
        counts = quality.parameter_match(configs, base.data.vocab_size)
        assert counts["mlp"]["total"] == gpt2


def test_the_default_ladder_spans_8x_and_trains_its_smallest_size_300_steps(scaling):
    """The ladder's own settings (LADDER) sit on the protocol's and under the user's overrides; at its
    defaults every size is 8x apart end to end and the smallest trains for 300 steps or more."""
    base = scaling.ladder_base(str(ROOT / "configs" / "default.yaml"), [])
    assert (base.data.vocab_size, base.train.batch_size) == (1024, 4)
    assert base.train.warmup_steps == scaling.quality.PROTOCOL["train"]["warmup_steps"]
    assert (
        scaling.ladder_base(
            str(ROOT / "configs" / "default.yaml"), ["--data.vocab_size=4096"]
        ).data.vocab_size
        == 4096
    )
    sizes = scaling.parse_sizes(scaling.DEFAULT_SIZES, base.model["n_head"])
    params = [scaling.gpt2_parameters(base, size) for size in sizes]
    assert len(sizes) >= 4 and params[-1] / params[0] >= 8
    smallest = scaling.size_config(base, sizes[0], scaling.DEFAULT_TOKENS_PER_PARAM)
    assert smallest.train.max_steps >= 300


def test_training_flops_are_counted_once_per_model_and_vocabulary(scaling, monkeypatch):
    counted = []
    monkeypatch.setattr(
        scaling, "flops_per_token", lambda config, vocab: counted.append(vocab) or vocab * 10.0
    )
    base = scaling.size_config(protocol_base(scaling.quality), (2, 32, 4), 0.1)
    variants = scaling.quality.parse_variants("mlp,kan", [])
    shared = {"tokens": 1000, "corpora": {"code": {"vocab_size": 512}, "english": {"vocab_size": 512}}}
    flops = scaling.training_flops(base, shared, ["code", "english"], variants, ROOT)
    assert counted == [512, 512] and flops["english"] == flops["code"] == {"mlp": 5_120_000, "kan": 5_120_000}
    counted.clear()
    apart = {"tokens": 10, "corpora": {"code": {"vocab_size": 512}, "english": {"vocab_size": 300}}}
    flops = scaling.training_flops(base, apart, ["code", "english"], variants, ROOT)
    assert counted == [512, 512, 300, 300] and flops["english"]["kan"] == 30_000


def test_flops_per_token_of_gpt2_match_the_closed_form(scaling):
    """Forward 2 FLOPs per weight of every matmul (12 d^2 per layer, d x V for the head), backward
    twice that; attention's T x T products are small at T = 8."""
    base = protocol_base(scaling.quality, "--data.block_size=8", "--model.n_positions=8")
    layers, width, vocab = 2, 64, 512
    config = scaling.size_config(base, (layers, width, 4), 1.0)
    config.model["ffn_type"] = "mlp"
    closed_form = 6 * (12 * layers * width**2 + width * vocab)
    assert scaling.flops_per_token(config, vocab) == pytest.approx(closed_form, rel=0.03)
    config.model["ffn_type"] = "kan"
    assert scaling.flops_per_token(config, vocab) > 0


def test_power_law_and_its_standard_error_match_numpy(scaling):
    params = [1e5, 2e5, 4e5, 8e5, 1.6e6]
    exact = [5.0 * p**-0.1 for p in params]
    law = scaling.power_law(params, exact)
    assert law["alpha"] == pytest.approx(0.1) and law["a"] == pytest.approx(5.0)
    assert law["alpha_stderr"] == pytest.approx(0, abs=1e-9)
    noisy = [loss * (1 + e) for loss, e in zip(exact, [0.01, -0.02, 0.015, 0.0, -0.01], strict=True)]
    law = scaling.power_law(params, noisy)
    coef, cov = np.polyfit(np.log(params), np.log(noisy), 1, cov=True)
    assert law["alpha"] == pytest.approx(-coef[0])
    assert law["alpha_stderr"] == pytest.approx(math.sqrt(cov[0, 0]))
    assert math.isnan(scaling.fit_line([1.0, 2.0], [3.0, 4.0])["stderr"])


@pytest.mark.parametrize(
    ("gaps", "answer"),
    [
        ([-0.05, -0.1, -0.16, -0.2], "KAN-GPT-2's advantage grows"),
        ([-0.2, -0.16, -0.1, -0.05], "KAN-GPT-2's advantage shrinks"),
        ([-0.1, -0.12, -0.09, -0.11], "KAN-GPT-2's advantage holds"),
        ([0.05, 0.1, 0.16, 0.2], "KAN-GPT-2's deficit grows"),
        ([0.2, 0.16, 0.1, 0.05], "KAN-GPT-2's deficit shrinks"),
    ],
)
def test_the_gap_trend_is_named_from_its_slope_and_uncertainty(scaling, gaps, answer):
    trend = scaling.gap_trend([1e5, 2e5, 4e5, 8e5], gaps)
    assert trend["answer"] == answer
    assert trend["mean"] == pytest.approx(sum(gaps) / 4)


def test_scaling_refuses_bad_arguments_with_one_line(capsys, scaling):
    for argv, message in (
        (["--sizes", "4x128"], "at least two sizes"),
        (["--sizes", "4xabc,4x64"], "--sizes"),
        (["--tokens-per-param", "0"], "--tokens-per-param"),
        (["--tokens-per-param", "nan"], "--tokens-per-param"),
        (["--models", "kan,mlp"], "--models must start with mlp"),
        (["--corpora", "poems"], "--corpora"),
        (["--jobs", "0"], "--jobs"),
    ):
        assert scaling.main(argv) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only without CUDA")
def test_scaling_refuses_cuda_without_a_gpu(capsys, scaling):
    assert scaling.main(["--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert "--device cuda" in err and err.count("\n") == 1


def test_slots_go_to_the_largest_waiting_size_first(scaling):
    """One slot, held while five runs queue (in a known order); then it goes by size, ties in turn."""
    slots, order, release = scaling.Slots(1), [], threading.Event()

    def run(rank, i):
        with slots.for_size(rank):
            order.append((rank, i))
            if i == 0:
                release.wait()

    threads = [threading.Thread(target=run, args=(9, 0))]
    threads[0].start()
    while not order:
        time.sleep(0.001)
    for i, rank in enumerate([0, 2, 1, 2, 0], 1):
        threads.append(threading.Thread(target=run, args=(rank, i)))
        threads[-1].start()
        while len(slots.waiting) < i:  # queued before the next one starts
            time.sleep(0.001)
    release.set()
    for thread in threads:
        thread.join()
    assert order == [(9, 0), (2, 2), (2, 4), (1, 3), (0, 1), (0, 5)]
