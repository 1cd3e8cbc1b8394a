"""The engine's evaluation: re-ranked rows next to the plain ones, and the plain ones unchanged by re-ranking."""

from __future__ import annotations

import pytest
import torch
from cli_runs import standin_overrides
from standin_model import StandIn

from amfor.config import build_config
from amfor.engine.build import build_data
from amfor.evaluation.protocol import TEST_PAIRS, VAL_PAIRS, evaluate, format_table


@pytest.fixture(scope="module")
def setting(tiny_root):
    cfg = build_config(overrides=standin_overrides(tiny_root))
    data = build_data(cfg, test=True)
    torch.manual_seed(0)
    model = StandIn(num_classes=10, num_cameras=6).eval()  # untrained: evaluation needs features, not accuracy
    return cfg, data, model


def run(setting, overrides, pairs=TEST_PAIRS, **kw):
    cfg, data, model = setting
    cfg = build_config(overrides=standin_overrides(cfg.data.root, **overrides))
    return evaluate(model, data, pairs, cfg, torch.device("cpu"), model.input_size, **kw)


def test_rerank_adds_rerank_rows_and_keeps_the_plain_ones(setting):
    plain = run(setting, {"test.rerank": False})
    both = run(setting, {"test.rerank": True})
    assert set(plain) == {"query", "query_whole"}
    assert set(both) == {"query", "query_whole", "query_rerank", "query_whole_rerank"}
    for label in plain:
        assert both[label] == plain[label]
        assert both[f"{label}_rerank"]["mAP"] != plain[label]["mAP"]  # re-ranking changed the ranking
    assert "query_whole_rerank" in format_table(both)


def test_validation_can_leave_re_ranking_out(setting):
    if "val_query" not in setting[1].splits():
        pytest.skip("the tiny set has no validation split")
    assert set(run(setting, {"test.rerank": True}, VAL_PAIRS, rerank=False)) == {"val"}
