"""eval/decode_ops.py: the operations of a decode step, counted (what the KAN block's decode path cuts)."""

import pytest
import torch

from kangpt.kan import KANLinear


@pytest.fixture(scope="module")
def decode_ops(eval_script):
    return eval_script("decode_ops")


def test_the_counter_counts_each_operation_dispatched(decode_ops):
    x = torch.ones(3)
    with decode_ops.OpCounter() as counter:
        x.add(1).mul_(2).sum()
    assert counter.counts == {"aten.add": 1, "aten.mul_": 1, "aten.sum": 1}


def test_a_grouped_kan_layer_evaluates_a_decoding_token_in_twenty_operations(decode_ops):
    """One token through a grouped B-spline layer without autograd, its piece table made: the interval,
    the piece's coefficients, Horner's rule, the linear and SiLU terms, the matrix product, and the check
    that the coefficients are those of the table (27 operations before the decode path)."""
    layer = KANLinear.from_settings(16, 8, sharing="group", groups=4)
    x = torch.randn(1, 16)
    with torch.no_grad():
        layer(x)  # builds the piece table
        with decode_ops.OpCounter() as counter:
            layer(x)
    assert sum(counter.counts.values()) <= 20, counter.counts


def test_kan_gpt2_decodes_with_fewer_than_twice_gpt2s_operations(decode_ops):
    gpt2, kan = (sum(decode_ops.decode_step_ops(name, "tiny", 8).values()) for name in ("gpt2", "kan"))
    assert gpt2 < kan < 2 * gpt2
