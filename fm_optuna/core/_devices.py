"""One device per branch: where a run's branches live, and the device lists a door accepts.

With ``parallel_branches`` and ``device = "cuda:0,cuda:1"`` the problem is built once per
device by the same factory. The first copy is the run's own: the ranking's scores, the merge
search, θ*, the final evaluation and the checkpoint are on the first device. The others are
*replicas*, where branches train: branch i lives on device i mod n for the whole run (its
model, optimizer state, data generator and random state), so nothing of a branch moves between
rounds. At each merge every branch's state is copied to the first device; at each fork θ* is
copied into every branch's model on its own device.

**The same run as on one device.** Branch i's data generator and random state are seeded as in
a one-device run, on its own device, and a CUDA generator of a given seed draws the same numbers
on every device of one model; the branches of a device train in one thread, one after another,
so each device's generator serves one branch at a time. On identical GPUs the Λ trajectory and
θ* are therefore those of the sequential run on the first device, except where

- CUDA kernels are not deterministic anyway (atomics in scatter/index_add, some cuDNN
  algorithms): they differ between two runs on one device too;
- the GPUs differ in model: kernels, and how a generator's draws are laid out, may change;
- a model on CUDA draws *CPU* random numbers in its forward: the device threads share the
  process's CPU generator (a branch's CUDA draws are its own).

**Resume.** Everything a checkpoint keeps of a branch is device-free (tensors are loaded on the
CPU, a CUDA generator's state is a seed and an offset), so a checkpoint resumes on any list of
CUDA devices, longer, shorter or reordered: branch i goes to device i mod n of the new list.
It does not resume across kinds: a CPU generator (Mersenne Twister) and a CUDA one (Philox)
cannot continue each other's data stream, so that is refused (see :func:`check_device_kind`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from fm_optuna.config import RuntimeOptions, option_of
from fm_optuna.errors import invalid

if TYPE_CHECKING:
    from fm_optuna.problem._tasks import Problem

#: What the device option may be, in the words of an error message (the schema's).
DEVICE_ALLOWED = option_of(RuntimeOptions, "device").allowed()


def resolve_devices(name: str | None, *, parallel: bool) -> tuple[torch.device, ...]:
    """The devices the option ``name`` names (``None`` or empty: CUDA when there is one, else
    the CPU); the one check every door (flag, study file, API) applies.

    Raises:
        ConfigError: An entry is not a torch device, names CUDA where there is none or an index
            this machine lacks; or several are given without ``parallel``, or are not distinct
            CUDA devices.

    Example:
        >>> resolve_devices("cpu", parallel=False)
        (device(type='cpu'),)
    """
    entries = [entry.strip() for entry in name.split(",")] if name else []
    if len(entries) < 2:
        return (_one_device(name, entries[0] if entries else None),)
    if not parallel:
        raise invalid(
            "device", name, "one device unless parallel_branches = true (then one per branch)"
        )
    devices = [_parsed(name, entry) for entry in entries]
    if any(device.type != "cuda" for device in devices):
        raise invalid(
            "device",
            name,
            "CUDA devices when it lists several (on the CPU parallel_branches trains one "
            "process per branch: device = cpu)",
        )
    devices = [_existing_cuda(name, device, several=True) for device in devices]
    if len(set(devices)) != len(devices):
        raise invalid("device", name, "distinct CUDA devices (each one serves its branches)")
    return tuple(devices)


def _one_device(name: str | None, entry: str | None) -> torch.device:
    if not entry:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = _parsed(name, entry)
    return _existing_cuda(name, device, several=False) if device.type == "cuda" else device


def _parsed(name: str | None, entry: str) -> torch.device:
    try:
        return torch.device(entry)
    except RuntimeError:
        raise invalid("device", name, DEVICE_ALLOWED) from None


def _existing_cuda(name: str | None, device: torch.device, *, several: bool) -> torch.device:
    """``device`` with its index, when this machine has it."""
    if not torch.cuda.is_available():
        raise invalid("device", name, "cpu (no CUDA device is available)")
    count = torch.cuda.device_count()
    device = normalised(device)
    if device.index is not None and device.index >= count:
        here = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        allowed = f"CUDA devices among {here}" if several else f"cpu or {here}"
        raise invalid("device", name, f"{allowed} (this machine has {count})")
    return device


def normalised(device: torch.device | str) -> torch.device:
    """``device`` as torch names it uniquely: a CUDA device with its index (``cuda`` is the
    current one), so that two names of one device compare equal."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class BranchDevices:
    """Where a run's branches live: ``problem`` (the run's own, on the first device) and the
    same problem built on each further device; branch i trains on ``problems[i % n]``.

    With no replicas every branch is on the problem's device, as it always was.
    """

    def __init__(self, problem: Problem, replicas: Sequence[Problem] = ()) -> None:
        for replica in replicas:
            _check_replica(problem, replica)
        self.problems: tuple[Problem, ...] = (problem, *replicas)

    @property
    def first(self) -> Problem:
        return self.problems[0]

    @property
    def devices(self) -> tuple[torch.device, ...]:
        return tuple(torch.device(problem.device) for problem in self.problems)

    @property
    def replicas(self) -> tuple[Problem, ...]:
        return self.problems[1:]

    def problem_of(self, index: int) -> Problem:
        """The problem (and so the device) branch ``index`` trains on, the same every round."""
        return self.problems[index % len(self.problems)]

    def on_first(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` on the first device (the tensors themselves when they are there already)."""
        first = self.first.device
        return {key: value.to(first) for key, value in state.items()}


def _check_replica(problem: Problem, replica: Problem) -> None:
    """A replica is the same problem: same name, tasks and target, a device of its own."""
    same = (
        replica.name == problem.name
        and replica.task_names == problem.task_names
        and replica.target == problem.target
        and isinstance(getattr(replica, "device", None), torch.device)
    )
    if not same:
        raise invalid(
            "replicas",
            f"{replica.name} ({', '.join(replica.task_names)}; target {replica.target})",
            f"the problem {problem.name} built again on another device (tasks "
            f"{', '.join(problem.task_names)}; target {problem.target})",
        )


def device_kind(checkpoint: Mapping[str, Any]) -> str | None:
    """The kind of device (``cpu``, ``cuda``) a checkpoint's branches were trained on; ``None``
    for a checkpoint from before it was recorded."""
    devices = checkpoint.get("devices")
    return torch.device(devices[0]).type if devices else None


def check_device_kind(checkpoint: Mapping[str, Any], devices: Sequence[torch.device]) -> None:
    """Raise a one-line ConfigError unless the checkpoint's branches continue on ``devices``:
    any list of the kind it was written on (see the module docstring)."""
    saved = device_kind(checkpoint)
    here = torch.device(devices[0]).type
    if saved is None or saved == here:
        return
    raise invalid(
        "device",
        ",".join(str(device) for device in devices),
        f"{saved} devices to resume this checkpoint (written on "
        f"{','.join(checkpoint['devices'])}: a data stream continues only on the kind of "
        "device that drew it)",
    )
