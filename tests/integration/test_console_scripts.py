"""The console commands of pyproject.toml ([project.scripts]) are the `python -m` entry points: same function,
same output. The installed scripts are found next to the running Python (`pip install -e .`, which
scripts/env.sh and so .ci/run do, puts them there)."""
import importlib
import inspect
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {"sct-train": "sct.train", "sct-sample": "sct.sample", "sct-shards": "pipelines.shards", "sct-encode": "pipelines.encode"}


def _installed(name: str) -> Path:
    exe = Path(sys.executable).parent / name
    assert exe.is_file(), f"{exe} is missing: install the package with `pip install -e .` (scripts/env.sh does it)"
    return exe


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_each_console_script_is_its_modules_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {name: f"{module}:main" for name, module in SCRIPTS.items()}
    for module in SCRIPTS.values():
        mod = importlib.import_module(module)
        assert inspect.signature(mod.main).return_annotation in ("int", int), f"{module}.main must return the exit status"
        assert 'if __name__ == "__main__":\n    sys.exit(main())' in inspect.getsource(mod)  # what `python -m` runs


def test_sct_train_dry_run_matches_python_m(capsys):
    from sct import train

    done = _run([str(_installed("sct-train")), "--config", "configs/demo_cpu.yaml", "--dry-run"])
    assert done.returncode == 0, done.stderr
    assert train.main(["--config", "configs/demo_cpu.yaml", "--dry-run"]) == 0
    seconds = re.compile(r"in \d+(\.\d+)? s\b")  # the activation estimate's own CPU time differs run to run
    assert seconds.sub("in _ s", done.stdout) == seconds.sub("in _ s", capsys.readouterr().out)
    assert "# backbone parameters:" in done.stdout


def test_installed_commands_resolve_to_the_same_mains():
    """The installed package's entry points (what the scripts next to Python import) are the modules' main()s."""
    from importlib.metadata import entry_points

    installed = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name in SCRIPTS}
    assert set(installed) == set(SCRIPTS), "reinstall with `pip install -e .` after changing [project.scripts]"
    for name, module in SCRIPTS.items():
        _installed(name)
        assert installed[name].load() is importlib.import_module(module).main
