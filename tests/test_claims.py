"""eval/claims.py's answers from its measurements: the GPT-2 parameters that reach a loss (interpolated
in log-log between the sizes that bracket it, a bound outside them) and each claim's verdict; and the
smoke run of the size ladder (eval/scaling.py) and of the audit on it, at tiny sizes (the audit itself
trains for hours)."""

import json
import math

import numpy as np
import pytest
import yaml
from transformers import AutoConfig, AutoModelForCausalLM


@pytest.fixture(scope="module")
def claims(eval_script):
    return eval_script("claims")


POINTS = [(100, 4.0), (200, 3.5), (400, 3.2)]  # GPT-2: (parameters, test loss) at one size's tokens


def test_the_equivalent_parameters_are_interpolated_in_log_log_between_the_bracketing_sizes(claims):
    t = (math.log(3.35) - math.log(3.5)) / (math.log(3.2) - math.log(3.5))
    expected = math.exp(math.log(200) + t * (math.log(400) - math.log(200)))
    found = claims.equivalent(POINTS, 3.35, 150)
    assert found["equivalent"] == pytest.approx(expected) and found["bound"] is None
    assert found["multiplier"] == pytest.approx(expected / 150)
    assert claims.equivalent(POINTS, 3.5, 200)["multiplier"] == pytest.approx(1.0)  # GPT-2's own loss


def test_outside_the_sizes_tried_the_answer_is_a_bound_not_an_extrapolation(claims):
    better = claims.equivalent(POINTS, 3.0, 100)
    assert (better["bound"], better["equivalent"], better["multiplier"]) == (">", 400, 4.0)
    worse = claims.equivalent(POINTS, 4.5, 200)
    assert (worse["bound"], worse["equivalent"], worse["multiplier"]) == ("<", 100, 0.5)


def test_a_curve_that_turns_up_is_read_at_its_first_crossing(claims):
    overfit = [(100, 4.0), (200, 3.5), (400, 3.8)]  # the largest GPT-2 memorises: its loss rises again
    found = claims.equivalent(overfit, 3.75, 100)
    assert 100 < found["equivalent"] < 200  # on the rising-size side first


def spread(*values):
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "values": list(values)}


@pytest.mark.parametrize("kan, gpt2, verdict", [
    ((0.10, 0.12), (0.30, 0.35), "holds: KAN-GPT-2 forgets less, beyond the spread"),
    ((0.30, 0.35), (0.10, 0.12), "does not hold: KAN-GPT-2 forgets more, beyond the spread"),
    ((0.10, 0.30), (0.20, 0.25), "cannot tell: inside the spread"),
])
def test_forgetting_is_decided_by_the_spread_of_the_seeds(claims, kan, gpt2, verdict):
    report = {"forgetting": {"kan": {"rise": spread(*kan), "english": spread(3.0, 3.1)},
                             "mlp": {"rise": spread(*gpt2), "english": spread(3.0, 3.1)}}}
    assert claims.forgetting_row(report)[4] == verdict


def test_the_parameter_claim_holds_where_every_multiplier_is_above_one(claims):
    row = {"kan_parameters": 100, "kan_loss": 3.0, "gpt2": POINTS}
    report = {"parameters": {
        "code": {"s1": {**row, "multiplier": 1.4, "equivalent": 140, "bound": None},
                 "s2": {**row, "multiplier": 4.0, "equivalent": 400, "bound": ">"}},
        "english": {"s1": {**row, "multiplier": 1.2, "equivalent": 120, "bound": None},
                    "s2": {**row, "multiplier": 0.5, "equivalent": 50, "bound": None}},
    }}
    cells = claims.parameters_row(report)
    assert cells[2] == "code: s1: 1.40x, s2: >4.00x; english: s1: 1.20x, s2: 0.50x"
    assert cells[4] == "code: holds; english: holds at 1 of 2 sizes"


def test_scaling_cannot_be_told_from_a_ladder_whose_epochs_grow_with_size(claims):
    law = {"alpha": 0.17, "alpha_stderr": 0.01}
    fit = {"slope": 0.06, "stderr": 0.2, "answer": "KAN-GPT-2's advantage holds",
           "alpha": {"kan": law, "mlp": law}}
    gaps = {"code": {"s1": {"epochs": 0.1}, "s2": {"epochs": 0.4}},
            "english": {"s1": {"epochs": 1.4}, "s2": {"epochs": 11.8}}}
    report = {"scaling": {"code": fit, "english": fit}, "overfitting": {"gaps": gaps}}
    code, english = claims.scaling_row(report)[4].split("; english: ")
    assert code == "code: does not hold (the gap's trend: KAN-GPT-2's advantage holds)"
    assert english.startswith("cannot tell at this scale, its epochs grow with size (1.4 to 11.8")


def test_overfitting_does_not_hold_where_a_lead_at_few_epochs_is_a_deficit_at_many(claims):
    def size(epochs, kan, gpt2, kan_gap, gpt2_gap):
        return {"epochs": epochs, "kan": {"test": spread(*kan), "gap": kan_gap},
                "mlp": {"test": spread(*gpt2), "gap": gpt2_gap}}

    reversed_lead = {"s1": size(1.4, (4.9, 5.0), (5.1, 5.2), 0.0, 0.0),
                     "s2": size(11.8, (3.9, 3.95), (3.5, 3.55), 0.9, 1.1)}
    assert claims.overfitting_verdict(reversed_lead) == (
        "does not hold: better at 1.4 epochs (-0.20), worse at 11.8 epochs (+0.40); "
        "its held-out minus training gap the larger at 0 of 2 sizes")
    kept = {"s1": reversed_lead["s1"], "s2": size(11.8, (3.4, 3.45), (3.5, 3.55), 0.5, 1.1)}
    assert claims.overfitting_verdict(kept).startswith("holds: ")
    wider = {"s1": size(1.4, (4.9, 5.0), (5.1, 5.2), 0.2, 0.0),
             "s2": size(11.8, (3.4, 3.45), (3.5, 3.55), 1.2, 1.1)}
    assert claims.overfitting_verdict(wider) == ("does not hold: its held-out minus training gap the larger "
                                                 "at 2 of 2 sizes")


def test_the_formulas_and_the_pruning_are_judged_on_every_seed(claims):
    def row(symbolic_test, pruned, tuned_val=None):  # tuned_val: validation after pruning 30% and a fine-tune
        tuned = {} if tuned_val is None else {"0.3": {"steps": 9, "val": tuned_val, "test": 4.0}}
        return {"test": 4.0, "val": 4.0, "symbolic_test": symbolic_test, "r2_mean": 0.9,
                "pruned_fraction": pruned, "fine_tuned": tuned}

    close = {"symbolic": {"code": [row(4.02, 0.4), row(4.03, 0.3)]}}
    verdict = claims.symbolic_row(close)[4]
    assert verdict == "formulas within 1%: holds; 30% of hidden units pruned within it: reached"
    tuned = {"symbolic": {"code": [row(4.02, 0.4), row(4.03, 0.2, tuned_val=4.03)]}}  # 30%: +0.75% tuned
    verdict = claims.symbolic_row(tuned)[4]
    assert verdict.endswith("pruned within it: reached with a fine-tune of a tenth of the run's steps")
    one_off = {"symbolic": {"code": [row(4.02, 0.4), row(4.05, 0.2, tuned_val=4.05)]}}  # 1.25% off, both
    verdict = claims.symbolic_row(one_off)[4]
    assert verdict == ("formulas within 1%: does not hold; 30% of hidden units pruned within it: "
                       "not reached, also with a fine-tune of a tenth of the run's steps")


@pytest.fixture(scope="module")
def scaling(eval_script):
    return eval_script("scaling")


TINY = [  # a tiny shape, corpus and budget for the smoke runs of both protocols
    *("--seeds", "1", "--jobs", "2", "--model.n_positions=32", "--data.max_documents=60"),
    *("--data.vocab_size=300", "--data.block_size=32", "--train.batch_size=4", "--train.eval_blocks=8"),
]


@pytest.mark.slow
def test_the_quick_ladder_and_audit_table_every_claim_from_their_runs(tmp_path, monkeypatch, capsys, scaling,
                                                                       claims):
    """``eval/scaling.py --quick`` (two tiny sizes, both corpora, one seed) trained, fitted, tabled and
    plotted; then ``eval/claims.py --quick`` on its folder: the ladder's runs reused, every claim's row
    and table from runs it trained, and a second call trains nothing."""
    monkeypatch.setenv("KANGPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "claims"
    ladder = [*("--sizes", "1x32x2,1x48x2", "--lrs", "2e-3", "--tokens-per-param", "2", "--quick"), *TINY]
    assert scaling.main([*ladder, "--device", "cpu", "--out", str(out / "ladder")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "ladder" / "scaling.json").read_text())
    assert list(report["ladder"]) == ["1x32", "1x48"]
    for size, entry in report["ladder"].items():
        steps = entry["settings"]["max_steps"]
        gpt2 = entry["parameters"]["english"]["mlp"]["total"]
        assert abs(steps * 4 * 32 - 0.4 * gpt2) <= 4 * 32  # --quick: a fifth of 2 tokens per parameter
        for name in ("mlp", "kan"):
            row = entry["results"]["english"][name]
            assert len(row["test"]["values"]) == 1 and math.isfinite(row["test"]["mean"])
            total = entry["parameters"]["english"][name]["total"]
            assert f"| {size} | {row['label']} | {total:,} |" in printed
    fits = report["fits"]["english"]
    losses = [e["results"]["english"]["kan"]["test"]["mean"] for e in report["ladder"].values()]
    params = [e["parameters"]["english"]["kan"]["total"] for e in report["ladder"].values()]
    slope = np.polyfit(np.log(params), np.log(losses), 1)[0]
    assert fits["kan"]["parameters"]["alpha"] == pytest.approx(-slope)
    assert fits["kan"]["gap"]["answer"].startswith("KAN-GPT-2's") and "gap" not in fits["mlp"]
    assert (out / "ladder" / "scaling.png").stat().st_size > 0

    argv = [*("--quick", "--sizes", "1x32x2,1x48x2", "--above", "1x64x2", "--forgetting-size", "1x32x2"),
            *TINY, "--out", str(out)]
    assert claims.main(argv) == 0
    printed, trained = capsys.readouterr()
    assert f"{out / 'ladder'}/" not in trained  # every run of the ladder reused
    report = json.loads((out / "claims.json").read_text())
    rows = [line for line in printed.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row[2:4] for row in rows] == [f"{n}." for n in range(1, 7)] and (out / "claims.md").is_file()
    assert (out / "claims.png").stat().st_size > 0
    # 1. GPT-2's points are the test losses of the runs trained at the neighbouring sizes.
    point = report["parameters"]["english"]["1x32"]["gpt2"]
    neighbour = out / "parameters" / "1x48-on-1x32-tokens" / "runs" / "english" / "mlp"
    losses = [read_test_loss(folder) for folder in sorted(neighbour.iterdir())]
    assert len(losses) == 1 and any(loss == pytest.approx(losses[0]) for _, loss in point)
    # 4. The levers were trained, each parameter-matched.
    assert set(report["overfitting"]["levers"]) == set(claims.LEVERS)
    assert all(len(r["test"]["values"]) == 1 for r in report["overfitting"]["levers"].values())
    dropout = out / "levers" / "runs" / "english" / "mlp-dropout"  # the reference: GPT-2 with its dropout
    run = next(dropout.iterdir())
    assert yaml.safe_load((run / "run.yaml").read_text())["model"]["resid_pdrop"] == 0.1
    assert report["overfitting"]["gpt2_dropout"]["test"]["values"] == [pytest.approx(read_test_loss(run))]
    # 5. The symbolic models are model folders of formulas.
    assert [r["seed"] for r in report["symbolic"]["english"]] == [1]
    folder = out / "symbolic" / "english" / "seed-1" / "symbolic-model"
    assert AutoModelForCausalLM.from_pretrained(folder).config.kan_basis == "symbolic"
    # ... and pruned, then fine-tuned from the pruned folder: the losses are that run's.
    tuned = report["symbolic"]["english"][0]["fine_tuned"]["0.3"]
    assert tuned["test"] == pytest.approx(read_test_loss(out / "pruning" / "runs" / "english" / "0.3-seed-1"))
    pruned = AutoConfig.from_pretrained(out / "symbolic" / "english" / "seed-1" / "pruned-0.3")
    kan_run = next((out / "ladder" / "1x48" / "runs" / "english" / "kan").iterdir())
    whole = AutoConfig.from_pretrained(kan_run / "model")
    assert sum(pruned.kan_hidden_size) <= 0.75 * whole.n_layer * whole.kan_hidden_size
    # 6. Forgetting: the code loss before is the code run's own test loss.
    before = report["forgetting"]["kan"]["code_before"]["values"]
    code_run = next((out / "ladder" / "1x32" / "runs" / "code" / "kan").glob("*-seed-1"))
    assert before[0] == pytest.approx(read_test_loss(code_run), abs=1e-4)
    assert claims.main(argv) == 0
    assert "python train.py" not in capsys.readouterr().err


def read_test_loss(folder):
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return next(r["test_loss"] for r in records if "test_loss" in r)
