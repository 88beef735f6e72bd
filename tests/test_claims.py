"""eval/claims.py's answers from its measurements: the GPT-2 parameters that reach a loss (interpolated
in log-log between the sizes that bracket it, a bound outside them) and each claim's verdict. (The audit
itself trains for hours; ``python eval/claims.py --quick`` is its smoke run, about 10 minutes.)"""

import math

import pytest


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
    assert claims.forgetting_row(report)[-1] == verdict


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
    assert cells[-1] == "code: holds; english: holds at 1 of 2 sizes"
