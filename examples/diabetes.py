"""A problem of your own: a shared-trunk MLP on scikit-learn's diabetes data (ships offline).

Target: disease progression after one year. Auxiliaries: body-mass index and serum
triglycerides (both held out of the inputs), and random labels (a harmful auxiliary).
Every task is a regression in standard units, scored by MAE (lower is better).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from sklearn.datasets import load_diabetes
from torch import nn

import fm_optuna

TASKS = ("progression", "bmi", "s5", "noise")
DEFAULT_TARGET = "progression"


class Diabetes(fm_optuna.Problem):
    name = "diabetes"

    def __init__(
        self, *, target: str, seed: int, device: torch.device, hidden: int, batch_size: int
    ) -> None:
        self.tasks = tuple(fm_optuna.Task(t, metric="mae", higher_is_better=False) for t in TASKS)
        self.target, self.device, self.hidden, self.batch_size = target, device, hidden, batch_size
        data = load_diabetes()
        x = torch.tensor(data.data, dtype=torch.float32)
        split = torch.Generator().manual_seed(seed)
        noise = torch.randn(len(x), generator=split)
        y = torch.stack([torch.tensor(data.target).float(), x[:, 2], x[:, 8], noise], dim=1)
        x, y = x[:, [0, 1, 3, 4, 5, 6, 7, 9]], (y - y.mean(0)) / y.std(0)
        x = (x - x.mean(0)) / x.std(0)
        order = torch.randperm(len(x), generator=split)
        parts = {"train": order[:300], "val": order[300:370], "test": order[370:]}
        self.data = {name: (x[i].to(device), y[i].to(device)) for name, i in parts.items()}

    def make_model(self) -> nn.Module:
        trunk = nn.Sequential(
            nn.Linear(8, self.hidden), nn.ReLU(), nn.Linear(self.hidden, self.hidden), nn.ReLU()
        )
        heads = nn.ModuleDict({task: nn.Linear(self.hidden, 1) for task in TASKS})
        return nn.ModuleDict({"trunk": trunk, "heads": heads})  # heads under `heads.`

    def _predict(
        self, model: nn.Module, x: torch.Tensor, tasks: list[str]
    ) -> dict[str, torch.Tensor]:
        features = model["trunk"](x)
        return {task: model["heads"][task](features).squeeze(-1) for task in tasks}

    def task_losses(
        self, model: nn.Module, tasks: Sequence[str], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        x, y = self.data["train"]
        batch = torch.randint(len(x), (self.batch_size,), generator=generator, device=self.device)
        predicted = self._predict(model, x[batch], list(tasks))
        return {
            t: nn.functional.mse_loss(p, y[batch, TASKS.index(t)]) for t, p in predicted.items()
        }

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, split: str, tasks: Sequence[str] | None = None
    ) -> dict[str, dict[str, float]]:
        model.eval()
        x, y = self.data[split]
        predicted = self._predict(model, x, list(tasks or TASKS))
        model.train()
        return {
            t: {"mae": (p - y[:, TASKS.index(t)]).abs().mean().item()} for t, p in predicted.items()
        }


def build(
    *,
    target: str = DEFAULT_TARGET,
    seed: int = 0,
    device: torch.device | None = None,
    hidden: int = 32,
    batch_size: int = 32,
) -> Diabetes:
    """The factory `fm-optuna --benchmark examples.diabetes:build` calls ([problem] keys and
    `--option KEY=VALUE` arrive as keyword options)."""
    device = device or torch.device("cpu")
    return Diabetes(target=target, seed=seed, device=device, hidden=hidden, batch_size=batch_size)


if __name__ == "__main__":  # python -m examples.diabetes
    result = fm_optuna.train_forkmerge(
        build(),
        fm_optuna.ForkMergeConfig(dt=50, total_steps=300, branches=3),
        tracking_uri="sqlite:///tracking/mlflow.db",
    )
    for step, weights in zip(result.steps, result.lambda_history, strict=True):
        print(f"step {step}: Λ = {[round(w, 2) for w in weights]}")
