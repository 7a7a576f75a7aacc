"""`pip install .` gives the library and a `captioner` command that works outside the checkout."""

import json
import subprocess
import venv

from tests.conftest import EXAMPLES, ROOT


def test_pip_install_gives_a_working_captioner_command(tmp_path):
    # The dependencies (TensorFlow...) come from this environment; the package itself is built and installed anew.
    venv.create(tmp_path / "venv", system_site_packages=True, with_pip=True)
    bin_dir = tmp_path / "venv" / "bin"
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
