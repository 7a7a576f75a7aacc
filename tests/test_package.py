"""`pip install .` gives the library and a `captioner` command that works outside the checkout."""

import json
import site
import subprocess
import sysconfig
import venv
from pathlib import Path

from tests.conftest import EXAMPLES, ROOT


def site_folders_of_this_environment() -> list[str]:
    """The folders this test run imports installed packages from: its venv's or the system's site-packages."""
    folders = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    if site.ENABLE_USER_SITE:
        folders.add(site.getusersitepackages())
    return sorted(folder for folder in folders if Path(folder).is_dir())


def new_venv_seeing_this_environment(folder: Path) -> Path:
    """A fresh venv whose own site-packages come first, then this test run's packages (TensorFlow...).

    `system_site_packages=True` would show the *base* interpreter's packages, which inside a virtual
    environment are not the ones the tests run with; a .pth file names this environment's folders instead.
    """
    venv.create(folder, with_pip=True)
    python = folder / "bin" / "python"
    own = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    (Path(own) / "test-environment.pth").write_text("\n".join(site_folders_of_this_environment()) + "\n")
    return folder / "bin"


def test_pip_install_gives_a_working_captioner_command(tmp_path):
    # The dependencies come from this environment; the package itself is built and installed anew.
    bin_dir = new_venv_seeing_this_environment(tmp_path / "venv")
    subprocess.run([bin_dir / "pip", "install", "--quiet", "--no-deps", str(ROOT)], check=True, timeout=300,
                   cwd=tmp_path, capture_output=True)

    # Run from elsewhere, so that nothing is imported from the checkout and the bundled weights come from the install.
    result = subprocess.run([bin_dir / "captioner", str(EXAMPLES / "dog.jpg"), "--method", "greedy", "--json"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    caption = json.loads(result.stdout)
    assert caption["image"].endswith("dog.jpg") and caption["caption"]
    # A quiet start: nothing from TensorFlow's C++ start-up (CUDA probing on a CPU machine) reaches the user.
    assert "cuda" not in result.stderr.lower() and "oneDNN" not in result.stderr

    location = subprocess.run([bin_dir / "python", "-c", "import captioner, sys; print(captioner.__file__)"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120, check=True).stdout
    assert location.startswith(str(tmp_path / "venv"))
