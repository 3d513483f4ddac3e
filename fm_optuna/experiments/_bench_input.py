"""The input pipeline's measurement: DomainNet's ResNet-18 fed by inline decoding or by workers.

``fm-optuna bench --measure-input`` prints it. On a folder of real JPEGs in DomainNet's
published layout (generated here with PIL in a temporary folder unless ``--data-dir`` names a
copy), it measures

- **decoding alone**: images per second decoded and resized to ``image_size`` by the training
  thread (inline), by a pool of threads and by a pool of processes (the pipeline's choice of
  threads rests on this; a process pool's start, importing torch in every worker, is reported
  apart and left out of its rate);
- **training**: steps per second of a branch training on every domain (one batch per domain per
  step, as ForkMerge's all-tasks branch), with ``workers = 0`` and with the pipeline, the
  losses checked equal (the pipeline must not change a bit), and the share of steps whose
  batches had been decoded ahead.

Measurements alternate between the variants ``repeats`` times and keep each one's fastest, so
a load that comes and goes on a shared machine blurs them less; the load average before and
after is part of the report.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: The generated folder: domains, training and test images per domain, JPEG size (w, h).
DOMAINS = ("clipart", "real", "sketch")
TRAIN_IMAGES, TEST_IMAGES = 96, 8
SOURCE_SIZE = (320, 256)  # DomainNet's images are a few hundred pixels a side
CLASSES = 10


def write_jpeg_folder(
    root: Path,
    *,
    domains: Sequence[str] = DOMAINS,
    train_images: int = TRAIN_IMAGES,
    test_images: int = TEST_IMAGES,
    seed: int = 0,
) -> Path:
    """A DomainNet folder of real JPEGs (smooth colour fields with texture, quality 90)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "image_list").mkdir(parents=True, exist_ok=True)
    width, height = SOURCE_SIZE
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    for domain in domains:
        for split, count in (("train", train_images), ("test", test_images)):
            lines = []
            for i in range(count):
                label = int(rng.integers(CLASSES))
                # Photograph-like content: low-frequency colour plus noise, so JPEG has work
                # to do (a flat image decodes unrealistically fast, pure noise too slowly).
                phase = rng.uniform(0, 2 * np.pi, 3)
                field = [
                    128 + 90 * np.sin(xs / rng.uniform(20, 80) + ys / rng.uniform(20, 80) + p)
                    for p in phase
                ]
                pixels = np.stack(field, axis=-1) + rng.normal(0, 18, (height, width, 3))
                relative = f"{domain}/class_{label}/{domain}_{split}_{i:04d}.jpg"
                (root / relative).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
                    root / relative, quality=90
                )
                lines.append(f"{relative} {label}")
            (root / "image_list" / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def decode_files(paths: Sequence[str], size: int) -> np.ndarray:
    """``uint8 [n, 3, size, size]``: the pipeline's decode (PIL, bilinear), for any worker."""
    from PIL import Image

    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for k, path in enumerate(paths):
        with Image.open(path) as image:
            resized = image.convert("RGB").resize((size, size), Image.BILINEAR)
        out[k] = np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1)
    return out


def _warm(_: int) -> int:
    return os.getpid()


@contextlib.contextmanager
def _folder(data_dir: str | None) -> Iterator[tuple[Path, bool]]:
    if data_dir is not None:
        yield Path(data_dir).expanduser(), False
        return
    with tempfile.TemporaryDirectory(prefix="fm-optuna-jpegs-") as tmp:
        yield write_jpeg_folder(Path(tmp) / "domainnet"), True


def _decode_rates(
    batches: list[list[str]], size: int, workers: int, repeats: int, processes: bool
) -> dict[str, float]:
    """Images per second decoding ``batches`` inline, with threads and with processes."""
    images = sum(len(batch) for batch in batches)
    best = {"inline": 0.0, "threads": 0.0, "processes": math.nan}
    pools: dict[str, Executor] = {"threads": ThreadPoolExecutor(workers)}
    start_seconds = math.nan
    if processes:
        # forkserver: forking a process that runs threads (torch's, the pool's) can deadlock.
        context = multiprocessing.get_context("forkserver")
        tic = time.perf_counter()
        pools["processes"] = ProcessPoolExecutor(workers, mp_context=context)
        list(pools["processes"].map(_warm, range(workers * 4)))
        start_seconds = time.perf_counter() - tic
        best["processes"] = 0.0
    try:
        for _ in range(repeats):
            tic = time.perf_counter()
            for batch in batches:
                decode_files(batch, size)
            best["inline"] = max(best["inline"], images / (time.perf_counter() - tic))
            for name, pool in pools.items():
                tic = time.perf_counter()
                list(pool.map(decode_files, batches, [size] * len(batches)))
                best[name] = max(best[name], images / (time.perf_counter() - tic))
    finally:
        for pool in pools.values():
            pool.shutdown()
    return {**best, "process_pool_start_s": start_seconds}


def _train_seconds(problem: Any, steps: int, seed: int) -> tuple[float, list[float]]:
    """Seconds for ``steps`` optimizer steps on every domain, and the losses of each step."""
    from fm_optuna.config import ForkMergeConfig
    from fm_optuna.core._training import (
        WeightedSum,
        data_generator,
        make_optimization,
        seeded_model,
        train,
    )

    model = seeded_model(problem, seed)
    optimization = make_optimization(model, ForkMergeConfig(seed=seed))
    rule = WeightedSum(dict.fromkeys(problem.task_names, 1.0))
    losses: list[float] = []
    generator = data_generator(problem, seed, 0)
    # One warm-up step (allocators, oneDNN's kernels) outside the clock.
    train(model, optimization, problem, rule, steps=1, generator=generator, log_every=1)
    if problem.device.type == "cuda":
        torch.cuda.synchronize(problem.device)
    tic = time.perf_counter()
    train(
        model,
        optimization,
        problem,
        rule,
        steps=steps,
        generator=generator,
        start_step=1,
        log_every=1,
        on_losses=lambda step, means: losses.append(sum(means.values())),
    )
    if problem.device.type == "cuda":
        torch.cuda.synchronize(problem.device)
    return time.perf_counter() - tic, losses


def measure_input(
    *,
    device: torch.device,
    data_dir: str | None = None,
    options: dict[str, Any] | None = None,
    batch_size: int = 8,
    steps: int = 10,
    repeats: int = 2,
    seed: int = 0,
    processes: bool = True,
) -> dict[str, Any]:
    """Steps per second of DomainNet's ResNet-18, inline decoding against the pipeline.

    ``processes=False`` leaves the process pool out of the decoding comparison (its start,
    which imports torch in every worker, costs seconds).
    """
    from fm_optuna.benchmarks import build_problem
    from fm_optuna.datasets._pipeline import DEFAULT_PREFETCH, DEFAULT_WORKERS

    chosen = {"image_size": 224, "workers": DEFAULT_WORKERS, "prefetch": DEFAULT_PREFETCH}
    chosen.update(options or {})
    if int(chosen["workers"]) == 0:
        chosen["workers"] = DEFAULT_WORKERS  # the pipeline is what is measured against inline
    load_before = os.getloadavg()
    with _folder(data_dir) as (root, generated):
        domains = ",".join(DOMAINS) if generated else chosen.pop("domains", None)
        common = {**chosen, "data_dir": str(root), "batch_size": batch_size, "cache_val": True}
        if domains is not None:
            common["domains"] = domains
        inline = build_problem("domainnet", seed=seed, device=device, **{**common, "workers": 0})
        pipelined = build_problem("domainnet", seed=seed, device=device, **common)
        size = int(common["image_size"])
        task = inline.task_names[0]
        paths = [str(path) for path in inline.image_paths("train", task)]
        batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
        decoding = _decode_rates(batches, size, int(common["workers"]), repeats, processes)
        seconds = {"inline": float("inf"), "pipeline": float("inf")}
        losses: dict[str, list[float]] = {}
        for _ in range(repeats):
            for name, problem in (("inline", inline), ("pipeline", pipelined)):
                spent, losses[name] = _train_seconds(problem, steps, seed)
                seconds[name] = min(seconds[name], spent)
        pipeline = pipelined._pipeline  # type: ignore[attr-defined]
        guessed = pipeline.hits / max(pipeline.hits + pipeline.misses, 1)
        pipeline.close()
        n_domains = len(inline.task_names)
    rates = {name: steps / value for name, value in seconds.items()}
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "folder": "generated JPEGs" if generated else str(root),
        "domains": n_domains,
        "image_size": size,
        "batch_size": batch_size,
        "workers": int(common["workers"]),
        "prefetch": int(common["prefetch"]),
        "steps": steps,
        "repeats": repeats,
        "decode_images_per_s": decoding,
        "steps_per_s": rates,
        "speedup": rates["pipeline"] / rates["inline"],
        "batches_decoded_ahead": guessed,
        "same_losses": losses["inline"] == losses["pipeline"],
        "load_average": {"before": load_before, "after": os.getloadavg()},
    }


def input_text(report: dict[str, Any]) -> str:
    decode = report["decode_images_per_s"]
    rates = report["steps_per_s"]
    load = report["load_average"]
    return "\n".join(
        [
            f"input pipeline: DomainNet ResNet-18 on {report['folder']}, {report['domains']} "
            f"domains × {report['batch_size']} images of {report['image_size']} px per step, "
            f"{report['device']}, {report['threads']} intra-op thread(s)",
            f"  decoding alone (images/s):  inline {decode['inline']:.0f}   "
            f"{report['workers']} threads {decode['threads']:.0f}   "
            f"{report['workers']} processes {decode['processes']:.0f} "
            f"(their start: {decode['process_pool_start_s']:.1f} s, not counted)",
            f"  training (steps/s, {report['steps']} steps, best of {report['repeats']}):  "
            f"inline {rates['inline']:.3f}   pipeline {rates['pipeline']:.3f} "
            f"(workers = {report['workers']}, prefetch = {report['prefetch']})   "
            f"→ {report['speedup']:.2f}×",
            f"  batches decoded ahead: {100 * report['batches_decoded_ahead']:.0f} %   "
            f"same losses: {'yes' if report['same_losses'] else 'NO'}",
            "  load average (1, 5, 15 min): before "
            + ", ".join(f"{x:.2f}" for x in load["before"])
            + "; after "
            + ", ".join(f"{x:.2f}" for x in load["after"]),
        ]
    )
