"""Which keys a resumed run may change: those that say how a run is executed or evaluated, not what it
trains (the model, data, losses, optimiser and the schedules' shape). A run directory keeps the
``config.yaml`` it was started with; resuming it with a config that differs in any other key is
refused, with the keys named, before any worker starts. ``docs/configuration.md`` marks these keys.
"""

from __future__ import annotations

from hierdino.config.load import config_diff
from hierdino.config.schema import Config, ConfigError

# Keys (or sections, ending in '.') that may differ between a run's saved config and a resume.
RESUMABLE = (
    "train.steps", "train.stop_at_step", "train.log_every", "train.compile", "train.skip_nonfinite_steps",
    "train.stop_on_collapse", "data.synth_cache", "data.num_cpus_per_map", "data.s3_endpoint", "data.s3_region",
    "data.max_corrupt_fraction", "data.decode", "data.jpeg_draft", "model.init_weights", "model.init_strict",
    "model.init_tower", "scaling.", "checkpoint.", "eval.", "run.",
)


class ResumeError(ConfigError):
    """The run directory holds a run that this config would not continue."""

    kind = "resume"


def resumable(key: str) -> bool:
    """Whether ``key`` (``section.name``) may change when a run resumes."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE)


def check_compatible(saved: Config, cfg: Config, where: str) -> None:
    """Raise ``ResumeError`` naming every key that differs from the saved config and may not."""
    bad = [line for line in config_diff(saved, cfg) if not resumable(line.split(":", 1)[0])]
    if bad:
        raise ResumeError(f"{where} was started with a different config; resuming it with this one would not continue "
                          f"the same run: " + "; ".join(bad) + ". Use the saved config, another run.name, or "
                          "--set run.resume=false to start a fresh run in a new directory.")
