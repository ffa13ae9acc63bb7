"""``fastddim sample`` under torchrun (gloo on the CPU): the same images as one process, and failures end the job.

Which images compare how:

- byte-identical PNGs where the per-process batches hold the same seeds: two ranks with ``--batch-size 3`` draw
  seeds [0, 2, 4] and [1, 3, 5] (strided shares), exactly the batches of one process given ``--seeds 0,2,4,1,3,5``;
- within one 8-bit level where the batches differ (one process, ``--batch-size 4``): the UNet's convolutions round
  differently at another batch size, by a few fp32 ulps, which can move a pixel across a rounding boundary.
"""

import datetime
import os
import socket
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch.multiprocessing

from fastddim import distributed, outputs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli_env() -> dict:
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def sample(*args: str, processes: int = 1) -> subprocess.CompletedProcess:
    if processes == 1:
        launcher = [sys.executable, "-m", "fastddim"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)]
        launcher += ["--master-port", str(free_port()), "-m", "fastddim"]
    return subprocess.run(
        [*launcher, "sample", "--device", "cpu", *args], capture_output=True, text=True, env=cli_env(), timeout=600
    )


def pixels(root, seed: int) -> np.ndarray:
    with PIL.Image.open(root / outputs.image_relpath(seed)) as image:
        return np.asarray(image).astype(np.int16)


def sorted_entries(root) -> list[dict]:
    entries = [entry for path in root.glob("manifest-*.jsonl") for entry in outputs.read_manifest(path)]
    return sorted(entries, key=lambda entry: entry["seed"])


@pytest.mark.slow
@pytest.mark.parametrize("eta", ["0", "1"])
def test_two_ranks_write_the_images_of_one_process(tmp_path, eta):
    common = ["--steps", "5", "--eta", eta]
    two = sample(*common, "--seeds", "0-5", "--batch-size", "3", "--out", str(tmp_path / "two"), processes=2)
    assert two.returncode == 0, two.stderr
    assert "from 2 processes" in two.stdout and two.stdout.count("wrote") == 1  # rank 0 reports
    same_batches = sample(*common, "--seeds", "0,2,4,1,3,5", "--batch-size", "3", "--out", str(tmp_path / "one"))
    other_batches = sample(*common, "--seeds", "0-5", "--batch-size", "4", "--out", str(tmp_path / "four"))
    for result in (same_batches, other_batches):
        assert result.returncode == 0, result.stderr

    assert sorted(path.name for path in (tmp_path / "two").glob("manifest-*")) == [
        "manifest-0.jsonl",
        "manifest-1.jsonl",
    ]
    assert [e["seed"] for e in outputs.read_manifest(tmp_path / "two" / "manifest-1.jsonl")] == [1, 3, 5]
    for seed in range(6):
        relpath = outputs.image_relpath(seed)
        assert (tmp_path / "two" / relpath).read_bytes() == (tmp_path / "one" / relpath).read_bytes()
        difference = np.abs(pixels(tmp_path / "two", seed) - pixels(tmp_path / "four", seed))
        assert difference.max() <= 1
    assert sorted_entries(tmp_path / "two") == sorted_entries(tmp_path / "one")
    four = sorted_entries(tmp_path / "four")
    assert [(e["seed"], e["file"], e["settings_hash"]) for e in four] == [
        (e["seed"], e["file"], e["settings_hash"]) for e in sorted_entries(tmp_path / "two")
    ]
    assert (tmp_path / "two" / "settings.json").read_bytes() == (tmp_path / "one" / "settings.json").read_bytes()


@pytest.mark.slow
def test_a_rank_that_fails_mid_run_stops_the_job(tmp_path):
    out = tmp_path / "samples"
    first = sample("--steps", "2", "--seeds", "0", "--out", str(out))
    assert first.returncode == 0, first.stderr
    # Seed 3 belongs to rank 1 (odd seeds): its image cannot replace a folder, so rank 1 fails writing it.
    (out / outputs.image_relpath(3)).mkdir()
    started = time.monotonic()
    result = sample("--steps", "2", "--seeds", "0-7", "--batch-size", "2", "--resume", "--out", str(out), processes=2)
    assert time.monotonic() - started < 300
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert any("rank 1 of 2 failed" in line and "000003.png: Is a directory" in line for line in errors), errors
    assert any(line.startswith("error: cannot write") for line in errors), errors
    # torchrun's agent prints its own traceback (ChildFailedError); none comes from fastddim's code.
    assert "fastddim/" not in result.stderr


def _exchange_after(rank: int, world_size: int, port: int, behaviour: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ["LOCAL_RANK"] = str(rank)
    team = distributed.join("cpu", timeout_s=30)
    started = time.monotonic()
    try:
        if rank == 1 and behaviour == "dies":
            os._exit(3)
        error = RuntimeError("out of memory") if rank == 1 and behaviour == "raises" else None
        team.settle(error, rank)
        results.put((rank, "ok", ""))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put((rank, type(exc).__name__, f"{exc} after {time.monotonic() - started:.1f} s"))
    finally:
        team.close()


@pytest.mark.slow
@pytest.mark.parametrize("behaviour", ["raises", "dies"])
def test_team_reports_a_failed_rank_on_the_others(behaviour):
    context = torch.multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_exchange_after, args=(rank, 2, port, behaviour, results)) for rank in range(2)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    reports = {}
    while not results.empty():
        rank, kind, text = results.get(timeout=5)
        reports[rank] = (kind, text)
    assert reports[0][0] == "RankFailed", reports
    if behaviour == "raises":
        assert "rank 1 of 2 failed: out of memory" in reports[0][1]
        assert reports[1][0] == "RuntimeError"
    else:
        assert "lost contact" in reports[0][1]
        # Well inside the 30 s timeout: a dead peer's connection closes at once.
        assert float(reports[0][1].rsplit(" after ", 1)[1].split()[0]) < 25


def test_team_of_one_outside_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    team = distributed.join("cpu")
    assert (team.rank, team.world_size, team.distributed) == (0, 1, False)
    assert team.settle(None, 5) == [5]
    with pytest.raises(ValueError, match="x"):
        team.settle(ValueError("x"), 5)
    team.close()


def test_bad_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK=3"):
        distributed.join("cpu", timeout_s=datetime.timedelta(seconds=5).total_seconds())


@pytest.mark.gpu
@pytest.mark.slow
def test_torchrun_on_cuda_matches_one_process(tmp_path):
    """NCCL default group plus the gloo control group, one rank on cuda:0: the images of a plain run."""
    common = ["--steps", "5", "--eta", "1", "--seeds", "0-9", "--device", "cuda"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port"]
    ranked = subprocess.run(
        [*launcher, str(free_port()), "-m", "fastddim", "sample", *common, "--out", str(tmp_path / "ranked")],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=600,
    )
    assert ranked.returncode == 0, ranked.stderr
    plain = subprocess.run(
        [sys.executable, "-m", "fastddim", "sample", *common, "--out", str(tmp_path / "plain")],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=600,
    )
    assert plain.returncode == 0, plain.stderr
    assert sorted_entries(tmp_path / "ranked") == sorted_entries(tmp_path / "plain")
