"""The engine's layout: building and running apart, one model builder name, no classes or functions defined
inside functions (module-level classes and methods read top to bottom)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from cli_runs import standin_overrides
from standin_model import StandIn

import amfor.engine
from amfor.config import build_config
from amfor.engine.build import SetupError, build_model

ENGINE = Path(amfor.engine.__file__).parent


def nested_definitions(path: Path) -> list[str]:
    """`function: inner` for each class or function defined inside a function of the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += [f"{path.name}:{node.name}: {inner.name}" for inner in ast.walk(node) if inner is not node
                      and isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return found


def test_no_class_or_function_is_defined_inside_a_function():
    assert [found for path in sorted(ENGINE.glob("*.py")) for found in nested_definitions(path)] == []


def test_the_engine_builds_the_configured_model_under_one_name(tiny_root):
    """`amfor.engine.build_model(cfg, ...)` builds model.name with model.kwargs; `create_model` is only amfor's."""
    assert not hasattr(amfor.engine, "create_model")
    cfg = build_config(overrides=standin_overrides(tiny_root, **{"model.kwargs.dim": 8, "model.kwargs.num_cameras": 3}))
    torch.manual_seed(0)
    model = amfor.engine.build_model(cfg, 5, num_cameras=3)
    assert isinstance(model, StandIn) and model.num_classes == 5 and model.cam.num_embeddings == 3
    assert model.classifier.in_features == 8


def test_list_model_arguments_reach_the_model_as_lists(tiny_root):
    cfg = build_config(overrides=[*standin_overrides(tiny_root, **{"model.name": "amfor_vit_tiny_patch16"}),
                                  "model.kwargs.img_size=[64,32]", "model.kwargs.text=false",
                                  "model.kwargs.amff=false"])
    model = build_model(cfg, 5, num_cameras=3)
    assert model.input_size == (64, 32) and type(model.backbone.img_size) is tuple


def test_a_bad_model_argument_is_a_setup_error(tiny_root):
    cfg = build_config(overrides=standin_overrides(tiny_root, **{"model.kwargs.widht": 8}))
    with pytest.raises(SetupError, match="model standin_model:create_standin: .*widht"):
        build_model(cfg, 5, num_cameras=3)
