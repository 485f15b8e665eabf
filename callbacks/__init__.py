"""Lightning callbacks of lightning_tina (installed as the package `lightning_tina.callbacks`).

rollout.RolloutCallback owns the rollout engine; benchmark.BenchmarkEval evaluates the policy during fit;
adapter_checkpoint.AdapterCheckpoint saves the adapter in PEFT layout; resume.ResumeCheckpoint saves the full
training state atomically (also on SIGTERM/SIGINT) for `fit --ckpt_path last`; cost.CostTracker logs
accelerator-hours and dollars split into training and evaluation; progress.TinaProgressBar shows optimizer steps
and the reward. No callback calls another: the module's `sampler()` and logged values are their only meeting points.
"""

from lightning_tina.callbacks.adapter_checkpoint import AdapterCheckpoint
from lightning_tina.callbacks.benchmark import BenchmarkEval
from lightning_tina.callbacks.cost import CostTracker
from lightning_tina.callbacks.progress import TinaProgressBar
from lightning_tina.callbacks.resume import ResumeCheckpoint
from lightning_tina.callbacks.rollout import RolloutCallback

__all__ = [
    "AdapterCheckpoint",
    "BenchmarkEval",
    "CostTracker",
    "ResumeCheckpoint",
    "RolloutCallback",
    "TinaProgressBar",
]
