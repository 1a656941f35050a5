"""Sequence-tiled rebuild (`tiling.rebuild_tile_tokens`): a non-kept layer recomputes its
token-local tensors a tile at a time, forward and backward, and trains exactly like plain
PyTorch; the attention core still runs once per layer; no token-local intermediate spans more
than a tile of the recomputed tokens."""

from __future__ import annotations

import pytest
import torch

from disttrain.model import build_model
from offload.policy import ActivationRuntimeConfig, apply_activation_policy, num_swap_tokens
from planner.plan import LayerActivationPlan as Layer
from test_offload_equivalence import (BATCH, FLASH_BWD, FLASH_FWD, POLICIES, SEQ, TINY,
                                      CountOps, assert_matches, cpp_engine, make_stores,  # noqa: F401
                                      reference, train)

pytestmark = pytest.mark.usefixtures("one_thread")

TILED = {name: POLICIES[name] for name in ("recompute_all", "swap_0.3_cpu", "swap_1.0_cpu",
                                           "swap_0.3_nvme", "recompute_swap_input_cpu",
                                           "mixed_deep")}


class MaxGateRows(CountOps):
    """Largest number of token rows of any (tokens x ffn) matmul output (the MLP's gate/up)."""

    def __init__(self, ffn: int, hidden: int):
        super().__init__()
        self.ffn, self.hidden, self.rows = ffn, hidden, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and \
                out.dim() == 2 and out.shape[-1] == self.ffn and \
                tuple(out.shape) != (self.hidden, self.ffn):  # not down_proj's weight gradient
            self.rows = max(self.rows, out.shape[0])
        return out


@pytest.mark.parametrize("tile", [48, 128])
@pytest.mark.parametrize("policy", sorted(TILED))
def test_tiled_rebuild_matches_plain_pytorch(policy, tile, cpp_engine, tmp_path):
    plans = TILED[policy]
    shape = TINY.replace(num_layers=len(plans))
    model = build_model(shape, seed=0)
    config = ActivationRuntimeConfig(rebuild_tile_tokens=tile)
    with apply_activation_policy(model, plans, stores=make_stores(cpp_engine, tmp_path),
                                 config=config) as runtime:
        history = train(model, shape, count_ops=True, runtime=runtime)
    assert_matches(history, reference(len(plans)))
    for _, _, counts, _ in history:
        assert counts[FLASH_FWD] == len(plans) and counts[FLASH_BWD] == len(plans)


@pytest.mark.parametrize("tile", [0, 32])
def test_no_token_local_intermediate_spans_more_than_a_tile(tile, cpp_engine, tmp_path):
    """Recompute-only layers: every (tokens x ffn) MLP matmul sees at most `tile` tokens (the
    MLP is not tiled here, so only the rebuild tiling can bound it); with tile 0 it sees all."""
    plans = [Layer(swap_fraction=0.0)] * 2
    model = build_model(TINY, seed=0)
    config = ActivationRuntimeConfig(rebuild_tile_tokens=tile)
    with apply_activation_policy(model, plans, stores=make_stores(cpp_engine, tmp_path),
                                 config=config):
        counter = MaxGateRows(TINY.ffn_hidden_size, TINY.hidden_size)
        tokens = torch.randint(0, TINY.vocab_size, (BATCH, SEQ // 2 + 1))
        with counter:
            model(tokens[:, :-1]).sum().backward()
    assert counter.rows == (tile or BATCH * SEQ // 2)


def test_swapped_share_is_not_tiled_and_counts_are_right(cpp_engine, tmp_path):
    """Tiles cover only the recomputed range: swapped tokens and recomputed tokens add up."""
    plans = [Layer(swap_fraction=0.3)] * 2
    model = build_model(TINY, seed=0)
    config = ActivationRuntimeConfig(rebuild_tile_tokens=40)
    with apply_activation_policy(model, plans, stores=make_stores(cpp_engine, tmp_path),
                                 config=config) as runtime:
        (_, _, _, metrics), *_ = train(model, TINY, runtime=runtime)
    swapped = num_swap_tokens(BATCH * SEQ, 0.3)
    for layer in metrics["layers"]:
        assert layer["tokens_swapped"] == swapped
        assert layer["tokens_recomputed"] == BATCH * SEQ - swapped


def test_negative_tile_is_a_config_error():
    with pytest.raises(ValueError, match="tiling.rebuild_tile_tokens"):
        ActivationRuntimeConfig(rebuild_tile_tokens=-1)
