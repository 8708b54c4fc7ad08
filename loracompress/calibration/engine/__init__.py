"""The one calibration loop, in parts: config, loss, schedule, accelerator, signals, checkpoints,
student (start and read-out) and the loop itself (:mod:`.loop`, whose docstring describes a step)."""

from loracompress.calibration.engine.checkpoints import remove_checkpoints
from loracompress.calibration.engine.config import (
    DEFAULT_EPOCHS,
    DEFAULT_MAX_STEPS,
    EngineConfig,
    config_dict,
)
from loracompress.calibration.engine.loop import Engine, EngineResult, Interrupted, ProgressFn, module_depths
from loracompress.calibration.engine.loss import distillation_loss, hidden_state_loss
from loracompress.calibration.engine.schedule import lr_factor
from loracompress.calibration.engine.student import svd_student

__all__ = [
    "DEFAULT_EPOCHS",
    "DEFAULT_MAX_STEPS",
    "Engine",
    "EngineConfig",
    "EngineResult",
    "Interrupted",
    "ProgressFn",
    "config_dict",
    "distillation_loss",
    "hidden_state_loss",
    "lr_factor",
    "module_depths",
    "remove_checkpoints",
    "svd_student",
]
