"""``fm-optuna bench --measure-input``: both input paths measured, on the same batches.

Nothing here is timed: the report's structure, the generated folder's layout and the equality of
the losses of inline decoding and of the pipeline (the measurement would be meaningless if the
two trained on different batches) are what can break.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fm_optuna.cli import main
from fm_optuna.datasets.domainnet import DomainNet
from fm_optuna.experiments import _bench_input
from tests.datasets.test_datasets import write_domainnet


def test_measure_input_reports_both_paths_and_identical_losses(tmp_path: Path) -> None:
    write_domainnet(tmp_path / "domainnet", ("clipart", "sketch"))
    report = _bench_input.measure_input(
        device=torch.device("cpu"),
        data_dir=str(tmp_path / "domainnet"),
        options={"image_size": 32, "domains": "clipart,sketch", "workers": 0},
        batch_size=2,
        steps=2,
        repeats=1,
        processes=False,
    )
    assert report["workers"] == 2  # workers = 0 is the inline side; the pipeline gets workers
    assert report["same_losses"]
    assert report["domains"] == 2 and report["image_size"] == 32
    assert set(report["steps_per_s"]) == {"inline", "pipeline"}
    assert 0 < report["batches_decoded_ahead"] <= 1
    assert "same losses: yes" in _bench_input.input_text(report)


def test_generated_jpeg_folder_has_the_published_layout(tmp_path: Path) -> None:
    root = _bench_input.write_jpeg_folder(
        tmp_path / "jpegs", domains=("real",), train_images=3, test_images=1
    )
    train = DomainNet(root, "real", "train")
    assert len(train) == 3 and len(DomainNet(root, "real", "test")) == 1
    assert train.samples[0][0].suffix == ".jpg" and train.samples[0][0].is_file()
    decoded = _bench_input.decode_files([str(train.samples[0][0])], 32)
    assert decoded.shape == (1, 3, 32, 32) and decoded.dtype.name == "uint8"


def test_cli_checks_the_step_count(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--measure-input", "--input-steps", "0"]) == 2
    assert "Parameter `input_steps` should be a positive integer" in capsys.readouterr().err
