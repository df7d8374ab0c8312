"""Where a command's XLA compile time goes: every backend compile of every Python process it starts.

    python tools/compile_profile.py --out /tmp/cprof -- python -m pytest -q -p no:cacheprovider
    python tools/compile_profile.py --out /tmp/cprof --report-only      # the report of an earlier run

Runs the command with a `sitecustomize` on PYTHONPATH that, in each Python process importing jax
(pytest-xdist workers and the scripts the tests start alike, as long as they keep PYTHONPATH),
listens to `jax.monitoring`'s backend-compile events and writes at exit one JSON file per process
into --out: the function name, the seconds, the test running (PYTEST_CURRENT_TEST, which
subprocesses inherit) and the first call site outside the installed packages. Processes killed
with SIGKILL write nothing. Then prints the compile seconds by test and by call site. A
persistent compilation cache hides what it already holds: profile with an empty one
(`-p no:cacheprovider`, or a fresh checkout). Measurements of the suite: docs/results.md, "Time
of the test suite".
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SITECUSTOMIZE = r'''
import atexit, json, os, sys, traceback

_rows = []
_out = os.environ["IEPJAX_COMPILE_PROFILE_DIR"]


def _listener(event, duration, **kw):
    if not event.endswith("backend_compile_duration"):
        return
    where = ""
    for fr in reversed(traceback.extract_stack()[:-1]):
        if "-packages" not in fr.filename and "sitecustomize" not in fr.filename and "<" not in fr.filename:
            where = f"{os.path.relpath(fr.filename)}:{fr.lineno}:{fr.name}"
            break
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    _rows.append([kw.get("fun_name", ""), round(duration, 3), test, where])


class _AfterJax:
    """Registers the listener once jax has been imported (importing it here would slow every process)."""

    def find_spec(self, name, path=None, target=None):
        if name != "jax":
            return None
        sys.meta_path.remove(self)
        import importlib.util
        spec = importlib.util.find_spec("jax")
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            from jax import monitoring
            monitoring.register_event_duration_secs_listener(_listener)
        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _AfterJax())


@atexit.register
def _dump():
    if _rows:
        with open(os.path.join(_out, f"{os.getpid()}.json"), "w") as f:
            json.dump({"argv": sys.argv[:3], "rows": _rows}, f)
'''


def report(folder: Path, top: int = 30) -> str:
    """The compile seconds in `folder`'s process files: total, by test (or script), by call site."""
    by_test, by_site, n_site = collections.Counter(), collections.Counter(), collections.Counter()
    files = sorted(folder.glob("*.json"))
    for f in files:
        d = json.loads(f.read_text())
        script = Path(d["argv"][0]).name if d["argv"] else ""
        for fun, seconds, test, where in d["rows"]:
            by_test[test or script] += seconds
            by_site[f"{where} {fun}"] += seconds
            n_site[f"{where} {fun}"] += 1
    lines = [f"{sum(by_test.values()):.0f} s of backend compiles in {sum(n_site.values())} compiles, "
             f"{len(files)} processes", "", "by test (or script):"]
    lines += [f"{s:8.1f}  {k}" for k, s in by_test.most_common(top)]
    lines += ["", "by call site and function (seconds, compiles):"]
    lines += [f"{s:8.1f} {n_site[k]:5d}  {k}" for k, s in by_site.most_common(top)]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the per-process files (created)")
    p.add_argument("--top", type=int, default=30, help="rows per table")
    p.add_argument("--report-only", action="store_true", help="print the report of the files already in --out")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to profile")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not a.report_only:
        if not command:
            p.error("give the command after --")
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as site:
            Path(site, "sitecustomize.py").write_text(SITECUSTOMIZE)
            env = dict(os.environ, IEPJAX_COMPILE_PROFILE_DIR=str(out),
                       PYTHONPATH=os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")])))
            rc = subprocess.run(command, env=env).returncode
        if rc:
            print(f"note: the command exited with status {rc}", file=sys.stderr)
    print(report(out, a.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
