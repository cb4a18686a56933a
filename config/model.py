"""One served model (:class:`ModelConfig`): its name, its fields, and the Serve options it builds."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field

from config.model_fields import STORED, ModelFields, is_local_path

# What a served model name may contain: it is the `model` clients send and names the deployment.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"
# oneDNN's primitive cache and ideep's compiled-kernel cache (PyTorch's mkldnn ops): kernel_cache_capacity.
KERNEL_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
# How often a stopping replica (a model's, the Gateway's, the pool controller's) checks whether its requests
# are done; Ray's default is 2 s. An idle replica (scale to zero, a redeploy, `serve shutdown`) is gone
# after one check; running requests still keep it up to graceful_shutdown_timeout_s, and one routed to it
# after the check is refused by the replica and sent elsewhere by Serve.
DRAIN_CHECK_S = 0.2


class ModelConfig(ModelFields):
    """One served model: its name, checkpoint, generation defaults and deployment.

    Example::

        >>> config = ModelConfig(name="org/tiny", model_id="org/tiny", max_replicas=4)
        >>> config.deployment_name, config.deployment_options()["autoscaling_config"]["max_replicas"]
        ('org--tiny', 4)
    """

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False, frozen=True)

    name: str = Field(pattern=NAME_PATTERN, description="The id clients send as `model`.")

    @classmethod
    def from_stored(cls, data: Mapping[str, Any]) -> ModelConfig:
        """A configuration validated when it was written (``model_dump(mode="json")``), read back as data.

        Its shape and bounds are checked again (a record written by an older version, with a field since
        renamed, raises ``ValidationError``), but nothing is looked up on this node's disk: a checkpoint
        path or a template file may exist only where the replicas run.
        """
        return cls.model_validate(dict(data), context={STORED: True})

    @property
    def deployment_name(self) -> str:
        """The Serve deployment of this model: its name, with what Serve's names cannot hold replaced."""
        return self.name.replace("/", "--").replace(":", "-")

    def accepts(self, requested: str) -> bool:
        """Whether a request's ``model`` names this model (its served name or its MODEL_ID)."""
        return requested in (self.name, self.model_id)

    def autoscaling_config(self) -> dict[str, Any]:
        """Keys of ``ray.serve.config.AutoscalingConfig`` (a test checks Ray reads every one)."""
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "initial_replicas": self.min_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "downscale_to_zero_delay_s": self.idle_hold_s,
            "look_back_period_s": self.autoscaling_look_back_s,
            # How often the Gateway's handle reports queued and running requests to the controller.
            # Ray marks the key deprecated in favour of environment variables, but the installed
            # Ray (2.60) reads only this key for the handle's push period; its default of 10 s
            # would delay both the idle countdown and upscaling under load.
            "metrics_interval_s": self.metrics_push_interval_s,
        }

    def deployment_options(self, log_level: str = "INFO") -> dict[str, Any]:
        """``Deployment.options()`` for this model's deployment."""
        return {
            "name": self.deployment_name,
            "autoscaling_config": self.autoscaling_config(),
            "ray_actor_options": {
                "num_cpus": self.num_cpus_per_replica,
                "num_gpus": self.num_gpus_per_replica,
                # Read when the process first compiles a kernel; the warm workers share this env (its hash).
                "runtime_env": {"env_vars": {name: str(self.kernel_cache_capacity) for name in KERNEL_CACHE_VARIABLES}},
            },
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": DRAIN_CHECK_S,
            # Loading a large model can take minutes; Ray's 30 s default would kill a healthy replica.
            "health_check_timeout_s": max(30.0, self.model_load_timeout_s),
            # A stalled engine (check_health) is found within this period plus Serve's failure threshold.
            "health_check_period_s": min(10.0, self.engine_stall_timeout_s / 2),
            "logging_config": {"log_level": log_level},
        }

    def public(self) -> dict[str, Any]:
        """The configuration as /admin shows it (a chat template as its length, not its text)."""
        out = self.model_dump()
        if self.chat_template is not None:
            out["chat_template"] = f"<{len(self.chat_template)} characters>"
        return out


def default_served_name(model_id: str) -> str:
    """A local checkpoint is served under its directory's name; a hub model under its hub ID.

    Example::

        >>> default_served_name("/models/pydoc-gpt-mini/"), default_served_name("facebook/opt-125m")
        ('pydoc-gpt-mini', 'facebook/opt-125m')
    """
    return Path(model_id).expanduser().resolve().name if is_local_path(model_id) else model_id
