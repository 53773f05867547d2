import os
import subprocess
import sys

import numpy as np
import pytest

import fastbn as fbn
from conftest import backend


def test_get_backend():
    assert fbn.get_backend(np.zeros((2, 2))) == "cpu"
    assert fbn.get_backend([[1.0, 2.0]]) == "cpu"
    with backend("reference"):
        assert fbn.get_backend(np.zeros((2, 2))) == "reference"
    with backend("gpu-please"):
        with pytest.raises(ValueError, match="FASTBN_BACKEND"):
            fbn.get_backend(np.zeros((2, 2)))


def test_reference_backend_selected_by_environment(tmp_path):
    code = ("import numpy as np, fastbn as fbn; x = np.ones((3, 2)); "
            "print(fbn.get_backend(x), fbn.moments(x)[0].tolist())")
    env = {"FASTBN_BACKEND": "reference", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True, cwd=tmp_path).stdout.split(maxsplit=1)
    assert out == ["reference", "[1.0, 1.0]\n"]


def test_import_never_imports_cupy(tmp_path):
    code = ("import sys, numpy as np, fastbn as fbn; "
            "fbn.batch_norm(np.ones((3, 2)), np.zeros(2), np.ones(2)); "
            "print('cupy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tmp_path)  # not the source tree: the installed package
    assert out.stdout.strip() == "False"


def test_openmp_build():
    """The core has OpenMP unless the build was asked not to (FASTBN_DISABLE_OPENMP=ON)."""
    disabled = os.environ.get("FASTBN_DISABLE_OPENMP", "OFF").upper() in ("ON", "1", "TRUE")
    assert fbn._openmp_enabled() is not disabled
