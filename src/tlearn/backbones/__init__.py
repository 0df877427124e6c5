"""Backbone registry: a name maps to a timm architecture, a weights source and a preprocessing contract."""
from tlearn.backbones.registry import (
    BACKBONES,
    BackboneSpec,
    Preprocessing,
    WeightsUnavailable,
    create_backbone,
    fetch_weights,
    get_spec,
    locate_weights,
    parameter_count,
    state_sha256,
    weights_available,
)

__all__ = ["BACKBONES", "BackboneSpec", "Preprocessing", "WeightsUnavailable", "create_backbone", "fetch_weights",
           "get_spec", "locate_weights", "parameter_count", "state_sha256", "weights_available"]
