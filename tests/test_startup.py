"""Start-up: `splice --help` imports no torch, `splice list` no timm/torchvision/transformers (they are imported when a
model is built); a closed pipe (`splice describe X | head`) ends the command quietly. Timings: bench/startup.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("timm", "torchvision", "transformers")


def _imported_after(args: list[str]) -> set[str]:
    code = ("import sys, contextlib, io\nfrom splice.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    try:\n        main(sys.argv[1:])\n"
            "    except SystemExit:\n        pass\n"
            "print(' '.join(m for m in ('torch', *%r) if m in sys.modules))" % (HEAVY,))
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_help_imports_no_torch():
    assert _imported_after(["--help"]) == set()


def test_list_imports_no_backbone_library():
    assert _imported_after(["list"]) & set(HEAVY) == set()


def test_import_splice_is_light_and_names_still_resolve():
    code = ("import sys, splice\nassert 'torch' not in sys.modules\n"
            "from splice import HFInterop, LayerSpec, KVCache, GenerationOptions\nassert splice.Kind.__name__ == 'Kind'\n"
            "assert 'LayerSpec' in dir(splice)\n"
            "try:\n    splice.nothing_here\nexcept AttributeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "module 'splice' has no attribute 'nothing_here'" in out.stdout


@pytest.mark.parametrize("args", [["describe", "vit"], ["list"], ["list", "--json"]])
def test_a_closed_pipe_is_no_traceback(args):
    p = subprocess.Popen([sys.executable, "-m", "splice.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader leaves before anything is written, as `| head` may
    err = p.stderr.read().decode()
    p.stderr.close()
    assert p.wait() == 141 and "BrokenPipeError" not in err and "Traceback" not in err, err


def test_train_flags_are_there_when_asked_for():
    out = subprocess.run([sys.executable, "-m", "splice.cli", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--max-steps" in out.stdout
