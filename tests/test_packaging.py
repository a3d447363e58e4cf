"""Every package folder is listed in pyproject.toml, so a wheel (not only an editable
install) carries it."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    dirs = {v: k for k, v in cfg["package-dir"].items()}  # folder -> import name
    found = set()
    for top, name in dirs.items():
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *rel)))
    assert found == listed, f"add to pyproject packages: {sorted(found - listed)}; remove: {sorted(listed - found)}"


def _run_in_repo_root(code: str, *args: str, pythonpath: str | None = None):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, *args, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)


def test_a_top_level_kernels_import_from_the_repo_root_gets_the_hugging_face_package(tmp_path):
    # python run from the repository root has the root on sys.path, where kernels/ (gen.kernels)
    # would shadow the Hugging Face `kernels` package that transformers >= 5.25 imports at
    # start-up; a stand-in of that package, found later on the path, must win
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("CUDAProperties = 'the real package'\n")
    (fake / "layer.py").write_text("WHERE = 'the real package, submodule'\n")
    r = _run_in_repo_root("import kernels, kernels.layer; from kernels import CUDAProperties; "
                          "print(CUDAProperties, '|', kernels.layer.WHERE, '|', kernels.__file__)",
                          pythonpath=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(" | ")[:2] == ["the real package", "the real package, submodule"], r.stdout
    assert str(tmp_path) in r.stdout


def test_without_the_hugging_face_package_a_top_level_kernels_import_stays_inert():
    # -S: no site-packages, so the repository's kernels/ is the only `kernels` on the path; it
    # must not import its launchers (a second import registers the custom ops twice)
    r = _run_in_repo_root("import sys, kernels; print(kernels.__all__, "
                          "[m for m in sys.modules if m.startswith(('kernels.', 'torch'))])", "-S")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[] []", r.stdout
    r = _run_in_repo_root("from kernels import CUDAProperties", "-S")
    assert r.returncode != 0 and "CUDAProperties" in r.stderr
