"""The guest proxy needs nothing but Python's standard library, from Python 3.8 on.

Checked on the source modules and on the built single file: every import is a standard
library module or one of the modules bundled with it, the code parses as Python 3.8, and the
file runs under the machine's own interpreter.
"""

from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import vmfabric
from vmfabric.access.bundle import BUNDLED_FILES, INTERPRETER

SOURCE_ROOT = Path(vmfabric.__file__).parent.parent
BUNDLED_MODULES = {
    name.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for name in BUNDLED_FILES
}


def imported_modules(source: str) -> set[str]:
    """Every module an `import` or `from ... import` names (relative ones: the bundle's)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add("vmfabric.access" if node.level else node.module or "")
    return found


def foreign_imports(source: str) -> set[str]:
    """Imports that are neither the standard library nor a bundled module."""
    return {
        module
        for module in imported_modules(source)
        if module.split(".")[0] not in sys.stdlib_module_names and module not in BUNDLED_MODULES
    }


def test_the_check_itself_catches_a_third_party_import() -> None:
    assert foreign_imports("import os\nfrom vmfabric.access import channel\n") == set()
    assert foreign_imports("import httpx\nfrom vmfabric.store import engine\n") == {
        "httpx",
        "vmfabric.store",
    }


@pytest.mark.parametrize("name", BUNDLED_FILES)
def test_each_bundled_module_imports_only_the_standard_library_and_the_bundle(name: str) -> None:
    assert foreign_imports((SOURCE_ROOT / name).read_text()) == set()


@pytest.mark.parametrize("name", BUNDLED_FILES)
def test_each_bundled_module_parses_as_python_3_8(name: str) -> None:
    ast.parse((SOURCE_ROOT / name).read_text(), feature_version=(3, 8))


def test_the_zipapp_holds_exactly_the_bundled_modules_and_nothing_foreign(bundle: Path) -> None:
    assert bundle.read_bytes().startswith(f"#!{INTERPRETER}\n".encode())
    with zipfile.ZipFile(bundle) as archive:
        python_files = [name for name in archive.namelist() if name.endswith(".py")]
        assert sorted(python_files) == sorted([*BUNDLED_FILES, "__main__.py"])
        for name in python_files:
            source = archive.read(name).decode()
            assert foreign_imports(source) == set(), name
            if name != "__main__.py":
                assert source == (SOURCE_ROOT / name).read_text(), f"{name} is not the source"


def test_the_zipapp_holds_bytecode_of_exactly_the_bundled_sources(bundle: Path) -> None:
    with zipfile.ZipFile(bundle) as archive:
        compiled = sorted(name for name in archive.namelist() if name.endswith(".pyc"))
        assert compiled == sorted(name + "c" for name in BUNDLED_FILES)
        for name in compiled:
            pyc = archive.read(name)
            assert pyc[:4] == importlib.util.MAGIC_NUMBER, name
            assert int.from_bytes(pyc[4:8], "little") == 0b01, "hash-based, unchecked"
            assert pyc[8:16] == importlib.util.source_hash(archive.read(name[:-1])), name


def help_text(python: str, bundle: Path) -> str:
    shown = subprocess.run(
        [python, "-I", "-S", str(bundle), "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return shown.stdout


def test_the_zipapp_runs_with_the_system_python(bundle: Path) -> None:
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    if system_python is None:
        pytest.skip("no system python3")
    shown = help_text(system_python, bundle)
    assert "--unix PATH" in shown and "--allow PORTS" in shown


def test_a_python_of_another_version_runs_the_sources(bundle: Path, tmp_path: Path) -> None:
    """Bytecode with a magic number this Python does not know is skipped, as it would be by
    a guest's Python of another version."""
    foreign = tmp_path / "foreign-proxy"
    with zipfile.ZipFile(bundle) as source, zipfile.ZipFile(foreign, "w") as copy:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.endswith(".pyc"):
                data = b"\x00\x00\r\n" + data[4:]
            copy.writestr(item, data)
    assert "--unix PATH" in help_text(sys.executable, foreign)


def test_the_zipapp_is_executable_and_rejects_bad_options_with_status_2(bundle: Path) -> None:
    refused = subprocess.run(
        [str(bundle), "--unix", "/nonexistent/x", "--allow", "80,http"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert refused.returncode == 2
    assert "not a port or port range: 'http'" in refused.stderr
