"""Evaluation: what is measured (metrics.py: top-k accuracy, DINO's k-NN) and the protocols a task
names (protocols.py: the k-NN monitor, top-k accuracy with its best-model rule, none)."""
from .metrics import evaluate, knn_accuracy, knn_evaluate, knn_predict, topk_correct
from .protocols import KNNMonitor, NoEvaluation, Protocol, TopKAccuracy, protocol_for, register_protocol

__all__ = ["KNNMonitor", "NoEvaluation", "Protocol", "TopKAccuracy", "evaluate", "knn_accuracy", "knn_evaluate",
           "knn_predict", "protocol_for", "register_protocol", "topk_correct"]
