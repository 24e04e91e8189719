"""Ablation sweeps: ``python -m qtrain.sweep`` trains a set of configs, runs the
same evaluations on each and writes one results table and plots."""

from qtrain.sweep.evaluations import Evaluation, register_evaluation
from qtrain.sweep.runs import Run, discover, is_finished
