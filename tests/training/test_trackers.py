"""train.report_to: the trackers a user names get the run's scalars and validation grids; one that is not
installed, or not logged in, is named with its fix before anything is prepared."""

import json
import re
from pathlib import Path

import pytest

from diffusion.training.loop import train
from diffusion.training.trackers import TRACKERS, TrackerError, chosen_trackers, installed

from conftest import tiny_config


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline W&B run, read from its transaction log (LevelDB-style records of
    W&B's protobuf messages, in 32 KiB blocks after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, partial, rows = run_file.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        partial += payload
        if kind in (1, 4):  # a whole record, or a record's last piece
            record = wandb_internal_pb2.Record()
            record.ParseFromString(partial)
            partial = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


def test_wandb_offline_gets_the_scalars_the_log_shows_and_the_grids(cache_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason='W&B is an optional tracker: pip install -e ".[wandb]"')
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = train(tiny_config(cache_dir, "train.report_to=wandb,tensorboard"), output_dir=str(tmp_path / "run"), progress=False, device="cpu")
    (run_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    history = {int(row["_step"]): row for row in wandb_history(run_file) if "loss" in row}
    logged = re.findall(r"step (\d+) loss (\d\.\d+)", (run / "train.log").read_text())
    assert [int(step) for step, _ in logged] == sorted(history) == [10, 20, 30, 40]
    for step, loss in logged:
        assert f"{history[int(step)]['loss']:.4f}" == loss
        assert {"learning_rate", "images_per_sec", "grounding_loss", "place_loss"} <= set(history[int(step)])
    assert list(run_file.parent.glob("files/media/images/validation_40_*.png"))
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))  # both trackers at once


def test_a_tracker_that_is_not_installed_is_named_with_its_extra():
    missing = [name for name in TRACKERS if not installed(name)]
    if not missing:
        pytest.skip("every tracker is installed here")
    module, extra = TRACKERS[missing[0]]
    with pytest.raises(TrackerError, match=re.escape(f'needs the {module} package, which is not installed: pip install -e ".[{extra}]"')):
        chosen_trackers(missing[0])


def test_bad_report_to_and_a_wandb_without_a_key_stop_before_anything_is_made(cache_dir, tmp_path, monkeypatch):
    with pytest.raises(TrackerError, match="choose tensorboard, wandb"):
        chosen_trackers("tensorbored")
    assert chosen_trackers("none") == [] and chosen_trackers("all")[0] == "tensorboard"
    if not installed("wandb"):
        return
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    with pytest.raises(TrackerError, match="W&B has no API key here. Run `wandb login`"):
        train(tiny_config(cache_dir, "train.report_to=wandb"), output_dir=str(tmp_path / "run"), progress=False, device="cpu")
    assert not (tmp_path / "run").exists()
