"""The layering is a checked contract: import-linter keeps it (run here and in .ci/run), the
read side loads no recording code, and the CLI is installed under a name that cannot collide."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=cwd
    )
    return out.stdout.strip()


def test_the_analysis_and_replay_layers_load_no_recording_module(tmp_path):
    code = (
        "import sys\n"
        "import hydra_store.analysis.stored, hydra_store.analysis.reverse\n"
        "import hydra_store.analysis.comparison, hydra_store.analysis.validation\n"
        "import hydra_store.analysis.methods, hydra_store.replay.trajectory\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('hydra_store.'))\n"
        "print(','.join(loaded))"
    )
    loaded = run_python(code, tmp_path).split(",")
    assert "hydra_store.analysis.reverse" in loaded and "hydra_store.replay.trajectory" in loaded
    assert [m for m in loaded if m.startswith("hydra_store.recording")] == []


def test_import_linter_keeps_every_contract():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint is not None, "import-linter is a dev dependency: pip install -e '.[dev]'"
    out = subprocess.run([lint], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Contracts: 4 kept, 0 broken." in out.stdout


def test_the_cli_is_installed_as_hydra_store_cli_not_cli(tmp_path):
    code = (
        "import importlib.util as u\n"
        "print(u.find_spec('cli') is None, u.find_spec('hydra_store_cli.main') is not None)"
    )
    assert run_python(code, tmp_path) == "True True"
