"""ultralytics' YOLOv8n detector, built offline from its yaml: retrofit finds its residual blocks and
the edited model computes exactly what it computes, in eval and in train mode. Its ``stride``
attribute, a tensor of three values, once broke the model copy (``not value``)."""
from __future__ import annotations

import os

import pytest
import torch
from torch.utils._pytree import tree_leaves

import se_retrofit

from helpers import as_if_pretrained, run, small_input

pytestmark = pytest.mark.slow  # zoo: ultralytics models

os.environ.setdefault("YOLO_OFFLINE", "1")  # no font or version checks over the network
tasks = pytest.importorskip("ultralytics.nn.tasks", reason="ultralytics is not installed")

#: yolov8n.yaml: depth multiple 0.33; the backbone's C2f rows have shortcut=True with repeats 3, 6, 6, 3,
#: i.e. max(round(r * 0.33), 1) = 1 + 2 + 2 + 1 Bottlenecks whose forward is x + cv2(cv1(x)) (c1 == c2,
#: e=1.0); the head's four C2f rows have shortcut=False (C2f's default): no addition at all.
YOLOV8N_RESIDUAL_BLOCKS = 6


def _blocks_in_yaml(cfg: dict) -> int:
    depth = cfg["scales"]["n"][0]
    return sum(max(round(repeats * depth), 1) for _, repeats, module, args in cfg["backbone"] + cfg["head"]
               if module == "C2f" and len(args) > 1 and args[1] is True)


@pytest.fixture(scope="module")
def yolo():
    torch.manual_seed(0)
    return as_if_pretrained(tasks.DetectionModel("yolov8n.yaml", verbose=False)).eval()


def _outputs(model, x, training):
    return [t for t in tree_leaves(run(model, x, training)) if isinstance(t, torch.Tensor)]


def test_yolov8n_is_retrofitted_at_exact_identity_with_every_block_of_its_yaml(yolo):
    assert _blocks_in_yaml(tasks.yaml_model_load("yolov8n.yaml")) == YOLOV8N_RESIDUAL_BLOCKS
    shortcuts = [name for name, m in yolo.named_modules() if type(m).__name__ == "Bottleneck" and m.add]
    x = small_input(2, 64)
    model = se_retrofit.retrofit(yolo, example_input=x)
    sites = [site.block for site in se_retrofit.record_of(model).sites]
    assert sites == shortcuts and len(sites) == YOLOV8N_RESIDUAL_BLOCKS
    assert sites[0] == "model.2.m.0" and torch.equal(model.stride, yolo.stride)
    for training in (False, True):
        got, expected = _outputs(model, x, training), _outputs(yolo, x, training)
        assert len(got) == len(expected) > 0 and all(torch.equal(a, b) for a, b in zip(got, expected))
