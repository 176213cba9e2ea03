"""Fine-tuning adapters on a user's task (``deltameta finetune``) and the shared adapter plumbing.

::

    from deltameta.config import build_config
    from deltameta.finetune import FinetuneConfig, run_finetune

    config = build_config(FinetuneConfig, overrides={"adapter": "runs/meta-train", "tasks": "my_task.jsonl"})
    result = run_finetune(config)          # result.adapter_dir loads with PeftModel.from_pretrained
"""

from deltameta.finetune.adapters import AdapterSource, check_base_matches, ensure_peft_dir, read_preparation, resolve_adapter
from deltameta.finetune.config import FinetuneConfig
from deltameta.finetune.trainer import FinetuneResult, run_finetune

__all__ = [
    "AdapterSource",
    "FinetuneConfig",
    "FinetuneResult",
    "check_base_matches",
    "ensure_peft_dir",
    "read_preparation",
    "resolve_adapter",
    "run_finetune",
]
