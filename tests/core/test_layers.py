"""The package's layers and the absence of import cycles are checked, not hoped for: import-linter runs the
contracts declared in pyproject.toml ([tool.importlinter]) over every import in keye/, function-level ones
included."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _lint(config: Path) -> subprocess.CompletedProcess:
    script = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", script, str(config), "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True)


def test_layer_and_cycle_contracts_hold():
    result = _lint(ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout


def test_the_contracts_catch_an_upward_import(tmp_path):
    """The same contracts over a copy of keye/ in which the eval layer imports the api layer above it."""
    import shutil

    copy = tmp_path / "keye"
    shutil.copytree(ROOT / "keye", copy, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    (copy / "eval" / "formats.py").write_text((copy / "eval" / "formats.py").read_text() + "\nimport keye.api\n")
    config = tmp_path / "pyproject.toml"
    config.write_text((ROOT / "pyproject.toml").read_text())
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from importlinter.cli import lint_imports_command; "
              "sys.argv = sys.argv[1:]; sys.argv[0] = 'lint-imports'; sys.exit(lint_imports_command())")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(config), "--no-cache"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 1, result.stdout[-2000:]
    assert "keye.eval.formats -> keye.api" in result.stdout
