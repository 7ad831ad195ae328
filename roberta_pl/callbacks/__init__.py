"""Lightning callbacks, one module per concern:

- :mod:`~roberta_pl.callbacks.steps`: step-boundary bookkeeping, the batch ramp, the validation schedule, stops,
  resume on another data plan;
- :mod:`~roberta_pl.callbacks.checkpointing`: step checkpoints, checkpoint-then-requeue on a signal;
- :mod:`~roberta_pl.callbacks.budget`: the wall-clock budget;
- :mod:`~roberta_pl.callbacks.faults`: the non-finite-loss, loss-scale and skipped-data guards;
- :mod:`~roberta_pl.callbacks.metrics`: throughput/MFU and the loss history;
- :mod:`~roberta_pl.callbacks.progress`: the progress bars.
"""

from roberta_pl.callbacks.budget import (
    BudgetPlanner,
    falling_mask_cost,
    fixed_max_steps,
)
from roberta_pl.callbacks.checkpointing import (
    RequeueOnSignal,
    StepCheckpoint,
    requeue_slurm_job,
)
from roberta_pl.callbacks.faults import (
    DataSkipMonitor,
    LossScaleMonitor,
    NonFiniteLossGuard,
)
from roberta_pl.callbacks.metrics import (
    LossCurve,
    ThroughputLogger,
    model_flops,
    write_loss_curve,
)
from roberta_pl.callbacks.progress import (
    EpochProgressBar,
    RunProgressBar,
    StepProgressBar,
)
from roberta_pl.callbacks.steps import (
    BatchRamp,
    StepBoundary,
    StopAtStep,
    ValidationSchedule,
    WorldSizeResume,
)

__all__ = [
    "BatchRamp",
    "BudgetPlanner",
    "DataSkipMonitor",
    "EpochProgressBar",
    "LossCurve",
    "LossScaleMonitor",
    "NonFiniteLossGuard",
    "RequeueOnSignal",
    "RunProgressBar",
    "StepBoundary",
    "StepCheckpoint",
    "StepProgressBar",
    "StopAtStep",
    "ThroughputLogger",
    "ValidationSchedule",
    "WorldSizeResume",
    "falling_mask_cost",
    "fixed_max_steps",
    "model_flops",
    "requeue_slurm_job",
    "write_loss_curve",
]
