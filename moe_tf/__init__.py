"""moe_tf: the Sparsely-Gated Mixture-of-Experts layer for TensorFlow and Keras 3."""

from moe_tf.expert_sharding import ExpertSharding
from moe_tf.experts import FeedForwardExperts
from moe_tf.gates import (GateOutput, HierarchicalNoisyTopKGate, NoisyTopKGate,
                          StrictlyBalancedGate)
from moe_tf.metrics import ExpertLoadFraction
from moe_tf.sparsely_gated_moe import SparselyGatedMoE

__all__ = [
    "ExpertLoadFraction",
    "ExpertSharding",
    "FeedForwardExperts",
    "GateOutput",
    "HierarchicalNoisyTopKGate",
    "NoisyTopKGate",
    "SparselyGatedMoE",
    "StrictlyBalancedGate",
]
