"""Activation policies, CPU/NVMe stores and the copy engine front end.

Typical use (the trainer):

    engine = create_engine(CopyEngineConfig(backend="auto"))      # engine.describe() -> run log
    stores = open_stores(plan.activations, engine=engine, cpu_budget_bytes=..., nvme_path=...,
                         nvme_budget_bytes=..., run_id=run_name, rank=rank)
    runtime = apply_activation_policy(model, plan.activations, stores=stores)
    ... forward / backward ...
    metrics["activations"] = runtime.step_metrics()
    runtime.close()                                               # files removed
"""

from offload.engine import CopyEngine, CopyEngineConfig, create_engine
from offload.policy import (ActivationRuntime, ActivationRuntimeConfig, apply_activation_policy,
                            num_swap_tokens)
from offload.nvme_files import check_free_space, sweep_stale
from offload.stores import (CpuStore, CpuStoreConfig, NvmeStore, NvmeStoreConfig, StoreBudgetError,
                            StoreIOError, open_stores)

__all__ = [
    "ActivationRuntime", "ActivationRuntimeConfig", "CopyEngine", "CopyEngineConfig", "CpuStore",
    "CpuStoreConfig", "NvmeStore", "NvmeStoreConfig", "StoreBudgetError", "StoreIOError",
    "apply_activation_policy", "check_free_space", "create_engine", "num_swap_tokens",
    "open_stores", "sweep_stale",
]
