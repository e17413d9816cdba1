"""Kill anywhere, the CI-sized run of scripts/kill_anywhere.py: `mmfm import` killed (SIGKILL) inside its write of
cases.csv and `mmfm extract` killed inside the write of its third bag, each then run again. After the kill every
file is its old or its new version and every bag on disk is whole; the re-run redoes only what was unfinished and
ends as the uninterrupted run. (Pretraining killed inside a checkpoint and resumed: tests/test_train_loop.py;
embed and more points per command: the script at full size.)"""

import importlib.util
import sys

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("kill_anywhere", REPO / "scripts" / "kill_anywhere.py")
kill_anywhere = sys.modules["kill_anywhere"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kill_anywhere)


@pytest.mark.parametrize("command, point", [("import", "write:cases.csv@1"), ("extract", "write:s2.h5@1")])
def test_killed_inside_a_write_and_run_again(command, point, tmp_path):
    res = kill_anywhere.run_scenario(command, tmp_path, 0, 0, tmp_path / "jit", points=[point])
    assert res["points"] == [{"point": point, "survived": True}]
    assert res["menu"] >= (2 if command == "import" else 8)  # the traced run passed every write it makes


def test_the_menu_is_the_traced_points(tmp_path):
    trace = tmp_path / "t.txt"
    trace.write_text("train.step@1\ncheckpoint.save@2\nwrite:config.yaml@1\ntrain.step@1\nwrite:s0.h5@1\n")
    assert kill_anywhere.kill_points(trace, "pretrain") == ["train.step@1", "checkpoint.save@2",
                                                            "write:config.yaml@1", "write:s0.h5@1"]
    assert kill_anywhere.kill_points(trace, "extract") == ["write:config.yaml@1", "write:s0.h5@1"]
