"""FedIT's edge learner: the federated LoRA methods' shared local training (`fedfleet.edge_agent.learners._lora`)."""

from __future__ import annotations

from fedfleet.edge_agent.learners._lora import LoraLearner
from fedfleet.edge_agent.learners.base import register


@register
class FedITLearner(LoraLearner):
    name = "fedit"
