"""Adapter deltas (LoRA, TARP), the TAMS architecture controller, the meta-state and PEFT export."""

from deltameta.deltas.config import DeltaConfig, OpSpec, parse_op
from deltameta.deltas.controller import ArchController, build_controller, gumbel_softmax, op_cost, temperature
from deltameta.deltas.export import ExportResult, export_peft, load_meta_adapter, load_task_examples, read_task_examples
from deltameta.deltas.layer import DeltaLinear
from deltameta.deltas.model import (
    apply_op_weights,
    collect_fold_moments,
    collect_sigma_means,
    count_delta_parameters,
    delta_layers,
    delta_parameters,
    expand_for_tasks,
    inject_deltas,
    set_trainable,
    static_export,
    task_embedding,
)
from deltameta.deltas.state import MetaState, MetaStateError, build_from_meta_state, load_meta_state, resolve_meta_state_dir, save_meta_state

__all__ = [
    "ArchController",
    "DeltaConfig",
    "DeltaLinear",
    "ExportResult",
    "MetaState",
    "MetaStateError",
    "OpSpec",
    "apply_op_weights",
    "build_controller",
    "build_from_meta_state",
    "collect_fold_moments",
    "collect_sigma_means",
    "count_delta_parameters",
    "delta_layers",
    "delta_parameters",
    "expand_for_tasks",
    "export_peft",
    "gumbel_softmax",
    "inject_deltas",
    "load_meta_adapter",
    "load_meta_state",
    "load_task_examples",
    "op_cost",
    "parse_op",
    "read_task_examples",
    "resolve_meta_state_dir",
    "save_meta_state",
    "set_trainable",
    "static_export",
    "task_embedding",
    "temperature",
]
