"""A run folder that cannot lie (issue 24): one writer at a time, checkpoints that prove their
configuration, image folders that say what they saw, and each documented error path, one test
per case of the issue's table."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, TINY, fails
from PIL import Image

import smope
from smope import backbones, checkpoint, cli
from smope.data import load_dataset
from smope.errors import SmopeError
from smope.rundir import RunDir
from smope.runconfig import load_config

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = ("train.epochs=1", "method.align_epochs=1")  # a tiny run in seconds: what is tested is the folder, not the accuracy
CHILD_ENV = {**os.environ, "PYTHONPATH": str(Path(smope.__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}  # this smope


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    """configs/tiny.yaml at one epoch, run to the end; a test that writes into it works on a copy."""
    out = tmp_path_factory.mktemp("quick") / "run"
    cli.main(["run", TINY, f"output_dir={out}", *QUICK])
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def images(folder: Path, count: int, name: str = "img") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (8, 8), (30 * i, 60, 0)).save(folder / f"{name}{i}.png")


def child(code: str, *args: str, **kwargs) -> subprocess.Popen:
    """A second real Python process running ``code`` (with the worktree's smope)."""
    return subprocess.Popen([sys.executable, "-c", code, *args], env=CHILD_ENV, text=True, **kwargs)


# two `smope run` on one output_dir ------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from smope.rundir import RunDir
with RunDir(sys.argv[1]).exclusive():
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_is_refused_at_once_naming_folder_and_holder(quick_run, tmp_path, capsys):
    out = copy_of(quick_run, tmp_path)
    (out / "seed_0" / "task_002.safetensors").unlink()  # a run in progress: its last task not written yet
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    holder = child(HOLD_LOCK, str(out), stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        message = fails(capsys, "run", TINY, f"output_dir={out}", *QUICK)
        assert time.monotonic() - started < 10  # refused at once, not after training
        assert f"output_dir {out} is being written by another smope run (process {holder.pid})" in message
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before  # it wrote nothing
        assert RunDir(out).writer() == str(holder.pid)
        message = fails(capsys, "eval", str(out))  # readers take no lock, but refuse what is not finished
        assert f"{out} is being written by smope run (process {holder.pid}) and its last task is not finished yet" in message
    finally:
        holder.kill()
        holder.wait()
    assert RunDir(out).writer() is None  # the kernel dropped the lock with the process: nothing stale


# config.yaml edited by hand ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dense-prompt", "l2p"])
def test_hand_edited_config_is_refused_without_advising_to_delete(quick_run, tmp_path, capsys, method):
    out = copy_of(quick_run, tmp_path)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    saved["method"]["name"] = method
    (out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    message = fails(capsys, "eval", str(out))
    assert f"{out / 'seed_0' / 'task_000.safetensors'} was trained as run" in message and "method.name" in message
    assert "Restore the config.yaml the checkpoints were trained with, or set output_dir to another folder" in message
    assert "delete" not in message
    # the edited file as a run's config: refused as well (l2p: at load, for the smope keys it does not read)
    assert "delete" not in fails(capsys, "run", str(out / "config.yaml"), f"output_dir={out}")
    assert not (out / "eval.json").exists()
    assert json.loads((out / "metrics.json").read_text()) == json.loads((quick_run / "metrics.json").read_text())


# image folders --------------------------------------------------------------------------------


def test_image_folder_skips_system_folders_and_reads_nested_ones_as_their_class(tmp_path, capsys):
    root = tmp_path / "images"
    for name in ("class0", "class1", "class2"):
        images(root / name, 3)
    images(root / "class0" / "extra", 2)  # nested: part of class0
    images(root / "__MACOSX" / "class0", 3, "._img")  # a macOS zip's resource forks
    images(root / ".hidden", 3)
    (root / "class1" / ".DS_Store").write_bytes(b"\0")
    train, test = (load_dataset("imagefolder", str(root), part) for part in (True, False))
    assert train.classes == ["class0", "class1", "class2"]
    assert sorted(train.targets + test.targets) == [0] * 5 + [1] * 3 + [2] * 3
    cli.main(["run", TINY, "--dry-run", "data.name=imagefolder", f"data.root={root}", "data.num_tasks=1", "data.first_task_classes=null"])
    printed = capsys.readouterr().out
    assert "class0: 5 images (2 in sub-folders)" in printed and "class1: 3 images" in printed and "class2: 3 images" in printed
    assert "__MACOSX" not in printed and ".hidden" not in printed


def test_a_class_message_names_its_folder(tmp_path, capsys):
    root = tmp_path / "images"
    images(root / "bird", 3)
    images(root / "café", 1)
    message = fails(capsys, "run", TINY, f"output_dir={tmp_path / 'run'}", "data.name=imagefolder", f"data.root={root}",
                    "data.num_tasks=1", "data.first_task_classes=null")
    assert f"class folder {root / 'café'} has 1 image(s)" in message


# Fashion-MNIST from the system copy -------------------------------------------------------------


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_provenance_records_the_fallback_copy_and_says_so_once(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    wrong = tmp_path / "nothing_here"
    cli.main(["run", TINY, f"output_dir={out}", *QUICK, "data.name=fashion-mnist", f"data.root={wrong}",
              "data.train_per_class=8", "data.test_per_class=4"])
    notices = [r.getMessage() for r in caplog.records if "Fashion-MNIST" in r.getMessage()]
    assert len(notices) == 1 and str(wrong) in notices[0], notices
    source = json.loads((out / "provenance.json").read_text())["dataset"]
    assert source["root"] == "/usr/share/datasets/fashion-mnist" and source["root_given"] == str(wrong)


# disk full ------------------------------------------------------------------------------------


def test_disk_full_while_writing_a_checkpoint_keeps_finished_tasks(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save = checkpoint.save_file

    def full_at_task_1(tensors, tmp, metadata):
        if '"task": 1' in metadata[checkpoint.META_KEY]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(tensors, tmp, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", full_at_task_1)
    message = fails(capsys, "run", TINY, f"output_dir={out}", *QUICK)
    assert f"free space in {out / 'seed_0'}" in message and "finished tasks are kept" in message
    assert RunDir(out).finished_tasks(0) == [0] and not list((out / "seed_0").glob(".*.tmp"))
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    cli.main(["run", TINY, f"output_dir={out}", *QUICK])  # space freed: the same command resumes
    assert "resum" in capsys.readouterr().out.lower()
    assert RunDir(out).finished_tasks(0) == [0, 1, 2]


# export ---------------------------------------------------------------------------------------


def test_export_refuses_an_existing_adapter_unless_overwrite_and_a_file(quick_run, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    cli.main(["export", str(quick_run), str(adapter)])
    first = (adapter / "adapter_model.safetensors").stat().st_mtime_ns
    message = fails(capsys, "export", str(quick_run), str(adapter))
    assert f"{adapter} already holds an adapter" in message and "--overwrite" in message
    assert (adapter / "adapter_model.safetensors").stat().st_mtime_ns == first
    cli.main(["export", str(quick_run), str(adapter), "--overwrite"])
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert f"{a_file} is a file: give a folder" in fails(capsys, "export", str(quick_run), str(a_file))


def test_exported_adapter_records_its_backbone_and_refuses_another(quick_run, tmp_path):
    adapter = tmp_path / "adapter"
    cli.main(["export", str(quick_run), str(adapter)])
    recorded = json.loads((adapter / "adapter_config.json").read_text())["backbone"]
    model = load_config(TINY).model
    assert recorded["model"] == model.name and recorded["weights"] == "none" and recorded["source"] == "random initialisation"
    assert recorded["img_size"] == 16 and recorded["num_classes"] == 10 and recorded["kwargs"] == model.kwargs
    loaded = smope.SMoPEModel.from_pretrained(backbones.create_backbone(model, 10), adapter)
    assert isinstance(loaded, smope.SMoPEModel)
    model.img_size = 32  # same width and heads, so the prompts' shapes fit: only the record tells them apart
    with pytest.raises(SmopeError, match=r"trained on another backbone \(img_size 16; this one has img_size 32\)"):
        smope.SMoPEModel.from_pretrained(backbones.create_backbone(model, 10), adapter)


# predict and report ---------------------------------------------------------------------------


def test_predict_skips_an_unreadable_file_and_strict_stops(quick_run, tmp_path, capsys):
    folder = tmp_path / "images"
    images(folder, 2)
    broken = folder / "broken.png"
    broken.write_bytes(b"not a png")
    cli.main(["predict", str(quick_run), str(folder), "--json", "--top-k", "2"])
    captured = capsys.readouterr()
    assert [Path(r["image"]).name for r in json.loads(captured.out)] == ["img0.png", "img1.png"]
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"skipped {broken}: ")
    assert "BufferedReader" not in captured.err and captured.err.count(str(broken)) == 1
    message = fails(capsys, "predict", str(quick_run), str(folder), "--strict")
    assert f"cannot read image {broken}" in message and "BufferedReader" not in message


def test_report_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    message = fails(capsys, "report", str(tmp_path))
    assert f"{tmp_path} is not a run directory" in message and "give the output_dir of a run" in message
    assert "smope eval" not in message


# SIGTERM --------------------------------------------------------------------------------------

# `smope run` as `python -m smope run` starts it, with task 2's training held until the signal comes.
RUN_UNTIL_TERMINATED = """
import sys, time
from smope import cli
from smope.learners.smope_learner import SMoPELearner
train = SMoPELearner.train_task
def held(self, ctx):
    if ctx.task == 1:
        print("task 2 started", flush=True)
        time.sleep(120)
    return train(self, ctx)
SMoPELearner.train_task = held
cli.main(sys.argv[1:])
"""


def test_sigterm_is_one_line_exit_143_and_finished_tasks_are_kept(quick_run, tmp_path):
    out = tmp_path / "run"
    run = child(RUN_UNTIL_TERMINATED, "run", TINY, f"output_dir={out}", *QUICK, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while (line := run.stdout.readline()) and line.strip() != "task 2 started":
            pass
        assert line, run.stderr.read()
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 143, err
    assert err.strip() == f"terminated (SIGTERM): finished tasks are saved in {out}; run the same command to resume"
    assert RunDir(out).finished_tasks(0) == [0] and RunDir(out).chain(0).problem is None
    cli.main(["run", TINY, f"output_dir={out}", *QUICK])  # resubmitted: resumes at task 2, ends as an uninterrupted run
    assert json.loads((out / "metrics.json").read_text()) == json.loads((quick_run / "metrics.json").read_text())


# settings -------------------------------------------------------------------------------------


def test_ranpac_with_a_narrow_projection_warns(tmp_path, capsys):
    cli.main(["run", TINY, f"output_dir={tmp_path / 'run'}", "train.epochs=1", "method.name=ranpac", "method.rp_dim=2"])
    printed = capsys.readouterr().out
    assert "warning: method.rp_dim=2 is below the backbone's feature width 64" in printed
    from smope.learners.ridge import narrow_projection

    assert narrow_projection(64, 64) is None and narrow_projection(64, 10000) is None


@pytest.mark.parametrize("override", ["train.lr=.nan", "train.lr=.inf", "method.align_lr=-.inf"])
def test_a_non_finite_setting_is_refused_at_load(tmp_path, capsys, override):
    message = fails(capsys, "run", TINY, f"output_dir={tmp_path / 'run'}", override)
    assert f"config key '{override.split('=')[0]}' must be a finite number" in message
    assert not (tmp_path / "run").exists()


def test_empty_model_kwargs_clears_the_files_kwargs():
    assert load_config(TINY).model.kwargs and load_config(TINY, ["model.kwargs={}"]).model.kwargs == {}
    assert load_config(TINY, ["model.kwargs={depth: 1}"]).model.kwargs["patch_size"] == 4  # a non-empty mapping still merges


def test_dry_run_download_hint_only_when_download_is_off(tmp_path, capsys):
    config = str(ROOT / "configs" / "cifar100_10tasks.yaml")
    hint = "(or set data.download=true)"
    cli.main(["run", config, "--dry-run", f"data.root={tmp_path}"])  # the config sets data.download=true
    printed = capsys.readouterr().out
    assert "data not loaded" in printed and hint not in printed and "data.download=true" in printed
    cli.main(["run", config, "--dry-run", f"data.root={tmp_path}", "data.download=false"])
    assert hint in capsys.readouterr().out


def test_saved_config_holds_only_settings_that_act(quick_run):
    saved = yaml.safe_load((quick_run / "config.yaml").read_text())
    assert saved["method"]["name"] == "smope"
    inactive = [key for key in saved["method"] if key in ("lora_r", "pool_size", "rp_dim") or key.startswith("slca_")]
    assert inactive == []
    assert load_config(quick_run / "config.yaml").method.rp_dim == load_config(None).method.rp_dim  # tiny.yaml's 256 did nothing


def test_every_output_file_has_the_same_mode(quick_run, tmp_path):
    adapter = tmp_path / "adapter"
    cli.main(["export", str(quick_run), str(adapter)])
    files = [p for folder in (quick_run, adapter) for p in folder.rglob("*") if p.is_file()]
    assert {"config.yaml", "metrics.json", "task_000.safetensors", "adapter_model.safetensors"} <= {p.name for p in files}
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {p.relative_to(p.parents[1]): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes  # what open() gives any new file


def test_progress_bars_are_off_without_a_terminal(tmp_path, capsys):
    cli.main(["run", TINY, f"output_dir={tmp_path / 'run'}", *QUICK, "train.progress=null", "data.num_tasks=2"])
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "it/s" not in captured.err and "\r" not in captured.out
    assert load_config(None).train.progress is None  # the default: tqdm's auto (bars only on a terminal)
