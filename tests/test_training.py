"""The training loop: learning, checkpoint selection on validation only, resume and retraining."""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import describe_datasets

from tema import config, data
from tema.models import ItemSpace, build
from tema.models.base import next_item_loss
from tema.training import TrainConfig, load_run, train_run

N_A, N_B = 30, 40


def cfg(**over) -> TrainConfig:
    base = dict(seeds=(1,), max_epochs=3, patience=2, batch_size=32, max_len=10, loss="full", n_negatives=16,
                eval_batch_size=64, device="cpu", num_threads=1)
    return TrainConfig(**{**base, **over})


def synthetic(n_users=300, test_target=None) -> data.Dataset:
    """Users walk forward through domain A then jump to the mirrored item of B: a learnable pattern."""
    items = pd.DataFrame({
        "item_id": range(N_A + N_B), "domain": ["A"] * N_A + ["B"] * N_B,
        "local_id": list(range(N_A)) + list(range(N_B)), "source_id": "", "title": "t", "text": "",
    })
    rows = []
    for u in range(n_users):
        start = u % (N_A - 6)
        seq = [start, start + 1, start + 2, N_A + start, start + 3, N_A + start + 1]
        split = "train" if u < n_users - 80 else ("valid" if u < n_users - 40 else "test")
        target = seq[-1] if split != "test" or test_target is None else test_target
        rows.append((f"u{u}", split, seq[:-1], target))
    seqs = pd.DataFrame(rows, columns=["user", "split", "history", "target"])
    seqs["target_domain"] = ["A" if t < N_A else "B" for t in seqs["target"]]
    return data.Dataset("synthetic", {"A": "a", "B": "b"}, items, seqs)


def test_full_loss_is_cross_entropy_over_the_target_domain():
    space = ItemSpace(5, {"A": (0, 2), "B": (2, 5)})
    table = torch.randn(6, 4)
    hidden = torch.randn(1, 2, 4)
    targets = torch.tensor([[1, 4]])  # model indices: item 0 (A), item 3 (B)
    loss = next_item_loss(hidden, targets, table, space, "full", 0)
    expected = (F.cross_entropy(hidden[0, :1] @ table[1:3].T, torch.tensor([0]))
                + F.cross_entropy(hidden[0, 1:] @ table[3:6].T, torch.tensor([1]))) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.isfinite(next_item_loss(hidden, targets, table, space, "sampled", 50))


@pytest.mark.parametrize("model", ["gru4rec", "sasrec", "c2dsr"])
def test_models_learn_a_pattern_popularity_cannot(tmp_path, model):
    ds = synthetic()
    result = train_run(ds, model, {"dim": 32, "dropout": 0.0, "lr": 0.01}, cfg(max_epochs=12, patience=12), 1, tmp_path / model, "d")
    pop = train_run(ds, "popularity", {}, cfg(), 1, tmp_path / "pop", "d")
    assert result["best_valid_score"] > 0.5 > pop["best_valid_score"] + 0.2
    history = pd.read_csv(tmp_path / model / "history.csv")
    assert history["valid_score"].max() == pytest.approx(result["best_valid_score"])


def test_selection_never_reads_test_data(tmp_path):
    ds = synthetic(test_target=10**9)  # a test target no model could score: reading it would fail
    result = train_run(ds, "sasrec", {"dim": 16}, cfg(max_epochs=2), 3, tmp_path, "d")
    assert result["epochs_run"] == 2


def test_finished_runs_are_reused_and_changes_retrain(tmp_path, capsys):
    ds = synthetic()
    first = train_run(ds, "gru4rec", {"dim": 16}, cfg(max_epochs=1), 1, tmp_path, "d")
    again = train_run(ds, "gru4rec", {"dim": 16}, cfg(max_epochs=1), 1, tmp_path, "d")
    assert "already trained" in capsys.readouterr().err and again == first
    changed = train_run(ds, "gru4rec", {"dim": 24}, cfg(max_epochs=1), 1, tmp_path, "d")
    assert changed["fingerprint"] != first["fingerprint"]
    model = load_run(ds, "gru4rec", {"dim": 24}, cfg(), tmp_path)
    assert model.items.embedding_dim == 24


def damage_file(path: Path, how: str) -> None:
    blob = path.read_bytes()
    if how == "truncated":
        path.write_bytes(blob[: len(blob) // 2])
    elif how == "flipped":  # bytes inside the tensor data, past the zip headers: torch.load alone does not notice
        middle = len(blob) // 2
        path.write_bytes(blob[:middle] + bytes(b ^ 0xFF for b in blob[middle : middle + 64]) + blob[middle + 64 :])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(os.urandom(len(blob)))


@pytest.mark.parametrize("how", ["truncated", "flipped", "empty", "random"])
def test_a_damaged_checkpoint_is_refused_and_retrained(tmp_path, capsys, how):
    ds = synthetic()
    first = train_run(ds, "sasrec", {"dim": 16}, cfg(max_epochs=1), 1, tmp_path, "d")
    good = (tmp_path / "model.pt").read_bytes()
    damage_file(tmp_path / "model.pt", how)
    with pytest.raises(data.DataError, match=r"model\.pt: not loaded: model\.pt does not match the SHA-256 in run\.json.*"
                                             r"dvc repro train@"):
        load_run(ds, "sasrec", {"dim": 16}, cfg(), tmp_path)
    capsys.readouterr()
    again = train_run(ds, "sasrec", {"dim": 16}, cfg(max_epochs=1), 1, tmp_path, "d")  # the stage trains it again
    err = capsys.readouterr().err
    assert "already trained" not in err and "not reused: model.pt does not match" in err
    assert (tmp_path / "model.pt").read_bytes() == good and again["fingerprint"] == first["fingerprint"]
    assert load_run(ds, "sasrec", {"dim": 16}, cfg(), tmp_path) is not None


def test_a_checkpoint_with_non_finite_weights_is_refused(tmp_path):
    ds = synthetic()
    train_run(ds, "sasrec", {"dim": 16}, cfg(max_epochs=1), 1, tmp_path, "d")
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key].view(-1)[0] = float("inf")
    torch.save(state, tmp_path / "model.pt")
    marker = json.loads((tmp_path / "run.json").read_text())  # digests that match the bad file: only the check is left
    marker["files"]["model.pt"] = hashlib.sha256((tmp_path / "model.pt").read_bytes()).hexdigest()
    (tmp_path / "run.json").write_text(json.dumps(marker))
    with pytest.raises(data.DataError, match=f"weight '{re.escape(key)}' holds NaN or inf"):
        load_run(ds, "sasrec", {"dim": 16}, cfg(), tmp_path)


def test_a_run_without_digests_is_not_reused(tmp_path, capsys):
    ds = synthetic()
    train_run(ds, "gru4rec", {"dim": 16}, cfg(max_epochs=1), 1, tmp_path, "d")
    marker = json.loads((tmp_path / "run.json").read_text())
    del marker["files"]  # as an older version wrote it
    (tmp_path / "run.json").write_text(json.dumps(marker))
    capsys.readouterr()
    train_run(ds, "gru4rec", {"dim": 16}, cfg(max_epochs=1), 1, tmp_path, "d")
    assert "records no file digests" in capsys.readouterr().err
    assert "files" in json.loads((tmp_path / "run.json").read_text())


def test_a_full_disk_while_saving_leaves_no_finished_run(tmp_path, monkeypatch):
    ds = synthetic()
    real = os.replace

    def full(src, dst, *a, **k):
        if str(dst).endswith("history.csv"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match=r"history\.csv: could not write it \(No space left on device\)"):
        train_run(ds, "gru4rec", {"dim": 16}, cfg(max_epochs=1), 1, tmp_path, "d")
    assert not (tmp_path / "run.json").exists() and not list(tmp_path.glob(".*tmp*"))


def test_interrupted_run_is_not_mistaken_for_finished(tmp_path):
    ds = synthetic()
    train_run(ds, "gru4rec", {"dim": 16}, cfg(max_epochs=1), 1, tmp_path, "d")
    (tmp_path / "run.json").unlink()  # as if killed before the completion marker landed
    with pytest.raises(FileNotFoundError, match="no finished run"):
        load_run(ds, "gru4rec", {"dim": 16}, cfg(), tmp_path)
    result = train_run(ds, "gru4rec", {"dim": 16}, cfg(max_epochs=1), 1, tmp_path, "d")
    marker = json.loads((tmp_path / "run.json").read_text())
    assert set(marker.pop("files")) == {"model.pt", "history.csv"} and marker == result


def test_bad_params_name_the_parameter(root):
    params = config.load_params(root / "profiles" / "default.yaml")
    params["train"]["loss"] = "softmax"
    with pytest.raises(config.ParamsError, match="'train.loss' must be 'full' or 'sampled'"):
        TrainConfig.from_params(params)
    params["train"]["loss"] = "full"
    params["train"]["batch_size"] = "big"
    with pytest.raises(config.ParamsError, match="'train.batch_size' must be int"):
        TrainConfig.from_params(params)
    with pytest.raises(KeyError, match="unknown key"):
        build("sasrec", ItemSpace(70, {"A": (0, 30), "B": (30, 70)}), {"hidden": 3}, 10)
    with pytest.raises(KeyError, match="unknown model 'bert4rec'"):
        build("bert4rec", ItemSpace(70, {"A": (0, 30), "B": (30, 70)}), {}, 10)


@pytest.mark.parametrize("model", ["gru4rec", "sasrec", "c2dsr"])
def test_scores_do_not_depend_on_the_padding_a_batch_needs(model):
    torch.manual_seed(0)
    recommender = build(model, ItemSpace(70, {"A": (0, 30), "B": (30, 70)}), {"dim": 16, "dropout": 0.0}, 10)
    recommender.setup(synthetic().split("train"))
    recommender.eval()
    short, long = [3, 4, 5], [6, 7, 8, 9, 10, 11, 12, 13, 14]
    with torch.no_grad():
        alone = recommender.score([short], "B")
        batched = recommender.score([short, long], "B")[:1]
    assert torch.allclose(alone, batched, atol=1e-5)


def test_the_throughput_benchmark_times_the_study_loop(tmp_path, root):
    """benchmarks/train_throughput.py measures tema.training's loop: its epochs score what train_run's do."""
    spec = importlib.util.spec_from_file_location("train_throughput", root / "benchmarks" / "train_throughput.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    params = config.load_params(root / "profiles" / "default.yaml")
    params["model_params"]["gru4rec"] = {"dim": 16, "lr": 0.01}
    measured = benchmark.measure("gru4rec", synthetic(), params, cfg(patience=1), 2)  # every epoch: no early stop
    assert measured["sequences_per_s"] > 0 and measured["eval_seconds"] > 0
    hyper = benchmark.model_params(params, "gru4rec")
    trained = train_run(synthetic(), "gru4rec", hyper, cfg(max_epochs=2, patience=2), 0, tmp_path, "d")
    assert trained["epochs_run"] == 2
    assert measured["valid_score"] == pd.read_csv(tmp_path / "history.csv")["valid_score"].iloc[-1]


def study_root(tmp_path, monkeypatch, root, **train) -> dict:
    """A minimal repository (dvc.yaml, params.yaml) holding the synthetic dataset as data/prepared/synthetic."""
    params = config.load_params(root / "profiles" / "default.yaml")
    params["train"].update(seeds=[1, 2], max_epochs=2, patience=2, batch_size=32, max_len=10, loss="full",
                           num_threads=1, **train)
    params["model_params"]["gru4rec"] = {"dim": 16, "lr": 0.01}
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("{}\n")
    data.save(synthetic(), tmp_path / "data" / "prepared" / "synthetic")
    describe_datasets(tmp_path)
    monkeypatch.chdir(tmp_path)
    return params


def test_seeds_trained_in_parallel_equal_seeds_trained_one_by_one(tmp_path, monkeypatch, root):
    from tema import train

    params = study_root(tmp_path, monkeypatch, root, workers=1)
    serial = train.run("synthetic", "gru4rec", params)
    runs = tmp_path / "data" / "runs" / "synthetic" / "gru4rec"
    runs.rename(tmp_path / "serial")
    params["train"]["workers"] = 2
    parallel = train.run("synthetic", "gru4rec", params)
    assert list(parallel["seed"]) == [1, 2]
    pd.testing.assert_frame_equal(serial.drop(columns="epochs_run"), parallel.drop(columns="epochs_run"))
    for seed in (1, 2):  # the same weights bit for bit, and the same fingerprint (workers is not part of it)
        a = torch.load(tmp_path / "serial" / f"seed{seed}" / "model.pt", weights_only=True)
        b = torch.load(runs / f"seed{seed}" / "model.pt", weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert (json.loads((runs / f"seed{seed}" / "run.json").read_text())["fingerprint"]
                == json.loads((tmp_path / "serial" / f"seed{seed}" / "run.json").read_text())["fingerprint"])


def test_a_failing_parallel_seed_keeps_the_others(tmp_path, monkeypatch, root):
    from tema import train

    params = study_root(tmp_path, monkeypatch, root, workers=2)
    runs = tmp_path / "data" / "runs" / "synthetic" / "gru4rec"
    runs.mkdir(parents=True)
    (runs / "seed2").write_text("in the way")  # seed 2 cannot make its run folder
    with pytest.raises(RuntimeError, match=r"seed\(s\) 2 failed \(finished seeds are kept\)"):
        train.run("synthetic", "gru4rec", params)
    assert json.loads((runs / "seed1" / "run.json").read_text())["seed"] == 1
    (runs / "seed2").unlink()
    again = train.run("synthetic", "gru4rec", params)  # seed 1 is reused, seed 2 trains
    assert list(again["seed"]) == [1, 2]


def test_workers_must_be_positive(root):
    params = config.load_params(root / "profiles" / "default.yaml")
    params["train"]["workers"] = 0
    with pytest.raises(config.ParamsError, match="'workers' must be >= 1"):
        TrainConfig.from_params(params)


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads process parents from /proc")
def test_killing_the_trainer_ends_its_parallel_seeds(tmp_path, monkeypatch, root):
    params = study_root(tmp_path, monkeypatch, root, workers=2)
    params["train"].update(max_epochs=100_000, patience=100_000)  # seeds that would train for a long time
    (tmp_path / "params.json").write_text(json.dumps(params))
    script = "import json; from tema import train; train.run('synthetic', 'gru4rec', json.load(open('params.json')))"
    trainer = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env={**os.environ, "TEMA_PROGRESS": "0"},
                               stderr=subprocess.DEVNULL)
    runs = tmp_path / "data" / "runs" / "synthetic" / "gru4rec"
    deadline = time.monotonic() + 120
    while not all((runs / f"seed{s}").is_dir() for s in (1, 2)):  # both seeds have started training
        assert trainer.poll() is None and time.monotonic() < deadline, "the seeds never started"
        time.sleep(0.2)
    workers = [pid for pid in children_of(trainer.pid) if alive(pid)]
    assert len(workers) >= 2
    trainer.kill()  # SIGKILL: the trainer cannot clean up, its workers must notice on their own
    trainer.wait()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in workers), "seed workers outlived the killed trainer"
    assert not any((runs / f"seed{s}" / "run.json").exists() for s in (1, 2))  # never mistaken for finished


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads process parents from /proc")
def test_interrupting_the_trainer_stops_its_parallel_seeds_and_returns(tmp_path, monkeypatch, root):
    """A notebook kernel interrupt (SIGINT to the kernel alone): the kernel gets control back promptly and no seed
    goes on training behind it, though the kernel itself lives on."""
    params = study_root(tmp_path, monkeypatch, root, workers=2)
    params["train"].update(max_epochs=100_000, patience=100_000)
    (tmp_path / "params.json").write_text(json.dumps(params))
    script = ("import json, time\nfrom tema import train\ntry:\n"
              "    train.run('synthetic', 'gru4rec', json.load(open('params.json')))\n"
              "except KeyboardInterrupt:\n    print('interrupted', flush=True)\n    time.sleep(120)\n")
    trainer = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env={**os.environ, "TEMA_PROGRESS": "0"},
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        runs = tmp_path / "data" / "runs" / "synthetic" / "gru4rec"
        deadline = time.monotonic() + 120
        while not all((runs / f"seed{s}").is_dir() for s in (1, 2)):
            assert trainer.poll() is None and time.monotonic() < deadline, "the seeds never started"
            time.sleep(0.2)
        workers = [pid for pid in children_of(trainer.pid) if alive(pid) and b"spawn_main" in cmdline(pid)]
        assert len(workers) == 2  # the seed workers, not multiprocessing's resource tracker (which lives with the kernel)
        os.kill(trainer.pid, signal.SIGINT)
        ready, _, _ = select.select([trainer.stdout], [], [], 60)
        assert ready and trainer.stdout.readline().strip() == "interrupted", "the interrupt did not return control"
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in workers), "seed workers kept training after the interrupt"
        assert trainer.poll() is None  # the 'kernel' lives on: the workers did not stop because it died
        assert not any((runs / f"seed{s}" / "run.json").exists() for s in (1, 2))
    finally:
        trainer.kill()
        trainer.wait()
