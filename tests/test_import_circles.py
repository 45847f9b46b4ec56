"""scripts/import_circles.py: transfer_cli has no import circles, and the check does find them."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "import_circles.py"


def check(package: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(package)], capture_output=True, text=True, check=False)


def test_transfer_cli_has_no_import_circles():
    done = check(ROOT / "transfer_cli")
    assert done.stdout.splitlines()[-1] == "0 import circles", done.stdout
    assert done.returncode == 0


def test_circles_through_a_package_face_and_a_lazy_import_are_found(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    # a builder that takes its registry from the face that imports it
    (package / "sub" / "__init__.py").write_text("REGISTRY = {}\nfrom pkg.sub import builder\n")
    (package / "sub" / "builder.py").write_text("from pkg.sub import REGISTRY\n")
    # a circle hidden in a function, and one written with a relative import
    (package / "a.py").write_text("def late():\n    from pkg import b\n")
    (package / "b.py").write_text("from . import a\n")
    # importing a module of a package does not depend on the package's face: no circle
    (package / "c.py").write_text("from pkg.sub import builder\n")
    (package / "sub" / "user.py").write_text("from pkg import c\n")
    done = check(package)
    assert done.stdout.splitlines() == ["pkg.a <-> pkg.b", "pkg.sub <-> pkg.sub.builder", "2 import circles"]
    assert done.returncode == 1
