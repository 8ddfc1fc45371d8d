"""The task names a job's `task` field takes, and the [method] defaults a task sets over its method's.

No imports: the job config and the strategies both read it at load time.
"""

from __future__ import annotations

from typing import Any

CLASSIFICATION = "classification"
DIFFUSION = "moving-digits-diffusion"
CUSTOM = "custom"  # a model and data of your own: [model], [data], [eval] (fedfleet.coordinator.tasks.custom)
TASKS = (CLASSIFICATION, DIFFUSION, CUSTOM)

# a task's [method] defaults over its method's Config (the job's [method] table still overrides them).
# The diffusion task over fedavg's: plain SGD barely moves this denoiser (300 steps at lr 2 took the held-out
# loss from 0.169 to 0.165), local Adam trains it; lr 2e-4 since the fleet starts from the centre's pre-trained
# generator (docs/results, issue 25: the fleet's budget and lr, a rule between 1e-3 and 2e-4)
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    DIFFUSION: {"optimizer": "adam", "lr": 2e-4, "epochs": 2, "batch": 64},
}
