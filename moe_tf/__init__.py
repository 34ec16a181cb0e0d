"""moe_tf: the Sparsely-Gated Mixture-of-Experts layer for TensorFlow and Keras 3."""

from moe_tf.cpu_allocator import prefer_pooled_cpu_allocator

prefer_pooled_cpu_allocator()  # before any tensor exists: see moe_tf/cpu_allocator.py

from moe_tf.config import MoEConfig
from moe_tf.expert_sharding import ExpertSharding
from moe_tf.experts import FeedForwardExperts
from moe_tf.gates import (GATES, Gate, GateOutput, HierarchicalNoisyTopKGate, NoisyTopKGate,
                          StrictlyBalancedGate, register_gate)
from moe_tf.metrics import ExpertLoadFraction
from moe_tf.philox import PhiloxDropout
from moe_tf.router_gates import ExpertChoiceGate, SoftmaxTopKGate, SwitchGate, TopPGate
from moe_tf.sparsely_gated_moe import SparselyGatedMoE

__all__ = [
    "ExpertChoiceGate",
    "ExpertLoadFraction",
    "ExpertSharding",
    "FeedForwardExperts",
    "GATES",
    "Gate",
    "GateOutput",
    "HierarchicalNoisyTopKGate",
    "MoEConfig",
    "NoisyTopKGate",
    "PhiloxDropout",
    "SoftmaxTopKGate",
    "SparselyGatedMoE",
    "StrictlyBalancedGate",
    "SwitchGate",
    "TopPGate",
    "register_gate",
]
