"""The ForkMerge core: the fork → train → merge loop, the one training loop, merging,
branch plans, auxiliary rankings, the event stream and checkpoints. It knows nothing of
Optuna's outer study or of MLflow: those observe its events.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fm_optuna._lazy import lazy_face

if TYPE_CHECKING:
    from fm_optuna.core._affinity import task_affinity
    from fm_optuna.core._branches import Branch, default_branch_count, make_plan
    from fm_optuna.core._checkpoints import Checkpointer, load_checkpoint, save_checkpoint
    from fm_optuna.core._events import (
        BranchDiverged,
        BranchesEvaluated,
        Event,
        EventStream,
        MergeCompleted,
        Observer,
        RunFinished,
        RunPruned,
        RunStarted,
        RunSummary,
        TrainingProgress,
        TransferMeasured,
    )
    from fm_optuna.core._loop import ForkMergeResult, check_resumable, run_forkmerge
    from fm_optuna.core._merging import BranchStack, convex_combination, normalise
    from fm_optuna.core._ranking import Ranking, plan_ranking, ranking_agreement
    from fm_optuna.core._training import make_optimizer, seeded_model, target_score, train

_WHERE = {
    "Branch": "_branches",
    "BranchDiverged": "_events",
    "BranchStack": "_merging",
    "BranchesEvaluated": "_events",
    "Checkpointer": "_checkpoints",
    "Event": "_events",
    "EventStream": "_events",
    "ForkMergeResult": "_loop",
    "MergeCompleted": "_events",
    "Observer": "_events",
    "Ranking": "_ranking",
    "RunFinished": "_events",
    "RunPruned": "_events",
    "RunStarted": "_events",
    "RunSummary": "_events",
    "TrainingProgress": "_events",
    "TransferMeasured": "_events",
    "check_resumable": "_loop",
    "convex_combination": "_merging",
    "default_branch_count": "_branches",
    "load_checkpoint": "_checkpoints",
    "make_optimizer": "_training",
    "make_plan": "_branches",
    "normalise": "_merging",
    "plan_ranking": "_ranking",
    "ranking_agreement": "_ranking",
    "run_forkmerge": "_loop",
    "save_checkpoint": "_checkpoints",
    "seeded_model": "_training",
    "target_score": "_training",
    "task_affinity": "_affinity",
    "train": "_training",
}
__all__ = [
    "Branch",
    "BranchDiverged",
    "BranchStack",
    "BranchesEvaluated",
    "Checkpointer",
    "Event",
    "EventStream",
    "ForkMergeResult",
    "MergeCompleted",
    "Observer",
    "Ranking",
    "RunFinished",
    "RunPruned",
    "RunStarted",
    "RunSummary",
    "TrainingProgress",
    "TransferMeasured",
    "check_resumable",
    "convex_combination",
    "default_branch_count",
    "load_checkpoint",
    "make_optimizer",
    "make_plan",
    "normalise",
    "plan_ranking",
    "ranking_agreement",
    "run_forkmerge",
    "save_checkpoint",
    "seeded_model",
    "target_score",
    "task_affinity",
    "train",
]
__getattr__, __dir__ = lazy_face(__name__, _WHERE, __all__)
