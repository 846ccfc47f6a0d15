"""Run train.py in this process with the faults of train_common.install_faults_from_env installed (for
subprocess tests of the command line):

    TEST_NAN_STEPS=1 python tests/training/run_train_py.py config.yml data.yml key=value ...
"""

import os
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

from train_common import REPO, install_faults_from_env  # noqa: E402

if __name__ == "__main__":
    install_faults_from_env(int(os.environ.get("RANK", "0")))
    sys.argv[0] = str(REPO / "train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
