"""Reliability: models that move between machines, runs that never share a folder, outputs that are
complete or absent, and clear errors before long work.

Several checks need fresh processes (a device count is fixed when JAX starts; a lock or a kill
concerns a whole process): this file is also their worker, `python tests/pipeline/test_reliability.py
<mode> ...` (see `_worker` at the end).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SIZE = 32
TIMEOUT = 300


def _env(devices: int | None = None, **extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", **extra)
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_NUM_CPU_DEVICES", None)
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _worker_run(*args: str, devices: int | None = None, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, __file__, *args], cwd=ROOT, env=_env(devices), capture_output=True,
                          text=True, timeout=TIMEOUT, **kw)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


# --------------------------------------------------------------------------- checkpoints move between machines


@pytest.fixture
def two_device_run(tiny_run, tmp_path):
    """A copy of the suite's tiny run folder: train.py trained it data-parallel on 2 CPU devices
    (conftest `env`: JAX_NUM_CPU_DEVICES=2)."""
    from conftest import copy_results
    return copy_results(tiny_run, tmp_path / "results")[1]


def test_checkpoint_from_2_devices_loads_and_projects_on_1_and_on_4(two_device_run, tmp_path):
    """A model that train.py trained with its state replicated over 2 devices restores in a plain
    process (1 CPU device, no `use_cpu_cores`: the test's own) and in one with 4 devices, and gives
    the same maps.

    Before, orbax restored each array onto the topology it was saved from: `load_params` failed with
    "Topology mismatch detected" on any other device count.
    """
    outs = {}
    for devices in (1, 4):
        out = tmp_path / f"d{devices}.npz"
        if devices == 1:  # this process: one CPU device (conftest), no use_cpu_cores
            _project_worker(str(two_device_run), str(out))
        else:
            _worker_run("project", str(two_device_run), str(out), devices=devices)
        with np.load(out) as z:
            outs[devices] = {k: z[k] for k in z.files}
    one, four = outs[1], outs[4]
    assert int(one["device_count"]) == 1 and int(four["device_count"]) == 4
    # restoring copies the stored bytes: the parameters are bit-identical whatever the device count
    assert one["params"].size > 1000 and np.array_equal(one["params"], four["params"])
    # the same program on the same inputs (project_fn on one device) gives the same maps
    np.testing.assert_array_equal(one["maps"], four["maps_single"])
    # split over 4 devices the program differs (XLA partitions the batch), so the maps may differ by
    # float32 rounding: the bound of tests/runtime/test_sharding.py for the same projection (<= 1e-5), on maps
    # of size ~1e-2 here
    assert np.abs(one["maps"]).max() > 5e-3
    assert np.abs(one["maps"] - four["maps_sharded"]).max() <= 1e-5
    # the 4-device process resumed the 2-device training for one more step on its own mesh
    assert int(four["resumed_step"]) == int(four["trained_steps"]) + 1
    # where the run was trained is recorded (informational only)
    trained = json.loads(str(one["trained_on"]))
    assert trained["devices"] == 2 and trained["backend"] == "cpu" and trained["jax"]


def _project_worker(run: str, out: str) -> None:
    import dataclasses

    import jax

    from iepjax import ProjectionConfig, checkpointing, project_fn, sharding, training
    params, tcfg = training.load_params(run)  # no use_cpu_cores: a plain process
    # plain gradient steps without the prior: every pixel moves, maps of ~1e-2 after 2 steps
    cfg = ProjectionConfig(model=tcfg.model, steps=2, alpha=0.05, lam=0.0, weighting=False, smoothing_sigma=1.0)
    x = np.random.default_rng(1).random((4, SIZE, SIZE, 1)).astype(np.float32)
    res = {"device_count": jax.device_count(), "maps": np.asarray(project_fn(params, x, cfg).maps),
           "params": np.concatenate([np.asarray(a).ravel() for a in jax.tree.leaves(params)]),
           "trained_on": json.dumps(checkpointing.trained_on(Path(run) / "checkpoints"))}
    if jax.device_count() > 1:
        mesh = sharding.make_mesh()
        res["maps_single"] = res["maps"]
        res["maps_sharded"] = sharding.project_sharded(params, x, cfg, mesh).maps
        images = np.random.default_rng(0).integers(0, 256, (6, SIZE, SIZE, 1), dtype=np.uint8)
        summary = training.train(dataclasses.replace(tcfg, steps=tcfg.steps + 1, batch_size=4), images, run,
                                 progress=False, mesh=mesh)
        res["trained_steps"], res["resumed_step"] = tcfg.steps, int(summary.state.step)
    np.savez(out, **res)


# --------------------------------------------------------------------------- concurrent claims


def _start_claimers(mode: str, cat: Path, n_procs: int, per_proc: int, gate: Path) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, __file__, mode, str(cat), str(per_proc), str(gate)], cwd=ROOT,
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(n_procs)]


def _wait_for(procs, gate: Path, suffix: str, n: int) -> None:
    """Wait until `n` files gate<suffix> exist (one per process), failing if a process ended first."""
    deadline = time.monotonic() + TIMEOUT
    while len(list(gate.parent.glob(gate.name + suffix))) < n:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [p.communicate()[1][-2000:] for p in procs if p.poll() is not None]
        time.sleep(0.05)


def _wait_ready(procs, gate: Path, n: int) -> None:
    """Open the gate once every process has started (each touches gate.<pid>.ready)."""
    _wait_for(procs, gate, ".*.ready", n)
    gate.touch()


def test_concurrent_new_runs_get_distinct_folders(tmp_path):
    """Processes and threads claiming run folders at the same instant all get distinct v<N>.

    Before, two processes both listed the folder, both chose the same v<N>, and the second mkdir
    failed (or, through `latest`, both trained into one folder).
    """
    import threading

    from iepjax import runs

    cat = tmp_path / "vae" / "textures" / "brick"
    gate = tmp_path / "gate"
    n_procs, per_proc, n_threads = 6, 4, 4
    procs = _start_claimers("claim", cat, n_procs, per_proc, gate)
    _wait_ready(procs, gate, n_procs)
    got: list[str] = []
    errors: list[BaseException] = []

    def claim():
        try:
            for _ in range(per_proc):
                got.append(str(runs.new_run(cat)))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=claim) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        out, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, err[-3000:]
        got += out.split()
    assert not errors, errors
    total = (n_procs + n_threads) * per_proc
    assert len(got) == total and len(set(got)) == total, sorted(got)
    assert sorted(runs.versions(cat)) == list(range(total))
    assert runs.latest_run(cat) is not None and runs.latest_run(cat).name in {Path(g).name for g in got}


def test_runs_started_together_never_share_a_folder(tmp_path):
    """What train.py does to choose its folder (resume the latest run, else a new one), by several
    processes at once: each ends up alone in its folder while it trains; a run no process holds is
    resumed."""
    from iepjax import runs

    cat = tmp_path / "vae" / "textures" / "brick"
    first = runs.new_run(cat)
    runs.release(first)  # as if the training that made it had ended
    gate = tmp_path / "gate"
    procs = _start_claimers("resume", cat, 5, 1, gate)
    _wait_ready(procs, gate, 5)
    # every process keeps its run held until all have chosen (as trainings would), however slowly
    # the machine schedules them: each touches gate.<pid>.chosen, then waits for gate.release
    _wait_for(procs, gate, ".*.chosen", 5)
    (gate.parent / (gate.name + ".release")).touch()
    got = []
    for p in procs:
        out, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, err[-3000:]
        got += out.split()
    assert len(set(got)) == 5, got
    assert str(first) in got  # the free run was resumed by one of them, the others got new folders


def test_taking_a_run_removes_the_unfinished_checkpoints_of_a_killed_owner(tmp_path, capsys):
    """orbax leaves `<step>.orbax-checkpoint-tmp-*` folders when a save is killed; the next process to
    take the run removes them (the owner lock says nobody writes them), a finished step is kept."""
    from iepjax import runs

    cat = tmp_path / "vae" / "textures" / "brick"
    run = runs.new_run(cat)
    runs.release(run)  # its training was killed
    stray = run / "checkpoints" / "200.orbax-checkpoint-tmp-1730000000"
    (stray / "state").mkdir(parents=True)
    (run / "checkpoints" / "100").mkdir()
    assert runs.resume_or_new(cat, run) == run
    assert not stray.exists() and (run / "checkpoints" / "100").is_dir()
    assert "had not finished writing" in capsys.readouterr().err


def _claim_worker(mode: str, cat: str, per_proc: str, gate: str) -> None:
    from iepjax import runs
    cat_dir, gate_path = Path(cat), Path(gate)
    Path(f"{gate}.{os.getpid()}.ready").touch()
    while not gate_path.exists():
        time.sleep(0.001)
    claimed = []
    for _ in range(int(per_proc)):
        if mode == "claim":
            claimed.append(runs.new_run(cat_dir))
        else:
            claimed.append(runs.resume_or_new(cat_dir, runs.latest_run(cat_dir)))
    print("\n".join(str(c) for c in claimed), flush=True)
    if mode == "resume":  # keep the runs held until every process has chosen (as a training would)
        Path(f"{gate}.{os.getpid()}.chosen").touch()
        deadline = time.monotonic() + TIMEOUT
        while not Path(f"{gate}.release").exists() and time.monotonic() < deadline:
            time.sleep(0.01)


# --------------------------------------------------------------------------- killed writers


N_FILES = 12


def _expected(i: int) -> bytes:
    return bytes([i % 251]) * (20_000 + 997 * i)


def _complete(folder: Path) -> bool:
    files = {p.name for p in folder.iterdir()}
    want = {f"part{i:02d}.bin" for i in range(N_FILES)} | {"metrics.json"}
    if files != want:
        return False
    if any((folder / f"part{i:02d}.bin").read_bytes() != _expected(i) for i in range(N_FILES)):
        return False
    return json.loads((folder / "metrics.json").read_text()) == {"files": N_FILES, "auroc": None}


def _check_invariant(parent: Path) -> None:
    """Every v<N> under parent is complete; `latest`, if any, points at one of them."""
    from iepjax import runs
    for n in runs.versions(parent):
        assert _complete(parent / f"v{n}"), sorted(p.name for p in (parent / f"v{n}").iterdir())
    link = parent / "latest"
    if link.is_symlink():
        target = link.resolve()
        assert target.is_dir() and target.parent == parent.resolve() and _complete(target), os.readlink(link)


def test_a_killed_writer_leaves_a_complete_folder_or_none(tmp_path):
    """A writer of numbered output folders (`runs.new_output`, as project.py writes projections/v<N>)
    killed with SIGKILL at random points: every v<N> is complete, `latest` never points at an
    incomplete folder, and the next writer removes the leftover and completes its own folder.

    Before, project.py created projections/v<N>, pointed `latest` at it and then wrote the files
    one by one: a kill left a folder of 0-byte or missing files that looked finished.
    """
    parent = tmp_path / "projections"
    rng = random.Random(7)
    points = sorted(rng.sample(range(N_FILES + 2), 6))  # after the k-th progress line (0: folder begun)
    for k in points:
        p = subprocess.Popen([sys.executable, __file__, "write", str(parent)], cwd=ROOT, env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(k + 1):
            line = p.stdout.readline()
            assert line, p.communicate()[1][-3000:]
        time.sleep(rng.uniform(0.0, 0.02))  # land anywhere in the next step, the rename included
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=TIMEOUT)
        _check_invariant(parent)
    leftovers = [q for q in parent.iterdir() if q.name.startswith(".v")]
    done = _worker_run("write", str(parent))
    _check_invariant(parent)
    final = Path(done.stdout.split()[-1])
    assert final.parent == parent and _complete(final) and (parent / "latest").resolve() == final.resolve()
    assert not [q for q in parent.iterdir() if q.name.startswith(".v")], "leftovers were not removed"
    assert not leftovers or "incomplete output of an interrupted run" in done.stderr


def test_an_exception_while_writing_leaves_nothing(tmp_path):
    from iepjax import runs

    parent = tmp_path / "projections"
    with pytest.raises(RuntimeError, match="boom"):
        with runs.new_output(parent) as out:
            (out.path / "metrics.json").write_text("{}")
            raise RuntimeError("boom")
    assert [p.name for p in parent.iterdir() if not p.name.startswith(".claim")] == []
    with runs.new_output(parent) as out:
        (out.path / "a.txt").write_text("a")
    assert out.final == parent / "v0" and (parent / "v0" / "a.txt").read_text() == "a"
    assert os.readlink(parent / "latest") == "v0"


def _write_worker(parent: str) -> None:
    from iepjax import atomic, runs
    with runs.new_output(Path(parent)) as out:
        print("begun", flush=True)
        for i in range(N_FILES):
            with open(out.path / f"part{i:02d}.bin", "wb") as f:  # plain writes: the folder is what is atomic
                f.write(_expected(i)[: len(_expected(i)) // 2])
                f.flush()
                time.sleep(0.005)
                f.write(_expected(i)[len(_expected(i)) // 2:])
            print(f"file {i}", flush=True)
        atomic.write_json(out.path / "metrics.json", {"files": N_FILES, "auroc": float("nan")})
    print("done", out.final, flush=True)


# --------------------------------------------------------------------------- strict JSON, atomic files


def test_strict_json_writes_null_for_nan():
    from iepjax import atomic
    text = atomic.dumps_json({"a": float("nan"), "b": [np.float32(np.inf), 1.5, np.float64(2.0)], "c": np.int64(3)})
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [None, 1.5, 2.0], "c": 3}


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    from iepjax import atomic
    path = tmp_path / "sub" / "x.json"
    atomic.write_json(path, {"v": 1})
    atomic.write_text(path, "second")
    assert path.read_text() == "second" and sorted(p.name for p in path.parent.iterdir()) == ["x.json"]
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_output_folder_with_a_fixed_name(tmp_path):
    from iepjax import atomic
    final = tmp_path / "out"
    with atomic.output_folder(final) as out:
        (out.path / "scores.csv").write_text("file\n")
        assert not final.exists()
    assert (final / "scores.csv").exists() and not (final / atomic.LOCK_NAME).exists()
    assert (final.stat().st_mode & 0o777) == 0o777 & ~_umask()  # as mkdir would make it, not mkdtemp's 0700
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        with atomic.output_folder(final):
            pass
    with atomic.output_folder(final, replace=True) as out:
        (out.path / "new.txt").write_text("n")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]


# --------------------------------------------------------------------------- clear errors before long work


def _fake_run(results: Path, category: str = "brick", *, checkpoint: bool = True, holdout: int = 1) -> Path:
    """A run folder as train.py leaves it (config.json, holdout.json with `holdout` ids, checkpoints/),
    with the tiny model's initial parameters as its checkpoint instead of trained ones (no training
    needed)."""
    import jax

    from iepjax import ModelConfig, TrainConfig, checkpointing, runs, training
    from iepjax.config import to_dict
    cfg = TrainConfig(model=ModelConfig(size=SIZE, channels=1, latent=4), steps=1, batch_size=2)
    run = runs.new_run(runs.category_dir(results, "vae", "textures", category))
    runs.release(run)
    (run / "config.json").write_text(json.dumps(to_dict(cfg)))
    (run / "holdout.json").write_text(json.dumps({"dataset": "textures", "category": category,
                                                  "ids": [f"train/{i}" for i in range(holdout)]}))
    mngr = checkpointing.manager(run / "checkpoints")  # creates checkpoints/, as training does at its start
    if checkpoint:
        checkpointing.save(mngr, 1, training.init_state(cfg, key=jax.random.key(0)), to_dict(cfg))
    checkpointing.close(mngr)
    return run


def _project_main(argv: list[str], capsys) -> tuple[int, str]:
    import importlib.util
    spec = importlib.util.spec_from_file_location("_project_script", ROOT / "project.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        code = module.main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_a_run_without_a_checkpoint_yet_gives_one_message(tmp_path, capsys):
    from iepjax import runs
    results = tmp_path / "results"
    run = _fake_run(results, checkpoint=False)  # killed (or still training) before its first checkpoint
    with pytest.raises(FileNotFoundError, match="has no checkpoint yet"):
        runs.find_run(results, "vae", "textures", "brick")
    code, err = _project_main(["--category", "brick", "--results", str(results), "--tfds-dir",
                               str(tmp_path / "tfds"), "--no-progress"], capsys)
    assert code == 2 and "has no checkpoint yet" in err and "train.py" in err and "Traceback" not in err, err
    assert str(run) in err and not (tmp_path / "tfds").exists()  # before any data was prepared


def test_a_run_of_another_category_is_refused_before_restoring(tmp_path, capsys):
    from iepjax import runs
    results = tmp_path / "results"
    brick = _fake_run(results, "brick")
    with pytest.raises(ValueError, match="trained on textures/brick, not textures/grass"):
        runs.find_run(results, "vae", "textures", "grass", str(brick))
    assert runs.find_run(results, "vae", "textures", "brick", str(brick)) == brick.resolve()
    code, err = _project_main(["--category", "grass", "--run", str(brick), "--results", str(results),
                               "--tfds-dir", str(tmp_path / "tfds"), "--no-progress"], capsys)
    assert code == 2 and "does not fit" in err and "--category brick" in err and "Traceback" not in err, err
    assert not (tmp_path / "tfds").exists()
    with pytest.raises(ValueError, match="channels 1 \\(wanted 3\\)"):
        runs.check_run_fits(brick, "textures", "brick", {"channels": 3})


@pytest.fixture
def read_only():
    """`read_only(folder)` makes folder and everything under it read-only until the test ends."""
    made: list[Path] = []

    def make(folder: Path) -> None:
        for p in [folder, *folder.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o555)
                made.append(p)
    yield make
    for p in made:
        p.chmod(0o755)


# Root ignores permission bits (capability CAP_DAC_OVERRIDE). As root, the command runs behind a
# one-line wrapper that drops that capability from its bounding set (prctl PR_CAPBSET_DROP) and then
# execs it: the command's root then obeys permission bits as any other user does (capabilities(7)).
# prctl option 24 is PR_CAPBSET_DROP, capability 1 is CAP_DAC_OVERRIDE (linux/prctl.h, linux/capability.h).
_DROP_DAC_OVERRIDE = ("import ctypes, os, sys\n"
                      "if ctypes.CDLL(None, use_errno=True).prctl(24, 1, 0, 0, 0):\n"
                      "    sys.exit(97)\n"
                      "os.execv(sys.argv[1], sys.argv[1:])")


def _without_override(cmd: list[str]) -> list[str]:
    """`cmd` made to respect permission bits even when this test runs as root."""
    if os.geteuid() != 0:
        return cmd
    probe = subprocess.run([sys.executable, "-c", _DROP_DAC_OVERRIDE, "/bin/true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("running as root without the right to drop CAP_DAC_OVERRIDE: cannot make a folder read-only")
    return [sys.executable, "-c", _DROP_DAC_OVERRIDE, sys.executable, *cmd[1:]] if cmd[0] == sys.executable else \
        [sys.executable, "-c", _DROP_DAC_OVERRIDE, *cmd]


def test_a_read_only_output_folder_is_reported_before_any_work(tmp_path, read_only):
    """project.py on a run folder it may not write: one message, exit 2, before data or model are
    touched. (Before: two PermissionError tracebacks, one after the whole projection had run.)"""
    results = tmp_path / "results"
    run = _fake_run(results)
    read_only(results)
    proc = subprocess.run(_without_override([sys.executable, str(ROOT / "project.py"), "--category", "brick",
                                             "--results", str(results), "--tfds-dir", str(tmp_path / "tfds"),
                                             "--no-progress"]), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "cannot write the run folder" in proc.stderr and str(run) in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "tfds").exists()


def test_check_writable(tmp_path, read_only):
    from iepjax import atomic
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only(ro)
    code = ("import sys; from iepjax import atomic\n"
            "try:\n    atomic.check_writable(sys.argv[1])\nexcept PermissionError as e:\n    print(e); sys.exit(3)")
    proc = subprocess.run(_without_override([sys.executable, "-c", code, str(ro / "not" / "yet")]), cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 3 and f"{ro} does not accept new files" in proc.stdout, proc.stdout + proc.stderr
    assert atomic.check_writable(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checked, not created
    (tmp_path / "file").write_text("x")
    with pytest.raises(atomic.NotWritableError, match="is a file, not a folder"):
        atomic.check_writable(tmp_path / "file" / "sub")


# --------------------------------------------------------------------------- images outside [0, 1]


def test_project_fn_rejects_images_outside_0_1(params, model_cfg):
    import jax
    import jax.numpy as jnp

    from iepjax import ProjectionConfig, project_fn
    from iepjax.projection import check_images
    cfg = ProjectionConfig(model=model_cfg, steps=1)
    x = np.random.default_rng(0).random((2, SIZE, SIZE, 1)).astype(np.float32)
    with pytest.raises(ValueError, match=r"values in \[[\d.e-]+, 25\d.*outside \[0, 1\].*divide by 255"):
        project_fn(params, x * 255, cfg)
    with pytest.raises(ValueError, match=r"outside \[0, 1\].*divide by 255"):
        project_fn(params, jnp.asarray(x * 255), cfg)  # a committed jax array is checked too
    with pytest.raises(ValueError, match=r"values in \[-0\.4\d+, 0\.4\d+\].*clip them to \[0, 1\]"):
        project_fn(params, x - 0.5, cfg)
    # NaN and inf pass (their own maps are non-finite), so do in-range values and traced arrays
    y = x.copy()
    y[0, 0, 0, 0], y[1, 0, 0, 0] = np.nan, np.inf
    check_images(y, cfg)
    check_images(np.clip(x + 5e-4, 0, 1 + 5e-4), cfg)  # round-off of a resize
    jax.jit(lambda a: check_images(a * 255, cfg))(x)
    jax.vmap(lambda a: check_images(a[None] * 255, cfg))(x)


# --------------------------------------------------------------------------- thresholds that refuse nonsense


def test_threshold_fits_need_enough_normal_images_and_pixels():
    """The rule (docs/method.md, Anomaly maps; `iepjax.thresholds`): min(ceil(1/(1-q)), 10) images for the
    image quantile q, 10 pixels above the pixel quantile; a threshold of 0 or NaN is refused too."""
    from iepjax import thresholds as T

    assert [T.min_images(q) for q in (0.5, 0.8, 0.9, 0.99, 0.995, 1.0)] == [2, 5, 10, 10, 10, 10]
    assert T.min_pixels(0.995) == 2000 and T.min_pixels(0.9) == 100 and T.min_pixels(1.0) == 0
    assert T.min_held_out(T.ThresholdConfig()) == 11 and T.min_held_out(T.ThresholdConfig(early_stop=False)) == 10
    maps = np.random.default_rng(0).gamma(2.0, 0.05, size=(10, SIZE, SIZE)).astype(np.float32)
    st = T.normal_stats(maps)
    assert st.n_images == 10 and st.pixel_threshold > 0 and st.image_threshold > 0
    with pytest.raises(T.ThresholdError, match=r"9 normal image\(s\).*needs at least 10.*--holdout.*--threshold T "
                                               r"--image-threshold T"):
        T.normal_stats(maps[:9])
    assert T.normal_stats(maps[:2], image_quantile=0.5).n_images == 2
    with pytest.raises(T.ThresholdError, match=r"10240 normal pixels.*needs at least 100000"):
        T.normal_stats(maps, pixel_quantile=0.9999)
    with pytest.raises(T.ThresholdError, match=r"grad pixel threshold .* is 0.0.*a threshold of 0 flags every pixel"):
        T.normal_stats(np.where(maps > 0.5, maps, 0))  # almost every pixel 0: the 99.5th percentile is 0
    with pytest.raises(T.ThresholdError, match=r"not finite"):
        T.normal_stats(np.full_like(maps, np.nan))


def test_early_stopping_cannot_freeze_the_threshold_fit_to_zero(trained, images_u8, model_cfg, tmp_path):
    """The early-stopping bar is the smallest loss of the held-out images, so the image that set it is frozen
    at step 0 and its map is 0. Fitted on that image alone, the thresholds were 0 and every image was flagged
    defective; now such images are left out of the fit, and too few left is refused before any projection."""
    from iepjax import ProjectionConfig
    from iepjax.early_stop import frozen_at_start, model_losses, with_early_stop
    from iepjax.thresholds import ThresholdConfig, ThresholdError, calibrate

    params, _ = trained
    cfg = ProjectionConfig(model=model_cfg, steps=3, alpha=0.05, lam=0.0, weighting=False)
    rng = np.random.default_rng(3)
    normal = np.clip(images_u8[rng.integers(0, len(images_u8), 11)].astype(int)
                     + rng.integers(-12, 13, (11, SIZE, SIZE, 1)), 0, 255).astype(np.uint8)
    one = with_early_stop(params, cfg, normal[:1])
    assert frozen_at_start(params, one, normal[:1]).tolist() == [True]
    with pytest.raises(ThresholdError, match=r"0 normal image\(s\) \(1 more frozen at step 0"):
        calibrate(params, one, normal[:1], progress=False)

    stopped = with_early_stop(params, cfg, normal)
    frozen = frozen_at_start(params, stopped, normal)
    losses, _ = model_losses(params, stopped, normal)
    assert frozen.sum() >= 1 and frozen[int(np.argmin(losses))]  # at least the image that set the bar
    stats, _ = calibrate(params, stopped, normal, ThresholdConfig(), progress=False)
    for st in stats.values():
        assert st.n_excluded == frozen.sum() and st.n_images == 11 - frozen.sum()
        assert st.pixel_threshold > 0 and st.image_threshold > 0


def test_holdout_split_holds_out_what_thresholds_need():
    """A fraction > 0 used to hold out at least 1 image (a single held-out image gave thresholds of 0);
    now at least the count the thresholds need, or a message when the images are too few for that."""
    from iepjax.data import DataError
    from iepjax.pipelines.train import holdout_split

    train, held = holdout_split(60, 0.1, 0, at_least=11)
    assert len(held) == 11 and len(train) == 49 and not set(train) & set(held)
    assert len(holdout_split(400, 0.1, 0, at_least=11)[1]) == 40  # enough already: the fraction decides
    assert len(holdout_split(5, 0.2, 0)[1]) == 1  # the old floor, for callers that fit no thresholds
    with pytest.raises(DataError, match=r"only 15 normal training images.*--holdout 0.*--no-early-stop.*"
                                        r"--threshold T --image-threshold T.*--normal-dir DIR.*--holdout 0.74"):
        holdout_split(15, 0.1, 0, at_least=11)
    assert len(holdout_split(15, 0.0, 0, at_least=11)[1]) == 0
    with pytest.raises(DataError, match=r"only 6 normal training images: holding out the 11 .* is more than there "
                                        r"are\. Train on all of them \(--holdout 0\)"):
        holdout_split(6, 0.1, 0, at_least=11)


def test_a_run_with_too_few_held_out_images_is_refused_before_any_work(tmp_path, capsys):
    """One held-out image (what a small training set and --holdout 0.1 gave) cannot fit thresholds: project.py
    says so, with the rule and the flags, before it loads any data. Before, it fitted thresholds of 0."""
    results = tmp_path / "results"
    run = _fake_run(results)  # holds out one image
    argv = ["--category", "brick", "--results", str(results), "--tfds-dir", str(tmp_path / "tfds"), "--no-progress"]
    code, err = _project_main(argv, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert f"run {run} holds out 1 normal image(s)" in err and "at least 10 normal images" in err, err
    assert "plus 1 for early stopping" in err and "--holdout" in err and "--threshold T --image-threshold T" in err
    assert not (tmp_path / "tfds").exists()
    (run / "holdout.json").write_text(json.dumps({"dataset": "textures", "category": "brick", "ids": []}))
    code, err = _project_main(argv + ["--threshold", "0.1", "--image-threshold", "0.2"], capsys)
    assert code == 2 and "holds out no normal image" in err and "--no-early-stop" in err, err
    assert not (tmp_path / "tfds").exists()


# --------------------------------------------------------------------------- collapsed and unfinished runs


def test_a_collapsed_run_is_refused_unless_allowed(tmp_path, capsys):
    from iepjax import runs
    results = tmp_path / "results"
    run = _fake_run(results, holdout=11)
    (run / "training.json").write_text(json.dumps({"steps": 1, "collapse": {"collapsed": True, "ratio": 0.995}}))
    code, err = _project_main(["--category", "brick", "--results", str(results), "--tfds-dir",
                               str(tmp_path / "tfds"), "--no-progress"], capsys)
    assert code == 3 and "Traceback" not in err, err
    assert "collapsed to predicting the mean image" in err and str(run) in err
    assert "0.995 times a constant predictor's" in err
    assert "--allow-collapse" in err and "--steps" in err and "--lr" in err and "--seed" in err
    assert not (tmp_path / "tfds").exists()
    assert runs.check_trained(run, "brick", allow_collapse=True) == []
    (run / "training.json").write_text(json.dumps({"steps": 1, "collapse": {"collapsed": False, "ratio": 0.5}}))
    assert runs.check_trained(run, "brick") == []


def test_a_collapsed_vae_is_trained_again_with_free_bits_in_a_new_run(tmp_path):
    """A VAE that collapses (4 steps do) is trained again with free bits (`collapse_remedy`) in a new run folder
    that records the collapsed one; asking for the same run again continues that retraining instead of starting
    over; --allow-collapse (calibrate_collapsed) and retry_collapsed=False keep the first model as it is."""
    from iepjax import presets
    from iepjax.config import DataConfig, ThresholdConfig
    from iepjax.data import fake_tree
    from iepjax.pipelines.train import RETRY_FILE, train_category
    from iepjax.training import COLLAPSE_FREE_BITS, collapse_remedy

    fake_tree.make_category(tmp_path / "src", "rough", channels=1, size_hw=(40, 48), n_train=4, n_good=1, n_defect=0)
    source = DataConfig("folder", "rough", str(tmp_path / "tfds"), str(tmp_path / "src"))
    config = dataclasses.replace(presets.train_config("folder", "rough", size=32), steps=4, batch_size=4)
    prep = presets.preprocess("folder", "rough", size=32)
    kw = dict(results=tmp_path / "results", progress=False)
    no_thresholds = ThresholdConfig(holdout=0.0)
    first = train_category(config, prep, no_thresholds, source, **kw)
    collapsed, retrained = first.retried_from, first.run_dir
    assert collapsed is not None and (collapsed.name, retrained.name) == ("v0", "v1"), first
    assert first.summary.config.free_bits == COLLAPSE_FREE_BITS == collapse_remedy(config).free_bits
    record = json.loads((retrained / RETRY_FILE).read_text())
    assert record["collapsed_run"] == str(collapsed) and record["requested"]["free_bits"] == 0.0
    assert json.loads((collapsed / "training.json").read_text())["collapse"]["collapsed"]
    assert json.loads((retrained / "config.json").read_text())["free_bits"] == COLLAPSE_FREE_BITS
    again = train_category(config, prep, no_thresholds, source, **kw)
    assert (again.run_dir, again.retried_from, again.summary.resumed_from) == (retrained, collapsed, 4), again
    assert sorted(p.name for p in collapsed.parent.glob("v*")) == ["v0", "v1"]
    for opts in (dict(calibrate_collapsed=True), dict(retry_collapsed=False)):
        kept = train_category(config, prep, no_thresholds, source, new=True, **opts, **kw)
        assert kept.retried_from is None and kept.summary.collapse.collapsed and not (kept.run_dir / RETRY_FILE).exists()
    assert collapse_remedy(collapse_remedy(config)) is None
    assert collapse_remedy(presets.train_config("folder", "rough", size=32, model="ae_l2")) is None


def test_an_unfinished_run_is_projected_with_a_warning(tmp_path):
    """No training.json: the training stopped early, or is going on right now (another process holds the run)."""
    from iepjax import runs
    run = _fake_run(tmp_path / "results")
    (warning,) = runs.check_trained(run, "brick")
    assert "stopped before the end" in warning and "step 1 of 1" in warning and "python train.py --category brick" \
        in warning
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from iepjax import runs; "
                               "runs.hold(__import__('pathlib').Path(sys.argv[1])); print('held', flush=True); "
                               "time.sleep(60)", str(run)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (warning,) = runs.check_trained(run, "brick")
        assert f"is being trained right now (process {holder.pid})" in warning, warning
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------- strict JSON everywhere


def _no_constant(token):
    raise ValueError(f"not strict JSON: {token}")


def test_projection_files_are_strict_json(tmp_path):
    """projection_config.json, timing.json and thresholds.json of a projection folder, the run's
    thresholds.json and inference's summary.json: NaN and infinities are written as null."""
    from iepjax import ProjectionConfig, outputs
    from iepjax.localization import Localization
    from iepjax.thresholds import normal_stats

    maps = np.random.default_rng(0).gamma(2.0, 0.05, size=(10, SIZE, SIZE)).astype(np.float32)
    st = normal_stats(maps)._replace(vmax=float("inf"))
    cfg = ProjectionConfig(steps=2)
    x = np.zeros((10, SIZE, SIZE, 1), np.float32)
    loc = Localization(maps, maps, x, x, np.full((10, 2), np.nan, np.float32), float("nan"), 1.0)
    outputs.write_results(tmp_path, {"grad": {"pixel_auroc": float("nan")}}, loc, [str(i) for i in range(10)], cfg,
                          {"grad": st, "recon": st}, "held-out normal training images")
    for name in ("metrics.json", "projection_config.json", "timing.json", "thresholds.json"):
        text = (tmp_path / name).read_text()
        json.loads(text, parse_constant=_no_constant)
    assert json.loads((tmp_path / "thresholds.json").read_text())["grad"]["vmax"] is None
    assert json.loads((tmp_path / "timing.json").read_text())["compile_s"] is None


def test_seeds_tool_copes_with_null_metrics():
    """tools/seeds.py on metrics.json files with null (strict JSON for NaN: no ground-truth masks)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_seeds", ROOT / "tools" / "seeds.py")
    seeds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seeds)
    m = {"recon": {"pixel_auroc": None, "image_auroc": 0.6, "pixel_aupro": None},
         "grad": {"pixel_auroc": None, "image_auroc": 0.7, "pixel_aupro": None}}
    ok = {"recon": {"pixel_auroc": 0.8, "image_auroc": 0.5, "pixel_aupro": 0.4},
          "grad": {"pixel_auroc": 0.9, "image_auroc": 0.6, "pixel_aupro": 0.5}}
    rows = [seeds.seed_row(0, m), seeds.seed_row(1, ok)]
    assert rows[0]["grad_pixel_auroc"] is None and rows[0]["margin_pixel_auroc"] is None
    s = seeds.summarise(rows)
    assert s["grad_image_auroc"] == {"mean": 0.65, "std": 0.0707, "min": 0.6, "max": 0.7}
    assert s["margin_pixel_auroc"] == {"mean": 0.1, "std": 0.0, "min": 0.1, "max": 0.1, "n": 1}
    assert seeds.summarise(rows[:1])["grad_pixel_auroc"] == {"n": 0}


# --------------------------------------------------------------------------- worker entry point


def _worker(argv: list[str]) -> None:
    mode, *args = argv
    {"project": _project_worker,
     "claim": lambda *a: _claim_worker("claim", *a),
     "resume": lambda *a: _claim_worker("resume", *a),
     "write": _write_worker}[mode](*args)


if __name__ == "__main__":
    _worker(sys.argv[1:])
